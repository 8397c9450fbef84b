"""Prepared kohya datasets: the subject's images are used as they are, in place of the crop stage.

A prepared subject (tifactory.sources.source_kind) is collected like any other (every file one raw-manifest
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

from tifactory.fileio import atomic_path, write_tsv_atomic
from tifactory.sources import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS

CAPTION = "caption"  # prepared_file_roles' role of a caption file beside an image
PREPARED_DETECTOR = "prepared"  # the crop manifest's `detector` of adopted images (none ran)
SIZE_WARNING = "size"  # head of the kept rows' warning reason (a summary counts it as one category)
# extra crop-manifest columns of adopted images: their size and the caption file carried with them
EXTRA_COLUMNS = ["width", "height", "caption"]
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def prepared_file_roles(files: list[str], image_folders: list[str]) -> dict[str, str | None]:
    """{file: None (an image to use) | CAPTION (a caption beside an image) | why it is not used}.

    Paths are compared as given (the caller passes absolute paths for both). kohya reads the image
    folders' own files only, so files elsewhere (a parent folder's notes, a subfolder) are not used.
    """
    folders = {os.path.normpath(folder) for folder in image_folders}
    images_by_stem = {os.path.splitext(path)[0] for path in files
                      if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS}
    roles: dict[str, str | None] = {}
    for path in files:
        stem, extension = os.path.splitext(path)
        extension = extension.lower()
        if os.path.normpath(os.path.dirname(path)) not in folders:
            roles[path] = "not in a prepared image folder (kohya reads only the files of the `N_name class/` folders)"
        elif extension in IMAGE_EXTENSIONS:
            roles[path] = None
        elif extension in CAPTION_EXTENSIONS:
            roles[path] = CAPTION if stem in images_by_stem else "caption without an image of the same name"
        else:
            roles[path] = (f"not an image type kohya reads ({extension or 'no extension'}; "
                           f"{' '.join(IMAGE_EXTENSIONS)}): convert it, or set prepared to no to crop it")
    return roles


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


def adopt_prepared(raw_manifest: str | os.PathLike, out_dir: str | os.PathLike, *, resolution: int,
                   contact_sheet: bool = True):
    """Copy the kept images of a prepared subject's raw manifest into `out_dir` unchanged (+ captions as
    `<name>.txt`), write `out_dir/manifest.tsv` (crop manifest columns + width, height, caption) and the
    contact sheet; return the manifest DataFrame. Rejected raw rows stay rejected with their reason."""
    import pandas as pd

    from tifactory.collect import read_raw_manifest
    from tifactory.crop import CROP_MANIFEST_COLUMNS
    from tifactory.dataset import CAPTION_EXTENSION

    raw = read_raw_manifest(raw_manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, record in enumerate(raw.to_dict("records")):
        row = {column: None for column in CROP_MANIFEST_COLUMNS + EXTRA_COLUMNS}
        row.update(source=record["source"], status="rejected", reason=record["reason"], output="",
                   detector=PREPARED_DETECTOR, caption="")
        if record["status"] == "kept":
            width, height = int(record["width"]), int(record["height"])
            name = adopted_name(index, record["source"])
            with atomic_path(out_dir / name) as tmp_path:
                shutil.copyfile(record["file"], tmp_path)
            caption = find_caption(record["file"])
            if caption is not None:
                with atomic_path((out_dir / name).with_suffix(CAPTION_EXTENSION)) as tmp_path:
                    shutil.copyfile(caption, tmp_path)
            row.update(status="kept", output=name, reason=size_warning(width, height, resolution),
                       width=width, height=height, caption=str(caption or ""))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=CROP_MANIFEST_COLUMNS + EXTRA_COLUMNS)
    for column in ("width", "height"):
        frame[column] = frame[column].astype("Int64")
    write_tsv_atomic(out_dir / "manifest.tsv", frame)
    if contact_sheet:
        from tifactory.contact_sheet import make_contact_sheet

        make_contact_sheet(frame, out_dir, out_dir / "contact_sheet.png",
                           files={str(r["source"]): str(r["file"] or r["source"]) for r in raw.to_dict("records")})
    return frame
