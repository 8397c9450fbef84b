"""Tests for tifactory.photos.collect: decoding, EXIF orientation, rejects, duplicates, manifest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from support.photos import collect_settings
from tifactory.photos.collect import (
    RAW_MANIFEST_COLUMNS,
    collect_photos,
    load_upright_rgb,
    pixel_sha256,
    read_raw_manifest,
)
from tifactory.demo.photos import package_file


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    with Image.open(package_file("skimage", "data/astronaut.png")) as image:
        return image.convert("RGB")


def _row(frame: pd.DataFrame, path: Path) -> pd.Series:
    hits = frame[frame["source"] == os.path.abspath(path)]
    assert len(hits) == 1, (path, frame["source"].tolist())
    return hits.iloc[0]


def _store_rotated_jpeg(upright: Image.Image, path: Path, orientation: int) -> None:
    """Save `upright` as a JPEG whose pixels are stored rotated and whose EXIF tag undoes that."""
    stored = upright.transpose(
        Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, astronaut, orientation):
    upright = astronaut.crop((60, 0, 460, 512))  # 400 x 512: not square, so the size shows rotation
    photos = tmp_path / "photos"
    photos.mkdir()
    rotated = photos / "b_rotated.jpg"
    _store_rotated_jpeg(upright, rotated, orientation)

    with Image.open(rotated) as raw:
        assert raw.size == (512, 400)  # stored sideways
        stored_pixels = raw.convert("RGB")
    # lossless reference: the decoded stored pixels turned upright by hand, saved as PNG
    by_hand = stored_pixels.transpose(
        Image.Transpose.ROTATE_270 if orientation == 6 else Image.Transpose.ROTATE_90
    )
    reference = photos / "a_reference.png"
    by_hand.save(reference)

    frame = collect_photos([str(photos)], tmp_path / "raw.tsv", collect_settings())
    jpeg_row, png_row = _row(frame, rotated), _row(frame, reference)
    assert (jpeg_row["width"], jpeg_row["height"]) == (400, 512)
    assert jpeg_row["exif_orientation"] == orientation
    assert png_row["exif_orientation"] == 1
    assert jpeg_row["pixel_sha256"] == png_row["pixel_sha256"]
    assert png_row["status"] == "kept"
    assert jpeg_row["status"] == "rejected"
    assert jpeg_row["reason"] == f"duplicate of {os.path.abspath(reference)}"

    # and upright really is upright: close to the original pixels (JPEG noise only)
    loaded = load_upright_rgb(rotated)
    assert loaded.mode == "RGB" and loaded.size == upright.size
    diff = np.abs(np.asarray(loaded, dtype=np.int16) - np.asarray(upright, dtype=np.int16))
    assert diff.mean() < 6


def test_bad_files_are_rejected_with_reason(tmp_path, astronaut):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    good = photos / "good.png"
    astronaut.save(good)
    png_named_jpg = photos / "sub" / "really_a_png.jpg"  # type is decided by decoding
    astronaut.crop((0, 0, 300, 200)).save(png_named_jpg, format="PNG")
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "notes.jpg").write_text("this is not a photo\n", encoding="utf-8")
    (photos / "noise.png").write_bytes(bytes(range(256)) * 8)
    full_jpeg = photos / "whole.jpg"
    astronaut.save(full_jpeg, format="JPEG")
    (photos / "truncated.jpg").write_bytes(full_jpeg.read_bytes()[:4000])
    full_jpeg.unlink()
    (photos / ".hidden.png").write_bytes(good.read_bytes())
    (photos / ".cache").mkdir()
    astronaut.save(photos / ".cache" / "thumb.png")

    frame = collect_photos([str(photos)], tmp_path / "raw.tsv", collect_settings())
    by_name = {Path(s).name: row for s, row in zip(frame["source"], frame.to_dict("records"))}
    assert set(by_name) == {
        "good.png",
        "really_a_png.jpg",
        "empty.jpg",
        "notes.jpg",
        "noise.png",
        "truncated.jpg",
    }
    assert by_name["good.png"]["status"] == "kept"
    assert by_name["really_a_png.jpg"]["status"] == "kept"
    assert (by_name["really_a_png.jpg"]["width"], by_name["really_a_png.jpg"]["height"]) == (300, 200)
    assert by_name["empty.jpg"]["reason"] == "undecodable: empty file"
    for name in ("notes.jpg", "noise.png", "truncated.jpg"):
        row = by_name[name]
        assert row["status"] == "rejected"
        assert row["reason"].startswith("undecodable: "), row["reason"]
        assert str(photos) not in row["reason"]  # short error, no path
        assert "\t" not in row["reason"] and "\n" not in row["reason"]
        assert row["pixel_sha256"] == ""
    assert list(frame["source"]) == sorted(frame["source"])


def test_too_small_and_alpha(tmp_path, astronaut):
    photos = tmp_path / "photos"
    photos.mkdir()
    astronaut.resize((50, 40)).save(photos / "tiny.png")
    rgba = astronaut.convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, 100, 100))
    rgba.putalpha(alpha)
    rgba.save(photos / "transparent.png")

    frame = collect_photos([str(photos)], tmp_path / "raw.tsv", collect_settings())
    tiny = _row(frame, photos / "tiny.png")
    assert tiny["status"] == "rejected" and tiny["reason"].startswith("too small (50x40")
    transparent = _row(frame, photos / "transparent.png")
    assert transparent["status"] == "kept"
    flattened = load_upright_rgb(photos / "transparent.png")
    assert flattened.mode == "RGB"
    assert flattened.getpixel((10, 10)) == (255, 255, 255)  # alpha flattened on white
    assert transparent["pixel_sha256"] == ""  # only computed to confirm an exact duplicate
    assert "alpha-flattened" in transparent["colour"]

    strict = collect_photos([str(photos)], tmp_path / "raw2.tsv", collect_settings(min_side_px=600))
    assert set(strict["status"]) == {"rejected"}


def test_duplicates_keep_first_in_sorted_order(tmp_path, astronaut):
    photos = tmp_path / "photos"
    (photos / "z").mkdir(parents=True)
    first = photos / "a.png"
    astronaut.save(first)
    shutil.copyfile(first, photos / "z" / "copy.png")
    shutil.copyfile(first, photos / "b.png")
    astronaut.save(photos / "c.bmp", format="BMP")  # other format, same pixels
    astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "d.png")  # different

    frame = collect_photos([str(photos)], tmp_path / "raw.tsv", collect_settings())
    assert _row(frame, first)["status"] == "kept"
    assert _row(frame, photos / "d.png")["status"] == "kept"
    for name in ("b.png", "c.bmp", "z/copy.png"):
        row = _row(frame, photos / name)
        assert row["status"] == "rejected"
        assert row["reason"] == f"duplicate of {os.path.abspath(first)}"


def test_missing_sources_and_globs(tmp_path, astronaut):
    photos = tmp_path / "photos"
    photos.mkdir()
    astronaut.save(photos / "one.png")
    astronaut.crop((0, 256, 256, 512)).save(photos / "two.jpg")  # not a near-duplicate of one.png
    missing = tmp_path / "no_such_folder"
    sources = [str(missing), str(photos / "*.gif"), str(photos / "*.png"), str(photos / "*.jpg")]

    frame = collect_photos(sources, tmp_path / "out" / "raw.tsv", collect_settings())
    assert list(frame.columns) == RAW_MANIFEST_COLUMNS
    missing_row = _row(frame, missing)
    assert (missing_row["status"], missing_row["reason"]) == ("rejected", "source not found")
    glob_row = _row(frame, photos / "*.gif")
    assert (glob_row["status"], glob_row["reason"]) == ("rejected", "no files matched")
    assert _row(frame, photos / "one.png")["status"] == "kept"
    assert _row(frame, photos / "two.jpg")["status"] == "kept"
    assert len(frame) == 4

    # a folder and a glob naming the same file list it once
    again = collect_photos([str(photos), str(photos / "*.png")], tmp_path / "raw2.tsv", collect_settings())
    assert len(again) == 2 and set(again["status"]) == {"kept"}


def test_manifest_round_trip_and_determinism(tmp_path, astronaut):
    photos = tmp_path / "photos"
    photos.mkdir()
    astronaut.save(photos / "a.png")
    (photos / "bad.jpg").write_text("nope", encoding="utf-8")
    first = tmp_path / "m1" / "raw.tsv"
    second = tmp_path / "m2" / "raw.tsv"
    frame = collect_photos([str(photos)], first, collect_settings())
    collect_photos([str(photos)], second, collect_settings())
    assert first.read_bytes() == second.read_bytes()
    assert not [p for p in first.parent.iterdir() if p.name != "raw.tsv"]  # no temp files left

    back = read_raw_manifest(first)
    assert list(back.columns) == RAW_MANIFEST_COLUMNS
    assert back["width"].tolist() == frame["width"].tolist()
    assert back["status"].tolist() == ["kept", "rejected"]
    assert pd.isna(back.loc[1, "width"]) and back.loc[1, "pixel_sha256"] == ""


@pytest.mark.parametrize("fmt,suffix", [("HEIF", "heic"), ("AVIF", "avif")])
def test_phone_photos_heic_and_avif_decode_upright(tmp_path, astronaut, fmt, suffix):
    """iPhones save HEIC, many phones AVIF: both are collected, upright by their EXIF orientation (6: the
    stored pixels are turned a quarter), and the face is found in them."""
    from tifactory.faces.detection import YuNetDetector

    upright = astronaut.crop((60, 0, 460, 512))
    photos = tmp_path / "photos"
    photos.mkdir()
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = photos / f"phone.{suffix}"
    if fmt == "HEIF":  # written by pillow-heif directly: this test must not register PIL's HEIF opener itself
        import pillow_heif

        pillow_heif.from_pillow(stored).save(path, quality=90, exif=exif.tobytes())
    else:
        stored.save(path, format=fmt, quality=90, exif=exif.tobytes())
    frame = collect_photos([str(photos)], tmp_path / "raw.tsv", collect_settings())
    row = _row(frame, path)
    assert row["status"] == "kept" and row["format"] == fmt, row.to_dict()
    assert (row["width"], row["height"]) == (400, 512)
    loaded = load_upright_rgb(path)
    assert loaded.size == upright.size
    diff = np.abs(np.asarray(loaded, dtype=np.int16) - np.asarray(upright, dtype=np.int16))
    assert diff.mean() < 8
    faces = YuNetDetector(score_threshold=0.6, max_side=640).detect(np.asarray(loaded))
    assert len(faces) == 1 and faces[0].landmarks[0][1] < faces[0].landmarks[3][1]  # eyes above the mouth
