"""Stage 1: collect raw photos into a manifest (nothing is copied; later stages re-read the source).

Every item found becomes one manifest row, kept or rejected with a reason: bad input is data.
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path

from tifactory.fileio import write_tsv_atomic

RAW_MANIFEST_COLUMNS = [
    "source",
    "status",
    "reason",
    "width",
    "height",
    "pixel_sha256",
    "exif_orientation",
]

_GLOB_CHARS = set("*?[")
_EXIF_ORIENTATION_TAG = 0x0112
_MAX_ERROR_CHARS = 120


def _decode(path: str | os.PathLike):
    """Decode `path` with PIL; return (EXIF-upright RGB image, orientation tag or None).

    Raises whatever PIL raises for undecodable input.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        opened.load()
        image = opened
        orientation = None
        try:
            raw_orientation = opened.getexif().get(_EXIF_ORIENTATION_TAG)
            if raw_orientation is not None:
                orientation = int(raw_orientation)
        except Exception:  # malformed EXIF: treat as "no orientation"
            orientation = None
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            try:
                image = ImageOps.exif_transpose(opened)
            except Exception:  # malformed EXIF block: keep the stored orientation
                image = opened
        rgb = _to_rgb(image)
        if rgb is opened:
            rgb = rgb.copy()
    return rgb, orientation


def _to_rgb(image):
    """Convert any PIL mode to RGB; transparency is flattened onto white."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer or float greyscale: scale into 8 bits instead of clipping
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = float(values.max()) if values.size else 0.0
        if top > 255.0:
            values = values * (255.0 / (65535.0 if top <= 65535.0 else top))
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def load_upright_rgb(path: str | os.PathLike):
    """Load `path` as an EXIF-upright RGB PIL image (alpha flattened on white). Raises if undecodable."""
    return _decode(path)[0]


def pixel_sha256(image) -> str:
    """SHA-256 of the decoded pixels of an RGB PIL image (size included, so reshapes differ)."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode("ascii"))
    digest.update(image.tobytes())
    return digest.hexdigest()


def _short_error(exc: BaseException, path: str) -> str:
    message = str(exc) or type(exc).__name__
    # PIL messages often embed the full path; the manifest already has it
    message = message.replace(repr(path), "file").replace(path, "file")
    message = " ".join(message.split())  # no tabs/newlines in a TSV cell
    if not message.lower().startswith(type(exc).__name__.lower()):
        message = f"{type(exc).__name__}: {message}"
    if len(message) > _MAX_ERROR_CHARS:
        message = message[: _MAX_ERROR_CHARS - 3] + "..."
    return message


def _expand_source(source: str) -> tuple[list[str], str | None]:
    """Return (absolute file paths, problem) for one source: a folder, a file, or a glob pattern."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith("."):
                    continue
                full = Path(dirpath) / name
                if full.is_file():
                    files.append(os.path.abspath(full))
        return sorted(files), None
    if path.is_file():
        return [os.path.abspath(path)], None
    if _GLOB_CHARS & set(source):
        matched = []
        for hit in glob.glob(str(path), recursive=True):
            hit_path = Path(hit)
            if hit_path.is_file() and not hit_path.name.startswith("."):
                matched.append(os.path.abspath(hit_path))
        if not matched:
            return [], "no files matched"
        return sorted(matched), None
    return [], "source not found"


def _empty_row(source: str) -> dict:
    return {
        "source": source,
        "status": "rejected",
        "reason": "",
        "width": None,
        "height": None,
        "pixel_sha256": "",
        "exif_orientation": None,
    }


def collect_photos(
    sources: list[str] | str,
    manifest_path: str | os.PathLike,
    *,
    min_side_px: int = 64,
):
    """Scan `sources`, decode every file, write the raw manifest TSV atomically, return it as a DataFrame.

    `sources`: folders (all files inside, recursively; hidden files and folders skipped) or glob
    patterns (`**` allowed) or single files. All files found are de-duplicated by path and processed
    in sorted order of their absolute path, so "the first" of a set of pixel-identical photos is the
    one whose path sorts first. Sources that match nothing come first, one rejected row each.

    Columns: see RAW_MANIFEST_COLUMNS. `width`/`height` are EXIF-upright; `exif_orientation` is the
    EXIF Orientation tag value, 1 when the file has none; empty for undecodable files.
    """
    import pandas as pd

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]

    rows: list[dict] = []
    all_files: set[str] = set()
    for source in sources:
        source = os.fspath(source)
        files, problem = _expand_source(source)
        if problem is not None:
            row = _empty_row(os.path.abspath(os.path.expanduser(source)))
            row["reason"] = problem
            rows.append(row)
        all_files.update(files)

    manifest_abs = os.path.abspath(manifest_path)
    first_by_hash: dict[str, str] = {}
    for file_path in sorted(all_files):
        if file_path == manifest_abs:
            continue
        row = _empty_row(file_path)
        rows.append(row)
        try:
            if os.path.getsize(file_path) == 0:
                row["reason"] = "undecodable: empty file"
                continue
            image, orientation = _decode(file_path)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is data, not a crash
            row["reason"] = f"undecodable: {_short_error(exc, file_path)}"
            continue
        row["width"], row["height"] = image.width, image.height
        row["exif_orientation"] = 1 if orientation is None else orientation
        digest = pixel_sha256(image)
        row["pixel_sha256"] = digest
        image.close()
        if min(row["width"], row["height"]) < min_side_px:
            row["reason"] = f"too small ({row['width']}x{row['height']} px, short side < {min_side_px})"
            continue
        if digest in first_by_hash:
            row["reason"] = f"duplicate of {first_by_hash[digest]}"
            continue
        first_by_hash[digest] = file_path
        row["status"] = "kept"

    frame = pd.DataFrame(rows, columns=RAW_MANIFEST_COLUMNS)
    for column in ("width", "height", "exif_orientation"):
        frame[column] = frame[column].astype("Int64")
    for column in ("source", "status", "reason", "pixel_sha256"):
        frame[column] = frame[column].astype(object)
    write_tsv_atomic(manifest_path, frame)
    return frame


def read_raw_manifest(manifest_path: str | os.PathLike):
    """Read a raw manifest TSV back (empty cells stay empty strings / <NA> for ints)."""
    import pandas as pd

    frame = pd.read_csv(manifest_path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in RAW_MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{manifest_path}: not a raw manifest (missing columns {missing})")
    for column in ("width", "height", "exif_orientation"):
        text = frame[column].astype(object)
        frame[column] = pd.to_numeric(text.where(text != "", None)).astype("Int64")
    return frame
