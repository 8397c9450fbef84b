"""Tests for tifactory.demo.photos and the collect -> crop pipeline on the demo photo sets."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tifactory.photos.collect import collect_photos, load_upright_rgb
from support.photos import collect_settings, run_crop
from tifactory.demo.photos import DEMO_SUBJECTS, make_demo_photos
from tifactory.faces.detection import YuNetDetector


def _pipeline(root: Path, subject: str):
    photos = make_demo_photos(subject, root / "photos")
    raw = collect_photos([str(root / "photos")], root / "raw.tsv", collect_settings())
    crops = run_crop(root / "raw.tsv", root / "crops", root / "crops.tsv")
    return photos, raw, crops


@pytest.fixture(scope="module", params=sorted(DEMO_SUBJECTS))
def demo_run(request, tmp_path_factory):
    subject = request.param
    root = tmp_path_factory.mktemp(f"demo_{subject}")
    started = time.perf_counter()
    photos = make_demo_photos(subject, root / "timed")
    elapsed = time.perf_counter() - started
    return subject, root, elapsed, photos, _pipeline(root / "run1", subject)


def test_demo_subjects():
    assert DEMO_SUBJECTS == {"astronaut": "woman", "t1person": "person"}
    with pytest.raises(ValueError):
        make_demo_photos("nobody", "/nonexistent/never_written")


def test_demo_photo_set_is_varied(demo_run):
    subject, _root, elapsed, photos, _ = demo_run
    assert elapsed < 2.0
    assert 6 <= len(photos) <= 8
    assert all(p.is_file() and p.name.startswith(f"{subject}_") for p in photos)
    sizes = {}
    for path in photos:
        with Image.open(path) as image:
            sizes[path.name] = (image.format, image.size, image.getexif().get(0x0112))
    formats = {fmt for fmt, _, _ in sizes.values()}
    assert {"PNG", "JPEG"} <= formats
    long_sides = [max(size) for _, size, _ in sizes.values()]
    assert max(long_sides) == 1600 and min(long_sides) <= 320
    orientations = [o for _, _, o in sizes.values() if o]
    assert orientations in ([6], [8])
    by_bytes = {}
    for path in photos:
        by_bytes.setdefault(path.read_bytes(), []).append(path.name)
    assert sorted(len(v) for v in by_bytes.values())[-1] == 2  # exactly one duplicated pair
    assert len(by_bytes) == len(photos) - 1


def test_demo_base_photo_holds_exactly_one_face(demo_run):
    _subject, _root, _elapsed, photos, _ = demo_run
    sensitive = YuNetDetector(score_threshold=0.3, max_side=640)
    original = next(p for p in photos if "_01_" in p.name)
    assert len(sensitive.detect(np.asarray(load_upright_rgb(original)))) == 1
    noface = next(p for p in photos if "noface" in p.name)
    assert sensitive.detect(np.asarray(load_upright_rgb(noface))) == []


def test_demo_pipeline_keeps_faces_rejects_duplicate_and_noface(demo_run):
    subject, root, _elapsed, _photos, (photos, raw, crops) = demo_run
    by_name = {Path(s).name: r for s, r in zip(raw["source"], raw.to_dict("records"))}
    dup = by_name[f"{subject}_07_copy_of_02.jpg"]
    assert dup["status"] == "rejected"
    assert dup["reason"] == f"duplicate of {root / 'run1' / 'photos' / f'{subject}_02_large.jpg'}"
    rotated = by_name[f"{subject}_05_rotated_exif.jpg"]
    assert rotated["exif_orientation"] in (6, 8) and rotated["height"] > rotated["width"]

    crop_by_name = {Path(s).name: r for s, r in zip(crops["source"], crops.to_dict("records"))}
    assert len(crops) == len(raw) == len(photos)
    assert crop_by_name[f"{subject}_08_noface.jpg"]["reason"] == "no face"
    assert crop_by_name[f"{subject}_07_copy_of_02.jpg"]["reason"].startswith("duplicate of ")
    kept = crops[crops["status"] == "kept"]
    assert len(kept) >= 4
    for name in kept["output"]:
        with Image.open(root / "run1" / "crops" / name) as image:
            assert image.size == (512, 512)
    # every kept crop holds the face inside the crop square
    for row in kept.to_dict("records"):
        assert row["crop_x"] <= row["face_x"] and row["face_x"] + row["face_w"] <= row["crop_x"] + row["crop_size"]
        assert row["crop_y"] <= row["face_y"] and row["face_y"] + row["face_h"] <= row["crop_y"] + row["crop_size"]


def test_demo_pipeline_is_deterministic(demo_run):
    subject, root, _elapsed, photos, _ = demo_run
    # same demo bytes from the timed run and the pipeline run
    for path in photos:
        assert path.read_bytes() == (root / "run1" / "photos" / path.name).read_bytes()
    _pipeline(root / "run2", subject)
    for manifest in ("raw.tsv", "crops.tsv"):
        first = (root / "run1" / manifest).read_text().replace(str(root / "run1"), "ROOT")
        second = (root / "run2" / manifest).read_text().replace(str(root / "run2"), "ROOT")
        assert first == second
    first_crops = sorted((root / "run1" / "crops").glob("[0-9]*.png"))
    second_crops = sorted((root / "run2" / "crops").glob("[0-9]*.png"))
    assert [p.name for p in first_crops] == [p.name for p in second_crops]
    for a, b in zip(first_crops, second_crops):
        assert a.read_bytes() == b.read_bytes()
    # re-running in place rewrites the same files and leaves no temp files behind
    run_crop(root / "run1" / "raw.tsv", root / "run1" / "crops", root / "run1" / "crops.tsv")
    assert sorted((root / "run1" / "crops").iterdir()) == sorted(first_crops + [root / "run1" / "crops" / name for name in ("contact_sheet.png", "identity.json")])
