"""Crop accuracy on insightface's packaged photos (Tom_Hanks_54745.png, t1.jpg): placed on a real
background, scaled, stored with EXIF orientations 3/6/8 and cut at borders by the test, so the true face
position in every photo is known; a face cut by the border; the six-person group photo stored sideways;
and dominance (one big face among small ones, two similar faces)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from tifactory.photos.collect import collect_photos
from support.photos import collect_settings, run_crop
from tifactory.faces.detection import YuNetDetector
from support.photos import package_photo

# Tom_Hanks_54745.png is a 112x112 ArcFace-aligned face: its five landmarks sit at insightface's
# template (eyes, nose, mouth corners), independent of any detector
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]])
# YuNet's face boxes (x, y, w, h) in the pixels of the unplaced tiles (within a few px: the box varies
# a little with scale and surroundings), checked by test_reference_boxes
HANKS_FACE = (9.0, 2.0, 79.0, 112.0)  # Tom_Hanks_54745.png, measured on 3-4x enlargements
PERSON_BOX = (390, 200, 740, 650)  # one person of t1.jpg (the demo's t1person)
PERSON_FACE = (74.5, 67.0, 106.0, 145.5)


@pytest.fixture(scope="module")
def tiles() -> dict:
    t1 = package_photo("insightface", "data/images/t1.jpg")
    return {"hanks": (package_photo("insightface", "data/images/Tom_Hanks_54745.png"), HANKS_FACE),
            "person": (t1.crop(PERSON_BOX), PERSON_FACE), "t1": t1}


@pytest.fixture(scope="module")
def background() -> Image.Image:
    coffee = package_photo("skimage", "data/coffee.png")  # a real photo without a face
    return coffee.resize((1600, 1200), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))


def _place(background, tile, face, scale: float, x: int, y: int):
    """The tile scaled and pasted at (x, y) (it may hang over the border); the face box it then has."""
    canvas = background.copy()
    size = (round(tile.width * scale), round(tile.height * scale))
    canvas.paste(tile.resize(size, Image.Resampling.LANCZOS), (x, y))
    fx, fy, fw, fh = face
    sx, sy = size[0] / tile.width, size[1] / tile.height
    return canvas, (x + fx * sx, y + fy * sy, fw * sx, fh * sy)


def _save(upright: Image.Image, path: Path, orientation: int = 1) -> None:
    """A JPEG whose stored pixels EXIF `orientation` turns back into `upright`."""
    inverse = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    stored = upright.transpose(inverse[orientation]) if inverse[orientation] is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, format="JPEG", quality=93, exif=exif.tobytes())


def _rows(frame: pd.DataFrame) -> dict[str, dict]:
    return {Path(s).name: r for s, r in zip(frame["source"], frame.to_dict("records"))}


def test_reference_boxes(tiles, background):
    """The tiles' face boxes, and the detector's landmarks on Hanks against the ArcFace template."""
    detector = YuNetDetector(score_threshold=0.6, max_side=640)
    hanks, _ = tiles["hanks"]
    canvas, placed = _place(background, hanks, HANKS_FACE, 4.0, 300, 200)
    face = detector.detect(np.asarray(canvas))[0]
    assert np.abs(np.subtract((face.x, face.y, face.w, face.h), placed)).max() < 0.1 * 448
    landmarks = (np.array(face.landmarks) - (300, 200)) / 4
    assert np.abs(landmarks[:2] - ARCFACE_TEMPLATE[:2]).max() < 4  # the eyes: where alignment put them
    assert np.abs(landmarks - ARCFACE_TEMPLATE).max() < 7
    person, _ = tiles["person"]
    found = detector.detect(np.asarray(person))
    assert len(found) == 1
    assert np.allclose((found[0].x, found[0].y, found[0].w, found[0].h), PERSON_FACE, atol=6)


CASES = [  # name, tile, scale, x, y, EXIF orientation, at a border
    ("h_centre", "hanks", 4.0, 500, 300, 1, False),
    ("h_exif3", "hanks", 3.0, 300, 500, 3, False),
    ("h_exif6", "hanks", 3.5, 800, 250, 6, False),
    ("h_exif8", "hanks", 2.5, 1100, 600, 8, False),
    ("h_left_border", "hanks", 3.0, -20, 400, 1, True),
    ("p_exif6", "person", 2.0, 200, 150, 6, False),
    ("p_bottom_border", "person", 1.8, 900, 800, 3, True),
]


def test_hanks_and_t1_placed_scaled_rotated_and_at_borders(tmp_path, tiles, background):
    photos = tmp_path / "photos"
    photos.mkdir()
    detector = YuNetDetector(score_threshold=0.6, max_side=640)
    truth = {}
    for name, tile_name, scale, x, y, orientation, border in CASES:
        tile, face = tiles[tile_name]
        canvas, placed = _place(background, tile, face, scale, x, y)
        _save(canvas, photos / f"{name}.jpg", orientation)
        # the true face box: the detector on the upright in-memory canvas (no JPEG, no EXIF, no draft
        # decoding), which must agree with where the tile was put
        pristine = detector.detect(np.asarray(canvas))[0]
        box = (pristine.x, pristine.y, pristine.w, pristine.h)
        assert np.abs(np.subtract(box, placed)).max() < 0.12 * max(placed[2:]), (name, box, placed)
        truth[f"{name}.jpg"] = (box, scale, (x, y), tile_name, border)
    # Hanks cut by the left border: 29% of his face outside the photo (the detector's box, shrunk
    # to the visible part, shows 11% outside)
    canvas, _ = _place(background, *tiles["hanks"], 3.0, -90, 400)
    _save(canvas, photos / "h_cut.jpg")
    # the six-person group photo stored sideways (EXIF 8): still six faces, rejected as ambiguous
    _save(tiles["t1"], photos / "t1_group.jpg", 8)

    collect_photos([str(photos)], tmp_path / "raw.tsv", collect_settings(near_duplicate_distance=-1))
    frame = run_crop(tmp_path / "raw.tsv", tmp_path / "crops", tmp_path / "crops.tsv")
    rows = _rows(frame)
    assert rows["t1_group.jpg"]["reason"] == "ambiguous: 6 faces of similar size"
    assert rows["h_cut.jpg"]["status"] == "rejected"
    assert rows["h_cut.jpg"]["reason"].startswith("face cut at border ("), rows["h_cut.jpg"]["reason"]

    for name, ((fx, fy, fw, fh), scale, (x, y), tile_name, border) in truth.items():
        row = rows[name]
        assert row["status"] == "kept", (name, row["reason"])
        size = row["crop_size"]
        cx, cy, side = fx + fw / 2, fy + fh / 2, max(fw, fh)
        # crop centre column = true face centre; face centre at 0.45 of the crop's height; a border
        # may move the square off-centre by up to max_shift (0.2 of its side), the rest is padding
        slack = 0.2 if border else 0.0
        assert abs(row["crop_x"] + size / 2 - cx) / size < 0.03 + slack, name
        assert abs((cy - row["crop_y"]) / size - 0.45) < 0.03 + slack, name
        assert abs(row["face_px"] - side) / side < 0.05, (name, row["face_px"], side)
        assert row["face_share"] == pytest.approx(0.45, abs=0.03), name
        assert row["pad_share"] <= 0.15 and row["upscale"] < 1.0, name
        if border:
            assert row["pad_share"] > 0.0, name
        else:
            assert row["pad_share"] == 0.0, name
        with Image.open(tmp_path / "crops" / row["output"]) as crop:
            assert crop.size == (512, 512)
            seen = detector.detect(np.asarray(crop.convert("RGB")))
        # the saved crop shows the face where it was asked to be, at the asked size
        assert len(seen) == 1, name
        sx, sy = seen[0].center
        assert abs(sx / 512 - 0.5) < 0.04 + slack and abs(sy / 512 - 0.45) < 0.04 + slack, (name, sx, sy)
        assert seen[0].side / 512 == pytest.approx(0.45, abs=0.05), name
        if tile_name == "hanks":
            # independent of any detector: the ArcFace template's eyes, carried through placement and crop
            eyes = (ARCFACE_TEMPLATE[:2].mean(axis=0) * scale + (x, y) - (row["crop_x"], row["crop_y"])) / size
            assert abs(eyes[0] - 0.5) < 0.06 + slack and 0.30 < eyes[1] < 0.45, (name, eyes)


def test_dominant_face_kept_similar_faces_ambiguous(tmp_path, tiles, background):
    photos = tmp_path / "photos"
    photos.mkdir()
    hanks, hanks_face = tiles["hanks"]
    person, person_face = tiles["person"]
    # one big face, one small face in the background: the big one clearly dominates
    canvas, _ = _place(background, person, person_face, 2.0, 300, 150)
    canvas.paste(hanks.resize((170, 170), Image.Resampling.LANCZOS), (1250, 200))
    _save(canvas, photos / "a_dominant.jpg")
    # two faces of similar size: nobody dominates
    canvas, _ = _place(background, person, person_face, 1.6, 150, 300)
    canvas.paste(hanks.resize((290, 290), Image.Resampling.LANCZOS), (1000, 400))
    _save(canvas, photos / "b_two_faces.jpg")
    collect_photos([str(photos)], tmp_path / "raw.tsv", collect_settings(near_duplicate_distance=-1))
    rows = _rows(run_crop(tmp_path / "raw.tsv", tmp_path / "crops", tmp_path / "crops.tsv"))
    dominant = rows["a_dominant.jpg"]
    assert dominant["status"] == "kept" and dominant["n_faces"] == 2, dominant["reason"]
    assert dominant["face_x"] < 1000  # the big face, not the small one
    assert rows["b_two_faces.jpg"]["reason"] == "ambiguous: 2 faces of similar size"
    assert rows["b_two_faces.jpg"]["n_faces"] == 2
    # the dominance ratio is the knob: demand more and the small face makes the photo ambiguous
    strict = _rows(run_crop(tmp_path / "raw.tsv", tmp_path / "c2", tmp_path / "c2.tsv", dominance_ratio=20))
    assert strict["a_dominant.jpg"]["reason"] == "ambiguous: 2 faces of similar size"
