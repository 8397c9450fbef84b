"""Small I/O helpers shared by every stage: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _read_umask() -> int:
    """The process umask, read once at import (os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it into place only if the block succeeds.

    A crash, a full disk or an exception inside the block leaves no file under the final name.
    The temporary name keeps the final suffix so writers that look at the extension still work.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final_path.stem}.", suffix=f".tmp{final_path.suffix}", dir=final_path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; outputs get the usual mode
        os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(final_path: str | os.PathLike, text: str) -> None:
    with atomic_path(final_path) as tmp_path:
        tmp_path.write_text(text, encoding="utf-8")


def copy_file_atomic(source: str | os.PathLike, final_path: str | os.PathLike) -> Path:
    """Copy `source` to `final_path` (bytes and nothing else) through a temp file + rename."""
    import shutil

    with atomic_path(final_path) as tmp_path:
        shutil.copyfile(source, tmp_path)
    return Path(final_path)


def write_tsv_atomic(final_path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as TSV atomically (no index, empty string for missing values)."""
    with atomic_path(final_path) as tmp_path:
        frame.to_csv(tmp_path, sep="\t", index=False, na_rep="")


# Files this large (model weights) have their hash cached: every train/samples job of a roster hashes the
# same multi-GB base model (fingerprint + provenance), ~1 s per GB each time without the cache.
HASH_CACHE_MIN_BYTES = 64 << 20
HASH_CACHE_ENV = "TIFACTORY_HASH_CACHE"


def hash_cache_dir() -> Path:
    """Where big files' hashes are cached: $TIFACTORY_HASH_CACHE, else ~/.cache/tifactory/sha256."""
    return Path(os.environ.get(HASH_CACHE_ENV) or Path.home() / ".cache" / "tifactory" / "sha256")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex of a file's bytes. For big files the result is cached, keyed by the file's absolute
    path, size, mtime (ns) and inode: a changed or replaced file is hashed again."""
    import json

    stat = os.stat(path)
    key = [os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino]
    cache_file = None
    if stat.st_size >= HASH_CACHE_MIN_BYTES:
        cache_file = hash_cache_dir() / f"{hashlib.sha256(key[0].encode()).hexdigest()}.json"
        try:
            cached = json.loads(cache_file.read_text(encoding="utf-8"))
            if cached.get("key") == key:
                return cached["sha256"]
        except (OSError, ValueError, AttributeError):
            pass  # no usable cache entry: hash the file
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cache_file, json.dumps({"key": key, "sha256": digest.hexdigest()}))
        except OSError:
            pass  # a read-only home only costs the next job another hash
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_tsv_rows(path: str | os.PathLike, what: str = "table", missing_ok: bool = False) -> list[dict[str, str]]:
    """Rows of a TSV the stages wrote (pandas quoting understood) as {column: text}. A missing or empty
    file raises FileNotFoundError naming `what`, or gives [] with missing_ok."""
    import csv

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        if missing_ok:
            return []
        raise FileNotFoundError(f"{what} not found or empty: {path}")
    with open(path, encoding="utf-8", newline="") as handle:
        return [dict(row) for row in csv.DictReader(handle, delimiter="\t")]
