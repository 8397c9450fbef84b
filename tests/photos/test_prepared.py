"""Prepared kohya datasets as sources: recognised by folder name, used as they are (no detection, no re-crop)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tifactory.photos.sources import CAPTION, prepared_file_roles
from tifactory.roster import read_roster_rows
from tifactory.photos.sources import list_source_files, prepared_image_folders, source_kind


def noise_image(path: Path, size: tuple[int, int], seed: int, fmt: str | None = None) -> Path:
    """Random pixels: no face detector finds a face here, so only a pass-through can keep it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_recognised_by_kohya_folder_names(tmp_path):
    kohya = tmp_path / "eva" / "100_sks woman"
    noise_image(kohya / "a.png", (64, 64), 0)
    [folder] = prepared_image_folders(str(kohya))  # the image folder itself
    assert (folder.repeats, folder.class_tokens) == (100, "sks woman")
    [folder] = prepared_image_folders(str(tmp_path / "eva"))  # a folder holding kohya folders
    assert folder.path == str(kohya)
    noise_image(tmp_path / "holiday" / "a.jpg", (64, 64), 1)
    noise_image(tmp_path / "holiday" / "2019_summer" / "b.jpg", (64, 64), 2)
    assert prepared_image_folders(str(tmp_path / "holiday")) is None  # photos beside it: raw
    assert prepared_image_folders(str(tmp_path / "holiday" / "2019_summer")) is not None
    assert prepared_image_folders(str(tmp_path / "missing")) is None
    noise_image(tmp_path / "crops" / "a.png", (64, 64), 3)
    assert prepared_image_folders(str(tmp_path / "crops")) is None
    [forced] = prepared_image_folders(str(tmp_path / "crops"), force=True)
    assert (forced.repeats, forced.class_tokens) == (None, None)


def test_source_kind_refuses_a_mix_and_honours_the_mode(tmp_path):
    noise_image(tmp_path / "p" / "10_x man" / "a.png", (64, 64), 0)
    noise_image(tmp_path / "raw" / "b.jpg", (64, 64), 1)
    assert source_kind(str(tmp_path / "p")).prepared
    assert not source_kind(str(tmp_path / "p"), "no").prepared
    assert not source_kind(str(tmp_path / "raw")).prepared
    assert source_kind(str(tmp_path / "raw"), "yes").prepared
    with pytest.raises(ValueError, match="mix prepared"):
        source_kind(f"{tmp_path / 'p'};{tmp_path / 'raw'}")
    with pytest.raises(ValueError, match="needs dataset folders"):
        source_kind(str(tmp_path / "raw" / "b.jpg"), "yes")


def test_roster_takes_repeats_and_class_from_the_folder_unless_the_row_sets_them(tmp_path):
    noise_image(tmp_path / "eva" / "40_sks woman" / "a.png", (64, 64), 0)
    noise_image(tmp_path / "two" / "40_sks woman" / "a.png", (64, 64), 1)
    noise_image(tmp_path / "two" / "20_sks man" / "a.png", (64, 64), 2)
    noise_image(tmp_path / "raw" / "a.jpg", (64, 64), 3)
    roster = tmp_path / "roster.tsv"
    roster.write_text("subject\tclass_word\tsources\trepeats\tprepared\n"
                      f"eva\t\t{tmp_path / 'eva'}\t\t\n"
                      f"eva2\tperson\t{tmp_path / 'eva'}\t7\t\n"
                      f"two\t\t{tmp_path / 'two'}\t\t\n"
                      f"raw\t\t{tmp_path / 'raw'}\t\t\n"
                      f"forced\tman\t{tmp_path / 'raw'}\t\tyes\n"
                      f"bad\tman\t{tmp_path / 'raw'}\t\tmaybe\n")
    rows, problems = read_roster_rows(roster)
    by_subject = {row["subject"]: row for row in rows}
    assert {k: by_subject["eva"][k] for k in ("prepared", "repeats", "class_word")} == \
        {"prepared": "yes", "repeats": 40, "class_word": "woman"}
    assert {k: by_subject["eva2"][k] for k in ("prepared", "repeats", "class_word")} == \
        {"prepared": "yes", "repeats": 7, "class_word": "person"}
    assert by_subject["forced"]["prepared"] == "yes" and "repeats" not in by_subject["forced"]
    assert set(by_subject) == {"eva", "eva2", "forced"}
    text = "\n".join(problems)
    assert "row 4 (subject 'two'), column 'repeats': the prepared folders" in text
    assert "row 5 (subject 'raw'), column 'class_word': required" in text
    assert "row 7 (subject 'bad'), column 'prepared'" in text


def test_file_roles_in_a_prepared_folder(tmp_path):
    folder = str(tmp_path / "100_x woman")
    files = [f"{folder}/a.png", f"{folder}/a.txt", f"{folder}/b.JPG", f"{folder}/b.caption",
             f"{folder}/orphan.txt", f"{folder}/c.gif", f"{folder}/sub/d.png", f"{tmp_path}/notes.md"]
    roles = prepared_file_roles(files, [folder])
    assert roles[f"{folder}/a.png"] is None and roles[f"{folder}/b.JPG"] is None
    assert roles[f"{folder}/a.txt"] == CAPTION and roles[f"{folder}/b.caption"] == CAPTION
    assert roles[f"{folder}/orphan.txt"].startswith("caption without an image")
    assert roles[f"{folder}/c.gif"].startswith("not an image type kohya reads (.gif")
    assert roles[f"{folder}/sub/d.png"].startswith("not in a prepared image folder")
    assert roles[f"{tmp_path}/notes.md"].startswith("not in a prepared image folder")


@pytest.mark.slow
def test_prepared_dataset_end_to_end_is_used_byte_for_byte(tmp_path, repo_config, run_snakemake):
    """Through Snakemake: the dataset's images are the prepared files' bytes, captions travel, bad files
    are rows with reasons, a non-512 size is a warning, and no face detection ran (noise has no face)."""
    kohya = tmp_path / "data" / "eva" / "30_sks woman"
    prepared = [noise_image(kohya / "a.png", (512, 512), 0), noise_image(kohya / "b.png", (512, 512), 1),
                noise_image(kohya / "c.jpg", (640, 480), 2, "JPEG"), noise_image(kohya / "d.webp", (512, 512), 3)]
    (kohya / "a.txt").write_text("photo of sks woman, smiling\n")
    (kohya / "b.caption").write_text("sks woman in a red coat\n")
    noise_image(kohya / "tiny.png", (32, 32), 4)
    (kohya / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    noise_image(kohya / "anim.gif", (512, 512), 5, "GIF")
    noise_image(tmp_path / "photos" / "tom" / "t.jpg", (128, 128), 6)
    (tmp_path / "roster.tsv").write_text("subject\tclass_word\tsources\n"
                                         f"eva\t\t{tmp_path / 'data' / 'eva'}\n"
                                         "tom\tman\tphotos/tom\n")
    config = dict(repo_config, roster="roster.tsv")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    plan = run_snakemake(tmp_path, "-n", "results/eva/dataset/dataset.toml", "results/tom/dataset/dataset.toml",
                         cores=1).stdout
    jobs = {(rule, subject) for rule, subject in re.findall(r"rule (\w+):\n(?:    .*\n)*?    wildcards: subject=([\w-]+)", plan)}
    assert ("prepared_crops", "eva") in jobs and ("crop", "tom") in jobs
    assert ("crop", "eva") not in jobs and ("prepared_crops", "tom") not in jobs

    run_snakemake(tmp_path, "results/eva/dataset/dataset.toml", cores=1, timeout=900)
    folder = tmp_path / "results" / "eva" / "dataset" / "30_eva woman"  # repeats and class from the folder name
    images = sorted(p for p in folder.iterdir() if p.suffix != ".txt")
    assert sorted(sha(p) for p in images) == sorted(sha(p) for p in prepared)
    by_source = {}
    crops = pd.read_csv(tmp_path / "results/eva/crops/manifest.tsv", sep="\t", dtype=str, keep_default_na=False)
    for row in crops.itertuples():
        by_source[Path(row.source).name] = row
    for path in prepared:
        row = by_source[path.name]
        assert row.status == "kept" and row.detector == "prepared" and row.face_x == ""
        assert sha(folder / row.output) == sha(path)
    assert by_source["c.jpg"].reason == "size 640x480, not 512x512 (used as is: kohya buckets it)"
    assert by_source["a.png"].reason == ""
    assert (folder / by_source["a.png"].output).with_suffix(".txt").read_text() == "photo of sks woman, smiling\n"
    assert (folder / by_source["b.png"].output).with_suffix(".txt").read_text() == "sks woman in a red coat\n"
    assert not (folder / by_source["c.jpg"].output).with_suffix(".txt").exists()
    assert by_source["tiny.png"].status == "rejected" and by_source["tiny.png"].reason.startswith("too small")
    assert by_source["broken.png"].reason.startswith("undecodable")
    assert by_source["anim.gif"].reason.startswith("not an image type kohya reads")
    assert not any(name.endswith((".txt", ".caption")) for name in by_source)  # captions are no photo rows
    assert (tmp_path / "results/eva/crops/contact_sheet.png").is_file()
    toml = (tmp_path / "results/eva/dataset/dataset.toml").read_text()
    assert f'image_dir = "{folder}"' in toml and "num_repeats = 30" in toml
    assert os.path.isabs(str(folder))
    assert str(kohya / "a.txt") in list_source_files(str(tmp_path / "data" / "eva"))  # editing a caption reruns


def test_exif_rotated_images_are_trained_as_stored_and_said(tmp_path):
    """kohya (and tifactory) train a prepared image as stored: an EXIF orientation tag gets a warning in the crop
    manifest, with the size training sees (the stored one), not the upright size."""
    from support.photos import collect_settings
    from tifactory.photos.collect import collect_photos
    from tifactory.photos.prepared import adopt_prepared

    folder = tmp_path / "eva" / "10_eva woman"
    rotated = noise_image(folder / "rotated.jpg", (450, 280), seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to view": upright it is 280x450
    Image.open(rotated).save(rotated, exif=exif)
    noise_image(folder / "plain.jpg", (512, 512), seed=2)
    collect_photos([str(tmp_path / "eva")], tmp_path / "raw.tsv", collect_settings(), prepared=True)
    manifest = adopt_prepared(tmp_path / "raw.tsv", tmp_path / "crops", resolution=512, contact_sheet=False)
    rows = {Path(row["source"]).name: row for row in manifest.to_dict("records")}
    assert rows["rotated.jpg"]["status"] == "kept"
    reason = rows["rotated.jpg"]["reason"]
    assert reason.startswith("orientation tag 6 present: trained as stored (450x280, turned), not upright")
    assert "size 450x280, not 512x512" in reason  # the size training sees
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (450, 280)
    assert rows["plain.jpg"]["reason"] == ""
    with Image.open(tmp_path / "crops" / rows["rotated.jpg"]["output"]) as adopted:
        assert adopted.size == (450, 280)  # byte for byte: what training reads
