"""Prepared kohya datasets: the subject's images are used as they are, in place of the crop stage.

A prepared subject (tifactory.photos.sources.source_kind) is collected like any other (every file one raw-manifest
row, kept or rejected: undecodable, too small, not in an image folder, not an image type kohya reads), then
`adopt_prepared` writes `results/S/crops/` as the crop stage would: the kept images copied byte for byte
(no face detection, no re-framing, no re-encoding), their captions beside them as `<name>.txt`, and a crop
manifest whose rows say `detector: prepared`; a size other than the training resolution is a warning in
the kept row's reason (`size 640x480, not 512x512 (used as is)`), not a re-crop.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from tifactory.fileio import atomic_path, write_text_atomic, write_tsv_atomic
from tifactory.photos.sources import CAPTION_EXTENSIONS

PREPARED_DETECTOR = "prepared"  # the crop manifest's `detector` of adopted images (none ran)
SIZE_WARNING = "size"  # head of the kept rows' warning reason (a summary counts it as one category)
# extra crop-manifest columns of adopted images: their size and the caption file carried with them
EXTRA_COLUMNS = ["width", "height", "caption"]
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def find_caption(image_path: str | os.PathLike) -> Path | None:
    """The caption file beside an image (`a.txt`, else `a.caption`), or None."""
    for extension in CAPTION_EXTENSIONS:
        candidate = Path(image_path).with_suffix(extension)
        if candidate.is_file():
            return candidate
    return None


def adopted_name(index: int, source: str) -> str:
    """`<index:03d>_<safe stem><extension>`: a bare, unique, shell-safe name with the image's own extension."""
    stem, extension = os.path.splitext(os.path.basename(source))
    safe = _NAME_CHARS.sub("_", stem).strip("._-")[:80].strip("._-") or "image"
    return f"{index:03d}_{safe}{extension.lower()}"


def size_warning(width: int, height: int, resolution: int) -> str:
    if (width, height) == (resolution, resolution):
        return ""
    return f"{SIZE_WARNING} {width}x{height}, not {resolution}x{resolution} (used as is: kohya buckets it)"


ORIENTATION_WARNING = "orientation tag"  # head of the warning for EXIF-rotated images (trained as stored)
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees (width and height swap)


def stored_size(width: int, height: int, orientation) -> tuple[int, int]:
    """The size as stored in the file (what training reads) from the upright size and the EXIF orientation."""
    return (height, width) if _orientation(orientation) in _SWAPS_SIDES else (width, height)


def _orientation(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1  # no tag (NA) or unreadable: upright


def orientation_warning(orientation, width: int, height: int) -> str:
    """The warning for an image whose EXIF tag asks viewers to turn it: kohya and tifactory train it as stored."""
    tag = _orientation(orientation)
    if tag in (0, 1):
        return ""
    stored = stored_size(width, height, tag)
    turned = "turned" if tag in _SWAPS_SIDES else "mirrored or upside down"
    return (f"{ORIENTATION_WARNING} {tag} present: trained as stored ({stored[0]}x{stored[1]}, {turned}), not "
            "upright; save the image upright to train it upright")


def adopt_prepared(raw_manifest: str | os.PathLike, out_dir: str | os.PathLike, *, resolution: int,
                   contact_sheet: bool = True):
    """Copy the kept images of a prepared subject's raw manifest into `out_dir` unchanged (+ captions as
    `<name>.txt`), write `out_dir/manifest.tsv` (crop manifest columns + width, height, caption) and the
    contact sheet; return the manifest DataFrame. Rejected raw rows stay rejected with their reason.
    Like the crop stage it writes `identity.json` (the identity filter does not run on a prepared dataset)."""
    import json

    import pandas as pd

    from tifactory.photos.collect import read_raw_manifest
    from tifactory.photos.crop import CROP_MANIFEST_COLUMNS, IDENTITY_FILE
    from tifactory.photos.dataset import CAPTION_EXTENSION

    raw = read_raw_manifest(raw_manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, record in enumerate(raw.to_dict("records")):
        row = {column: None for column in CROP_MANIFEST_COLUMNS + EXTRA_COLUMNS}
        row.update(source=record["source"], status="rejected", reason=record["reason"], output="",
                   detector=PREPARED_DETECTOR, caption="")
        if record["status"] == "kept":
            orientation = record.get("exif_orientation")
            # training reads the pixels as stored: the size (and the warnings) are that size, not the upright one
            width, height = stored_size(int(record["width"]), int(record["height"]), orientation)
            name = adopted_name(index, record["source"])
            with atomic_path(out_dir / name) as tmp_path:
                shutil.copyfile(record["file"], tmp_path)
            caption = find_caption(record["file"])
            if caption is not None:
                with atomic_path((out_dir / name).with_suffix(CAPTION_EXTENSION)) as tmp_path:
                    shutil.copyfile(caption, tmp_path)
            warnings = [orientation_warning(orientation, int(record["width"]), int(record["height"])),
                        size_warning(width, height, resolution)]
            row.update(status="kept", output=name, reason="; ".join(w for w in warnings if w),
                       width=width, height=height, caption=str(caption or ""))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=CROP_MANIFEST_COLUMNS + EXTRA_COLUMNS)
    for column in ("width", "height"):
        frame[column] = frame[column].astype("Int64")
    write_tsv_atomic(out_dir / "manifest.tsv", frame)
    identity = {"filter": "off", "note": "prepared dataset used as it is: no face detection, no identity filter"}
    write_text_atomic(out_dir / IDENTITY_FILE, json.dumps(identity, indent=2, sort_keys=True) + "\n")
    if contact_sheet:
        from tifactory.photos.contact_sheet import make_contact_sheet

        make_contact_sheet(frame, out_dir, out_dir / "contact_sheet.png",
                           files={str(r["source"]): str(r["file"] or r["source"]) for r in raw.to_dict("records")})
    return frame
