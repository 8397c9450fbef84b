"""The face subsystem on real photos shipped inside installed packages: scikit-image's astronaut (and
transformed copies of it) against the six people of insightface's t1.jpg and its Tom_Hanks_54745.png, through
dlib's recogniser (the default: no model pack anywhere) and the crop stage's identity filter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from support.photos import collect_settings, package_photo
from tifactory.photos.collect import collect_photos
from tifactory.photos.crop import CropSettings, crop_faces, read_identity
from tifactory.faces.identity import majority_reference
from tifactory.faces.models import FaceModelError, FaceSettings, load_detector, load_recogniser, resolve
from tifactory.faces.recognition import Metric
from tifactory.summary import summarize_crops

# the six faces of t1.jpg (x0, y0, x1, y1), each cut out with its surroundings
T1_PEOPLE = [(10, 180, 260, 480), (380, 180, 640, 480), (820, 0, 1060, 260), (200, 60, 420, 330),
             (680, 270, 920, 560), (1060, 200, 1280, 480)]


def astronaut_copies(astronaut) -> list[Image.Image]:
    """Eight photos of one person: itself, mirrored, turned both ways, darker, more contrast, smaller, greyer;
    enlarged 1.5x (the crops then need no upscale beyond the crop stage's limit)."""
    copies = [astronaut, ImageOps.mirror(astronaut), astronaut.rotate(8, resample=Image.Resampling.BICUBIC),
            astronaut.rotate(-6, resample=Image.Resampling.BICUBIC), ImageEnhance.Brightness(astronaut).enhance(0.7),
            ImageEnhance.Contrast(astronaut).enhance(1.4), astronaut.resize((380, 380), Image.Resampling.LANCZOS),
            ImageEnhance.Color(astronaut).enhance(0.3)]
    return [copy.resize((copy.width * 3 // 2, copy.height * 3 // 2), Image.Resampling.BICUBIC) for copy in copies]


def other_people() -> list[Image.Image]:
    t1 = package_photo("insightface", "data/images/t1.jpg")
    people = [t1.crop(box) for box in T1_PEOPLE]
    people = [person.resize((person.width * 2, person.height * 2), Image.Resampling.BICUBIC) for person in people]
    hanks = package_photo("insightface", "data/images/Tom_Hanks_54745.png")
    return people + [hanks.resize((336, 336), Image.Resampling.BICUBIC)]


def place(photo: Image.Image, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    canvas = Image.new("RGB", (1200, 900), tuple(int(v) for v in rng.integers(60, 190, 3)))
    canvas.paste(photo, (int(rng.integers(0, 1200 - photo.width)), int(rng.integers(0, 900 - photo.height))))
    return canvas


@pytest.fixture(scope="module")
def face_settings(repo_config) -> FaceSettings:
    return FaceSettings.from_config(repo_config["faces"])


@pytest.fixture(scope="module")
def dlib_models(face_settings):
    settings = FaceSettings.from_config({**vars(face_settings), "recogniser": "dlib", "detector": "yunet"})
    return load_detector(settings)[0], load_recogniser(settings)[0]


def embed(models, image: Image.Image):
    detector, recogniser = models
    pixels = np.asarray(image)
    faces = detector.detect(pixels)
    assert faces, "no face found"
    return recogniser.embed(pixels, faces[0])


def test_fresh_install_resolves_to_yunet_and_dlib(face_settings, tmp_path):
    """No insightface pack: `auto` means YuNet + dlib, named with dlib's metric and threshold."""
    settings = FaceSettings.from_config(vars(face_settings), insightface_pack=str(tmp_path / "absent"))
    resolved = resolve(settings)
    assert (resolved.detector, resolved.recogniser) == ("yunet", "dlib")
    assert "euclidean distance, same person < 0.60" in resolved.recogniser_note
    with pytest.raises(FaceModelError, match="arcface needs a pack"):
        resolve(FaceSettings.from_config(vars(settings), recogniser="arcface"))
    with pytest.raises(FaceModelError, match="insightface needs a pack"):
        resolve(FaceSettings.from_config(vars(settings), detector="insightface"))
    with pytest.raises(FaceModelError, match="unknown recogniser"):
        FaceSettings.from_config(vars(settings), recogniser="facenet")


def test_dlib_separates_the_astronaut_from_seven_other_people(dlib_models, astronaut):
    metric = dlib_models[1].metric
    assert (metric.kind, metric.threshold) == ("distance", 0.6)
    reference = embed(dlib_models, astronaut)
    assert reference.shape == (128,)
    same = [metric.compare(embed(dlib_models, place(copy, i)), reference)
            for i, copy in enumerate(astronaut_copies(astronaut)[1:])]
    others = [metric.compare(embed(dlib_models, place(person, i)), reference) for i, person in enumerate(other_people())]
    assert max(same) < 0.45 and all(metric.same(value) for value in same), same
    assert min(others) > 0.6 and not any(metric.same(value) for value in others), others


def test_pooled_dlib_gives_the_same_descriptors_from_several_threads(face_settings, dlib_models, astronaut):
    """With several crop threads dlib runs in worker processes (it keeps the GIL while it computes): the
    descriptors are the in-process ones, whichever thread asks, and close() stops the workers."""
    from concurrent.futures import ThreadPoolExecutor

    from tifactory.faces.models import FaceModels
    from tifactory.faces.recognition import PooledDlibRecogniser

    detector, single = dlib_models
    photos = [np.asarray(place(copy, i)) for i, copy in enumerate(astronaut_copies(astronaut)[:4])]
    faces = [detector.detect(photo)[0] for photo in photos]
    models = FaceModels(FaceSettings.from_config({**vars(face_settings), "recogniser": "dlib"}), threads=2)
    pooled = models.recogniser()
    assert isinstance(pooled, PooledDlibRecogniser) and pooled.metric == single.metric
    workers = list(pooled._pool._processes.values())
    assert len(workers) == 2 and all(worker.is_alive() for worker in workers)
    with ThreadPoolExecutor(2) as threads:
        vectors = list(threads.map(pooled.embed, photos, faces))
    for vector, photo, face in zip(vectors, photos, faces):
        np.testing.assert_array_equal(vector, single.embed(photo, face))
    models.close()
    assert not any(worker.is_alive() for worker in workers)
    # where fork is unavailable (Windows) or unsafe (macOS) the workers are spawned: the same descriptors
    spawned = PooledDlibRecogniser(max_distance=single.metric.threshold, processes=2, start_method="spawn")
    with ThreadPoolExecutor(2) as threads:
        vectors = list(threads.map(spawned.embed, photos, faces))
    spawned.close()
    for vector, photo, face in zip(vectors, photos, faces):
        np.testing.assert_array_equal(vector, single.embed(photo, face))


def test_metric_explains_its_decision():
    distance, cosine = Metric("distance", 0.6), Metric("cosine", 0.4)
    assert distance.explain(0.71) == "distance 0.71 > 0.60" and cosine.explain(0.21) == "cosine 0.21 < 0.40"
    assert distance.same(0.59) and not distance.same(0.6) and cosine.same(0.4) and not cosine.same(0.39)
    assert distance.similarity(0.25) == pytest.approx(0.75) and distance.similarity(1.3) == 0.0
    # majority: three of one person beat two of another; a tie is no clear majority
    one, two = np.zeros(4), np.array([1.0, 0, 0, 0])
    ref = majority_reference([one, one + 0.01, one - 0.01, two, two], distance, min_share=0.5)
    assert ref.usable and ref.group == 3 and ref.members == (0, 1, 2)
    tie = majority_reference([one, one, two, two], distance, min_share=0.5)
    assert not tie.usable and "no clear majority among 4 faces" in tie.note


def _subject_folder(tmp_path, astronauts, others):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, photo in enumerate(astronauts):
        place(photo, 10 + i).save(photos / f"astronaut_{i}.jpg", quality=92)
    for i, photo in enumerate(others):
        place(photo, 50 + i).save(photos / f"other_{i}.jpg", quality=92)
    collect_photos([str(photos)], tmp_path / "raw.tsv", collect_settings())
    return photos


def _rows(frame):
    return {name.rsplit("/", 1)[-1]: row for name, row in zip(frame["source"], frame.to_dict("records"))}


def test_identity_filter_keeps_the_majority_and_rejects_the_others(tmp_path, repo_config, astronaut):
    """Default config (fresh install): a folder with 8 astronaut photos and 7 other people keeps the astronaut."""
    _subject_folder(tmp_path, astronaut_copies(astronaut), other_people())
    said = []
    settings = CropSettings.from_config(repo_config, resolution=512, faces={"insightface_pack": str(tmp_path / "no-pack")})
    assert settings.identity_filter  # on by default
    frame = crop_faces(tmp_path / "raw.tsv", tmp_path / "crops", tmp_path / "crops.tsv", settings, workers=2,
                       log=said.append)
    rows = _rows(frame)
    for i in range(8):
        row = rows[f"astronaut_{i}.jpg"]
        assert row["status"] == "kept" and row["identity_score"] < 0.6 and row["identity_metric"] == "dlib distance", row
    for i in range(7):
        row = rows[f"other_{i}.jpg"]
        assert row["status"] == "rejected", row
        assert row["reason"].startswith("different person (distance 0.") and row["reason"].endswith(
            " > 0.60 to the subject's reference)"), row["reason"]
    assert any("reference = the majority identity: 8 of 15 faces are one person" in line for line in said)
    identity = read_identity(tmp_path / "crops")
    assert identity["filter"] == "on" and identity["model"] == "dlib" and identity["rejected"] == 7
    # counted in the roster summary, and shown on the contact sheet (which draws the manifest's reasons)
    (tmp_path / "crops" / "manifest.tsv").write_bytes((tmp_path / "crops.tsv").read_bytes())
    table = summarize_crops({"s": tmp_path / "crops" / "manifest.tsv"}, tmp_path / "summary.tsv")
    assert int(table.loc[0, "different person"]) == 7 and table.loc[0, "identity"].startswith("dlib distance: on")
    assert (tmp_path / "crops" / "contact_sheet.png").is_file()


def test_reference_photos_decide_and_no_majority_is_said(tmp_path, repo_config, astronaut):
    """Three astronauts among seven others: no majority (said, nothing filtered); with a reference photo of
    the astronaut, the seven others are rejected."""
    _subject_folder(tmp_path, astronaut_copies(astronaut)[1:4], other_people())
    settings = CropSettings.from_config(repo_config, resolution=512, faces={"insightface_pack": str(tmp_path / "no-pack")})
    said = []
    frame = crop_faces(tmp_path / "raw.tsv", tmp_path / "c1", tmp_path / "c1.tsv", settings, log=said.append)
    assert (frame["status"] == "kept").all()
    assert any("no clear majority among 10 faces" in line and "identity NOT filtered" in line for line in said)
    assert read_identity(tmp_path / "c1")["filter"] == "not applied"

    reference = tmp_path / "reference.png"
    astronaut.save(reference)
    rows = _rows(crop_faces(tmp_path / "raw.tsv", tmp_path / "c2", tmp_path / "c2.tsv", settings,
                            reference_photos=[reference], log=said.append))
    assert [rows[f"astronaut_{i}.jpg"]["status"] for i in range(3)] == ["kept"] * 3
    assert all(rows[f"other_{i}.jpg"]["reason"].startswith("different person (distance") for i in range(7))
    assert read_identity(tmp_path / "c2")["reference"] == "reference photos"


def test_identity_filter_can_be_switched_off(tmp_path, repo_config, astronaut):
    _subject_folder(tmp_path, [astronaut], other_people()[:2])
    settings = CropSettings.from_config(repo_config, resolution=512, identity_filter=False)
    said = []
    frame = crop_faces(tmp_path / "raw.tsv", tmp_path / "c", tmp_path / "c.tsv", settings, log=said.append)
    assert (frame["status"] == "kept").all() and frame["identity_score"].isna().all()
    assert "identity filter: off (crop.identity_filter: false)" in said
    assert json.loads((tmp_path / "c" / "identity.json").read_text())["filter"] == "off"
