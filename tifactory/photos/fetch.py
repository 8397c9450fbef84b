"""URL-list sources: bounded, cached downloads (http/https only). Opt-in: no network unless allowed.

A URL-list file is a UTF-8 text file whose non-blank lines that are not `#` comments are all URLs.
Every URL becomes one collect item. Downloads land in a cache keyed by the SHA-256 of the URL
(`<cache>/<sha256(url)>.bin`), so reruns do not download again; the URL's own file name never
becomes a path.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tifactory.fileio import atomic_path

_URL_LINE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")
_URL_START = re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*://")
_MAX_LIST_BYTES = 1 << 20


@dataclass
class FetchResult:
    url: str
    path: str | None  # cached file, None when it could not be fetched
    problem: str  # "" when path is set
    from_cache: bool = False


def _starts_like_url_list(head: bytes) -> bool:
    """Whether a file's first bytes could open a URL list: the first non-blank, non-comment line starts
    like a URL (`scheme://`; image formats never do)."""
    for line in head.splitlines():
        line = line.strip().lstrip(b"\xef\xbb\xbf")
        if line and not line.startswith(b"#"):
            return _URL_START.match(line) is not None
    return True  # only blank/comment lines so far: read on


def read_url_list(path: str | os.PathLike) -> list[str] | None:
    """The URLs of a URL-list file, or None when the file is not one (binary, or other text)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(4096)  # every photo of a source passes here: decide on its head first
            if b"\x00" in data or not _starts_like_url_list(data):
                return None
            data += handle.read(_MAX_LIST_BYTES + 1 - len(data))
    except OSError:
        return None
    if len(data) > _MAX_LIST_BYTES:
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    urls = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not _URL_LINE.match(line):
            return None
        urls.append(line)
    return urls or None


def cache_path(cache_dir: str | os.PathLike, url: str) -> Path:
    return Path(cache_dir) / f"{hashlib.sha256(url.encode('utf-8')).hexdigest()}.bin"


class _Permanent(Exception):
    """A failure that retrying cannot fix (4xx, too large, a refused redirect)."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            fp.close()
            raise _Permanent(f"HTTP {code} redirect to a {scheme or 'relative'}: URL refused (http/https only)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener():
    return urllib.request.build_opener(_HttpOnlyRedirects())


def _download(url: str, target: Path, *, max_bytes: int, timeout_s: float) -> None:
    """One attempt. `timeout_s` bounds every socket wait and the whole attempt: a server that drips a
    byte now and then never trips a socket timeout, so the attempt's own clock stops it."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "tifactory/collect"})
    try:
        response = _opener().open(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        if 300 <= error.code < 400:  # a redirect urllib refused itself (data:, a loop): retrying cannot help
            scheme = urllib.parse.urlsplit(error.url or "").scheme.lower()
            if scheme in ("http", "https"):
                raise _Permanent(f"HTTP {error.code}: {' '.join(str(error.msg).split())[:80]}") from None
            raise _Permanent(f"HTTP {error.code} redirect to a {scheme or 'relative'}: URL refused "
                             "(http/https only)") from None
        if 400 <= error.code < 500:
            raise _Permanent(f"HTTP {error.code}") from None
        raise
    with response:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise _Permanent(f"too large ({int(length)} bytes > {max_bytes})")
        with atomic_path(target) as tmp_path:
            total = 0
            with open(tmp_path, "wb") as handle:
                while chunk := response.read1(1 << 16):  # what has arrived, not a full 64 KiB
                    total += len(chunk)
                    if total > max_bytes:
                        raise _Permanent(f"too large (> {max_bytes} bytes)")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"download took longer than {timeout_s:g} s")
                    handle.write(chunk)


def fetch_url(url: str, cache_dir: str | os.PathLike, *, allow_network: bool, max_bytes: int,
              timeout_s: float, retries: int, backoff_s: float) -> FetchResult:
    """Return the cached copy of `url`, downloading it first when allowed. Never raises for bad URLs."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        return FetchResult(url, None, f"unsupported URL scheme ({scheme or 'none'}; http/https only)")
    target = cache_path(cache_dir, url)
    if target.is_file():
        return FetchResult(url, str(target), "", from_cache=True)
    if not allow_network:
        return FetchResult(url, None, "not downloaded: network disabled (collect.allow_network: false)")
    problem = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            _download(url, target, max_bytes=max_bytes, timeout_s=timeout_s)
            return FetchResult(url, str(target), "")
        except _Permanent as error:
            return FetchResult(url, None, f"download failed: {error}")
        except urllib.error.HTTPError as error:
            problem = f"HTTP {error.code}"
        except (urllib.error.URLError, OSError, ValueError) as error:  # timeouts, resets, DNS
            reason = getattr(error, "reason", None) or error
            problem = " ".join(f"{type(error).__name__}: {reason}".split())[:100]
    return FetchResult(url, None, f"download failed: {problem} (after {retries + 1} attempt(s))")
