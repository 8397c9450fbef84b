"""Issue 7, security: no pickle runs code, URL sources are bounded and stay in their cache, no path escapes.

Extends tests/training/test_models.py (base model / VAE .ckpt and .pt pickles) and tests/photos/test_fetch_normalise.py
(schemes, file:// redirect, size caps, socket timeouts, 404, retries, cache naming) with what they do not cover:
a whole-download deadline, redirects to other schemes refused at once, URL names never becoming paths.
"""

from __future__ import annotations

import http.server
import io
import os
import pickle
import re
import threading
import time
from pathlib import Path

import pytest

from support.badcorpus import composition, make_demo_like_folder, write_workdir
from support.harness import run_snakemake

# ----------------------------------------------------------------------------- pickles


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(path: Path, marker: Path, payload_extra=None) -> Path:
    payload = {"evil": _Exploit(marker), **(payload_extra or {})}
    with open(path, "wb") as handle:
        pickle.dump(payload, handle, protocol=2)
    return path


def test_control_the_crafted_pickle_does_run_code_when_unpickled_freely(tmp_path):
    marker = tmp_path / "pwned"
    with open(_evil_pickle(tmp_path / "evil.pt", marker), "rb") as handle:
        pickle.load(handle)  # what every loader below must never do
    assert marker.exists()


def test_crafted_resume_state_is_refused_and_training_starts_over(tmp_path):
    """results/S/train_state/state.pt is read back by training: a planted pickle must not run."""
    import torch

    from tifactory.training.train import load_state

    marker = tmp_path / "pwned"
    state_dir = tmp_path / "train_state"
    state_dir.mkdir()
    _evil_pickle(state_dir / "state.pt", marker, {"fingerprint": "f", "step": 4, "vectors": torch.ones(1)})
    messages: list[str] = []
    assert load_state(state_dir, "f", messages.append) is None
    assert not marker.exists()
    assert any("ignoring unreadable resume state" in m for m in messages), messages


@pytest.mark.parametrize("name", ["evil.pth", "evil.safetensors"])
def test_crafted_base_model_file_is_refused(tmp_path, tiny_model_dir, name):
    """.pth (the third pickle suffix) and a pickle disguised as .safetensors (never unpickled)."""
    from support.models import load_sd15
    from tifactory.families.loading import ModelLoadError

    marker = tmp_path / "pwned"
    path = _evil_pickle(tmp_path / name, marker, {"state_dict": {}})
    with pytest.raises(ModelLoadError, match="refusing to load|cannot read safetensors"):
        load_sd15(path, config_dir=tiny_model_dir)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["extra.pt", "extra.safetensors"])
def test_crafted_extra_embedding_is_refused(tmp_path, name):
    """samples.embeddings files: only safetensors are read, and a disguised pickle is not unpickled."""
    from tifactory.training.embedding import EmbeddingError, read_embedding

    marker = tmp_path / "pwned"
    path = _evil_pickle(tmp_path / name, marker)
    with pytest.raises(EmbeddingError, match="only .safetensors|not a readable safetensors"):
        read_embedding(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- URL sources


@pytest.fixture()
def server():
    jpeg = io.BytesIO()
    composition("a").save(jpeg, format="JPEG", quality=90)
    body = jpeg.getvalue()
    hits: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            try:
                if self.path == "/drip.jpg":  # headers at once, then a byte every 0.1 s (no socket timeout)
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    for _ in range(300):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.1)
                elif self.path.startswith("/to-"):
                    self.send_response(302)
                    self.send_header("Location", {"/to-ftp": "ftp://127.0.0.1/photo.jpg",
                                                  "/to-data": "data:image/jpeg;base64,/9j/",
                                                  "/to-http": "/photo.jpg"}[self.path])
                    self.end_headers()
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up: expected
                pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_url_sources_are_bounded_in_time_and_refuse_scheme_changes(tmp_path, server):
    """(The size cap on a body without Content-Length and socket timeouts are in test_fetch_normalise.py.)"""
    from support.photos import collect_settings
    from tifactory.photos.collect import collect_photos

    base, hits = server
    photos = tmp_path / "photos"
    photos.mkdir()
    urls = {
        "drip": f"{base}/drip.jpg",
        "ftp": f"{base}/to-ftp",
        "data": f"{base}/to-data",
        "http": f"{base}/to-http",
        "traversal": f"{base}/..%2F..%2F..%2Fescaped.jpg?name=../../../escaped.jpg",
        "absolute": f"{base}/%2Ftmp%2Fescaped.jpg",
    }
    (photos / "urls.txt").write_text("\n".join(urls.values()) + "\n", encoding="utf-8")
    cache = tmp_path / "cache"
    before = _files(tmp_path)
    started = time.monotonic()
    frame = collect_photos([str(photos)], tmp_path / "raw.tsv", collect_settings(
        url_cache=cache, allow_network=True, max_download_mb=1, timeout_s=1.0, retries=1, backoff_s=0.01))
    elapsed = time.monotonic() - started
    reason = dict(zip(frame["source"], frame["reason"]))
    status = dict(zip(frame["source"], frame["status"]))
    # time: each of the 2 attempts stops after ~timeout_s although bytes keep arriving
    assert reason[urls["drip"]] == "download failed: TimeoutError: download took longer than 1 s (after 2 attempt(s))"
    assert elapsed < 10, elapsed
    # redirects: to another scheme refused at once (no retry), http -> http followed
    for key, scheme in (("ftp", "ftp"), ("data", "data")):
        assert reason[urls[key]] == f"download failed: HTTP 302 redirect to a {scheme}: URL refused (http/https only)"
        assert hits[f"/to-{key}"] == 1
    # the same photo under three URLs (one of them reached by an http -> http redirect): one kept
    same = [urls[key] for key in ("http", "traversal", "absolute")]
    assert sorted(status[url] for url in same) == ["kept", "rejected", "rejected"]
    assert all(reason[url].startswith("duplicate of http://") for url in same if status[url] == "rejected")
    # names from URLs never become paths: everything new is a <sha256>.bin in the cache (+ the manifest)
    new = _files(tmp_path) - before
    assert new - {tmp_path / "raw.tsv"} == set(cache.iterdir())
    assert all(re.fullmatch(r"[0-9a-f]{64}\.bin", p.name) for p in cache.iterdir())
    assert len(list(cache.iterdir())) == 3  # to-http, traversal, absolute: the failed ones left nothing
    assert not Path("/tmp/escaped.jpg").exists() and not (tmp_path.parent / "escaped.jpg").exists()


# ----------------------------------------------------------------------------- path traversal


# (names starting with "." are hidden files, skipped by design like .DS_Store)
HOSTILE_NAMES = ["-rf.jpg", "tab\there.jpg", "new\nline.jpg", "x\\..\\..\\back.jpg", "x" * 240 + ".jpg",
                 " spaced .png", "$(touch pwned).jpg"]


def test_hostile_source_file_names_stay_inside_the_crop_folder(tmp_path):
    """File names inside a source folder never steer where outputs go, and survive the TSV manifests."""
    import pandas as pd

    from tifactory.photos.collect import collect_photos
    from support.photos import collect_settings, run_crop

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, key in zip(HOSTILE_NAMES, "abcdefg"):
        composition(key).save(photos / name, format="PNG" if name.endswith(".png") else "JPEG")
    (tmp_path / "secret.txt").write_text("not for the manifest\n", encoding="utf-8")
    os.symlink("../secret.txt", photos / "outside.jpg")  # a link out of the folder: read, rejected, not copied
    out = tmp_path / "results" / "crops"
    before = _files(tmp_path)
    collect_photos([str(photos)], tmp_path / "results" / "raw.tsv", collect_settings())
    frame = run_crop(tmp_path / "results" / "raw.tsv", out, out / "manifest.tsv", detector="yunet")
    new = _files(tmp_path) - before
    assert all(out in p.parents or p == tmp_path / "results" / "raw.tsv" for p in new), new
    back = pd.read_csv(out / "manifest.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert sorted(Path(s).name for s in back["source"]) == sorted(HOSTILE_NAMES + ["outside.jpg"])
    kept = back[back["status"] == "kept"]
    assert len(kept) == len(HOSTILE_NAMES)
    for name in kept["output"]:
        assert re.fullmatch(r"\d{3}_[A-Za-z0-9._-]+\.png", name) and len(name) < 100, name
        assert (out / name).is_file()
    outside = back[back["source"].str.endswith("outside.jpg")].iloc[0]
    assert outside["status"] == "rejected" and outside["reason"].startswith("undecodable")
    assert "not for the manifest" not in (out / "manifest.tsv").read_text(encoding="utf-8")
    assert len(frame) == len(back)
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()  # names are never run as commands


@pytest.mark.slow
@pytest.mark.parametrize("target", ["results/eva/../../escaped/escaped-ti.safetensors",
                                    "results/../escaped/escaped-ti.safetensors"])
def test_targets_cannot_name_a_subject_outside_results(tmp_path, repo_config, tiny_overrides, target):
    root = write_workdir(tmp_path / "wd", repo_config, tiny_overrides, ["eva\twoman\tphotos/eva"])
    make_demo_like_folder(root / "photos" / "eva", "a")
    result = run_snakemake(root, target, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert not (root / "results").exists() and not (root / "escaped").exists()
    assert not (tmp_path / "escaped").exists()
