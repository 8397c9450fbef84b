"""Stage 1: collect raw photos into a manifest (nothing is copied; later stages re-read the source).

Every item found becomes one manifest row, kept or rejected with a reason: bad input is data.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, fields

from tifactory.errors import TifactoryError
from tifactory.fileio import sha256_file, write_tsv_atomic
from tifactory.photos.sources import CAPTION, expand_source, prepared_file_roles, prepared_image_folders

RAW_MANIFEST_COLUMNS = [
    "source",
    "status",
    "reason",
    "width",
    "height",
    "pixel_sha256",
    "exif_orientation",
    "file",
    "file_sha256",
    "format",
    "colour",
    "phash",
]

_MAX_ERROR_CHARS = 120
_HASH_SIDE = 256  # JPEGs are decoded at the smallest DCT scale with a long side >= this for hashing


class CollectError(TifactoryError, ValueError):
    """A raw manifest that is not one (a stale or hand-edited file), or bad collect settings."""


@dataclass(frozen=True)
class CollectSettings:
    """config.yaml's `collect:` section: what is kept (size, decompression-bomb guard, near-duplicates) and how
    URL lists are fetched (network switch, cache, size cap, timeout, retries with backoff)."""

    min_side_px: int
    max_megapixels: float
    near_duplicate_distance: int
    allow_network: bool
    url_cache: str
    max_download_mb: float
    timeout_s: float
    retries: int
    backoff_s: float

    def __post_init__(self):
        object.__setattr__(self, "url_cache", os.fspath(self.url_cache))
        checks = [(self.min_side_px >= 1, f"min_side_px must be >= 1, got {self.min_side_px}"),
                  (self.max_megapixels > 0, f"max_megapixels must be > 0, got {self.max_megapixels}"),
                  (self.retries >= 0, f"retries must be >= 0, got {self.retries}")]
        for ok, message in checks:
            if not ok:
                raise CollectError(f"bad collect setting: collect.{message}")

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "CollectSettings":
        """From the whole config (its collect section) and `overrides` (collect keys)."""
        values = {**config["collect"], **overrides}
        names = [item.name for item in fields(cls)]
        unknown = sorted(set(values) - set(names))
        missing = [name for name in names if name not in values]
        if unknown or missing:
            raise CollectError(f"collect settings: unknown {unknown}, missing {missing}")
        return cls(**{name: values[name] for name in names})

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)


def load_upright_rgb(path: str | os.PathLike):
    """Load `path` as an EXIF-upright 8-bit sRGB RGB PIL image (see tifactory.photos.imageio). Raises if undecodable."""
    from tifactory.photos.imageio import open_upright

    return open_upright(path)[0]


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


def _empty_row(source: str) -> dict:
    row = {column: None for column in RAW_MANIFEST_COLUMNS}
    row.update(source=source, status="rejected", reason="", pixel_sha256="", file="", file_sha256="",
               format="", colour="", phash="")
    return row


def _examine(row: dict, file_path: str, *, min_side_px: int, max_pixels: int) -> tuple[int, int] | None:
    """Decode a small copy of one file, fill the row's measurements; return (phash, pixels) if usable."""
    from tifactory.photos.imageio import DecodeRejected, open_upright, perceptual_hash

    try:
        if os.path.getsize(file_path) == 0:
            row["reason"] = "undecodable: empty file"
            return None
        row["file_sha256"] = sha256_file(file_path)
        image, info = open_upright(file_path, min_long_side=_HASH_SIDE, max_pixels=max_pixels)
    except DecodeRejected as exc:
        row["reason"] = str(exc)
        return None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is data, not a crash
        if type(exc).__name__ == "DecompressionBombError":
            row["reason"] = f"decompression-bomb guard ({_short_error(exc, file_path)})"
        else:
            row["reason"] = f"undecodable: {_short_error(exc, file_path)}"
        return None
    row.update(width=info.width, height=info.height, exif_orientation=info.orientation,
               format=info.format, colour=info.colour)
    phash = perceptual_hash(image)
    row["phash"] = f"{phash:016x}"
    image.close()
    if min(info.width, info.height) < min_side_px:
        row["reason"] = f"too small ({info.width}x{info.height} px, short side < {min_side_px})"
        return None
    return phash, info.width * info.height


def _full_pixel_hash(row: dict) -> str:
    """The decoded pixels' hash ("" when the full decode fails: the row is then rejected as undecodable
    and compares equal to nothing)."""
    if not row["pixel_sha256"] and not row.get("full_decode_error"):
        try:
            with load_upright_rgb(row["file"]) as image:
                row["pixel_sha256"] = pixel_sha256(image)
        except Exception as error:  # noqa: BLE001 - changed or truncated since the first decode
            row["full_decode_error"] = f"undecodable: {type(error).__name__}: {error}"
    return row["pixel_sha256"] or f"<undecodable {row['file']}>"


def _deduplicate(candidates: list[tuple[dict, int, int]], near_duplicate_distance: int) -> None:
    """Mark exact and near-duplicates rejected; keep the larger photo (ties: the first in path order).

    Exact: same bytes, or same size and identical decoded pixels (full decode only for same-size
    pairs whose perceptual hashes are close: pixel-identical photos always are). Near: perceptual-hash
    Hamming distance <= near_duplicate_distance (negative: off).
    """
    from tifactory.photos.imageio import hamming

    exact_window = 2  # pixel-identical photos give (near-)identical small decodes
    kept: list[tuple[dict, int]] = []
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i][2], candidates[i][0]["source"]))
    for i in order:
        row, phash, _pixels = candidates[i]
        verdict = ""
        for other, other_hash in kept:
            same_size = (row["width"], row["height"]) == (other["width"], other["height"])
            distance = hamming(phash, other_hash)
            if row["file_sha256"] == other["file_sha256"] or (
                same_size and distance <= exact_window and _full_pixel_hash(row) == _full_pixel_hash(other)
            ):
                verdict = f"duplicate of {other['source']}"
                break
            if not verdict and 0 <= near_duplicate_distance and distance <= near_duplicate_distance:
                verdict = f"near-duplicate of {other['source']} (phash distance {distance})"
        if verdict:
            row["reason"] = verdict
        else:
            row["status"] = "kept"
            kept.append((row, phash))
    for row, _phash, _pixels in candidates:
        error = row.pop("full_decode_error", "")
        if error:
            row["status"], row["reason"] = "rejected", error


def collect_photos(
    sources: list[str] | str,
    manifest_path: str | os.PathLike,
    settings: CollectSettings,
    *,
    workers: int = 1,
    prepared: bool = False,
):
    """Scan `sources`, decode every item, write the raw manifest TSV atomically, return it as a DataFrame.

    `sources`: folders (all files inside, recursively; hidden files and folders skipped), glob
    patterns (`**` allowed), single files, and URL-list files (text files whose lines are URLs; see
    tifactory.photos.fetch: downloads only with `settings.allow_network`, http/https only, cached by URL). Items are
    processed in sorted order (files by absolute path, then URLs in list order).

    Every item is one row: kept, or rejected with a reason (undecodable, decompression-bomb guard,
    too small, duplicate of X, near-duplicate of X (phash distance d), download problems). Of a set
    of duplicates the one with the most pixels is kept; ties go to the first in path order.
    Columns: see RAW_MANIFEST_COLUMNS. `width`/`height` are EXIF-upright full-resolution sizes;
    `file` is the local file the crop stage reads (the cached download for URLs); `pixel_sha256` is
    filled where a full-pixel comparison was needed to tell an exact duplicate.

    `prepared`: the sources are prepared kohya dataset folders (tifactory.photos.sources.prepared_image_folders),
    used as they are: only the image folders' own image files are items (other files are rejected rows;
    caption files beside an image are no rows, they travel with it), URL lists are not read, and nothing
    is rejected as a duplicate (only undecodable and too small images are).
    """
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd

    from tifactory.photos.fetch import fetch_url, read_url_list

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]

    rows: list[dict] = []
    all_files: set[str] = set()
    entry_problems: dict[str, str] = {}
    image_folders: list[str] = []
    for source in sources:
        source = os.fspath(source)
        listing = expand_source(source).absolute()
        files, problem, problems = listing.files, listing.problem, listing.entry_problems
        if prepared:
            image_folders += [os.path.abspath(folder.path)
                              for folder in prepared_image_folders(source, force=True) or []]
        if problem is not None:
            row = _empty_row(os.path.abspath(os.path.expanduser(source)))
            row["reason"] = problem
            rows.append(row)
        all_files.update(files)
        entry_problems.update(problems)

    manifest_abs = os.path.abspath(manifest_path)
    roles = prepared_file_roles(sorted(all_files), image_folders) if prepared else {}
    items: list[dict] = []
    for file_path in sorted(all_files | set(entry_problems)):
        if file_path == manifest_abs:
            continue
        if file_path in entry_problems and file_path not in all_files:
            row = _empty_row(file_path)
            row["reason"] = entry_problems[file_path]
            items.append(row)
            continue
        if prepared:
            role = roles[file_path]
            if role == CAPTION:
                continue  # travels with its image (tifactory.photos.prepared)
            row = _empty_row(file_path)
            row["file"], row["reason"] = ("", role) if role else (file_path, "")
            items.append(row)
            continue
        urls = read_url_list(file_path)
        if urls is None:
            row = _empty_row(file_path)
            row["file"] = file_path
            items.append(row)
            continue
        for url in urls:
            fetched = fetch_url(url, settings.url_cache, allow_network=settings.allow_network,
                                max_bytes=int(settings.max_download_mb * 1e6), timeout_s=settings.timeout_s,
                                retries=settings.retries, backoff_s=settings.backoff_s)
            row = _empty_row(url)
            if fetched.path is None:
                row["reason"] = fetched.problem
            else:
                row["file"] = os.path.abspath(fetched.path)
            items.append(row)
    rows.extend(items)

    todo = [row for row in items if row["file"]]
    def examine(row):
        return _examine(row, row["file"], min_side_px=settings.min_side_px, max_pixels=settings.max_pixels)

    if workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(examine, todo))
    else:
        results = [examine(row) for row in todo]
    candidates = [(row, *result) for row, result in zip(todo, results) if result is not None]
    if prepared:  # used as they are: a trainer's deliberate near-copies stay
        for row, *_ in candidates:
            row["status"] = "kept"
    else:
        _deduplicate(candidates, settings.near_duplicate_distance)

    frame = pd.DataFrame(rows, columns=RAW_MANIFEST_COLUMNS)
    for column in ("width", "height", "exif_orientation"):
        frame[column] = frame[column].astype("Int64")
    for column in RAW_MANIFEST_COLUMNS:
        if column not in ("width", "height", "exif_orientation"):
            frame[column] = frame[column].astype(object)
    write_tsv_atomic(manifest_path, frame)
    return frame


def read_raw_manifest(manifest_path: str | os.PathLike):
    """Read a raw manifest TSV back (empty cells stay empty strings / <NA> for ints)."""
    import pandas as pd

    frame = pd.read_csv(manifest_path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in RAW_MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise CollectError(f"{manifest_path}: not a raw manifest (missing columns {missing})")
    for column in ("width", "height", "exif_orientation"):
        text = frame[column].astype(object)
        frame[column] = pd.to_numeric(text.where(text != "", None)).astype("Int64")
    return frame
