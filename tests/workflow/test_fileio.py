"""tifactory.fileio: the big-file hash cache (atomic writes are covered by tests/workflow/test_faults.py)."""

from __future__ import annotations

import hashlib
import json
import os

from tifactory import fileio


def test_big_file_hashes_are_cached_and_invalidated(tmp_path, monkeypatch):
    monkeypatch.setenv(fileio.HASH_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(fileio, "HASH_CACHE_MIN_BYTES", 1000)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w" * 4000)
    true_hash = hashlib.sha256(b"w" * 4000).hexdigest()
    assert fileio.sha256_file(weights) == true_hash
    [entry] = list((tmp_path / "cache").iterdir())
    # a cache hit is served without reading the file: plant a marker value under the same key
    record = json.loads(entry.read_text())
    entry.write_text(json.dumps(dict(record, sha256="from-cache")))
    assert fileio.sha256_file(weights) == "from-cache"
    # the file changes (size and mtime): hashed again, the cache entry replaced
    weights.write_bytes(b"v" * 5000)
    assert fileio.sha256_file(weights) == hashlib.sha256(b"v" * 5000).hexdigest()
    assert json.loads(entry.read_text())["sha256"] == hashlib.sha256(b"v" * 5000).hexdigest()
    # same size, new mtime: hashed again too
    entry.write_text(json.dumps(dict(json.loads(entry.read_text()), sha256="stale")))
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fileio.sha256_file(weights) == hashlib.sha256(b"v" * 5000).hexdigest()


def test_small_files_and_unwritable_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(fileio.HASH_CACHE_ENV, str(tmp_path / "cache"))
    small = tmp_path / "crop.png"
    small.write_bytes(b"x" * 10)
    assert fileio.sha256_file(small) == hashlib.sha256(b"x" * 10).hexdigest()
    assert not (tmp_path / "cache").exists()  # small files are never cached
    monkeypatch.setattr(fileio, "HASH_CACHE_MIN_BYTES", 1)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(fileio.HASH_CACHE_ENV, str(blocker / "cache"))  # cannot be created
    assert fileio.sha256_file(small) == hashlib.sha256(b"x" * 10).hexdigest()


def test_read_tsv_rows_understands_pandas_quoting(tmp_path):
    import pandas as pd
    import pytest

    path = tmp_path / "manifest.tsv"
    awkward = 'photo "one"\twith a tab.png'
    pd.DataFrame({"source": [awkward, "b.png"], "status": ["kept", "rejected"]}).to_csv(path, sep="\t", index=False)
    assert fileio.read_tsv_rows(path) == [{"source": awkward, "status": "kept"},
                                          {"source": "b.png", "status": "rejected"}]
    with pytest.raises(FileNotFoundError, match="crop manifest not found or empty"):
        fileio.read_tsv_rows(tmp_path / "missing.tsv", "crop manifest")
    (tmp_path / "empty.tsv").write_text("")
    assert fileio.read_tsv_rows(tmp_path / "empty.tsv", missing_ok=True) == []


def test_empty_folder_leaves_nothing_of_an_earlier_run(tmp_path):
    """What Snakemake does for a directory() output, done by the crop and dataset jobs for their folders."""
    from tifactory.fileio import empty_folder

    folder = tmp_path / "results" / "eva" / "crops"
    (folder / "old").mkdir(parents=True)
    (folder / "000_stale.png").write_bytes(b"x")
    (folder / "old" / "a.txt").write_text("x")
    assert empty_folder(folder) == folder and folder.is_dir() and not any(folder.iterdir())
    assert empty_folder(tmp_path / "new" / "dataset").is_dir()  # made when missing
    (tmp_path / "file").write_text("x")
    assert empty_folder(tmp_path / "file").is_dir()  # a file in the way is replaced


def test_files_of_an_emptied_folder_are_the_jobs_outputs_in_its_provenance(tmp_path, monkeypatch):
    """A crop job declares manifest.tsv; the crop images beside it are its outputs too in the provenance record."""
    from types import SimpleNamespace

    from tifactory.fileio import empty_folder
    from tifactory.provenance import write_job_provenance

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fileio, "OWNED_FOLDERS", [])
    monkeypatch.setattr("tifactory.provenance.OWNED_FOLDERS", fileio.OWNED_FOLDERS)
    (tmp_path / "logs").mkdir()
    folder = empty_folder("results/eva/crops")
    (folder / "manifest.tsv").write_text("source\n")
    (folder / "000_a.png").write_bytes(b"png")
    smk = SimpleNamespace(rule="crop", wildcards={"subject": "eva"}, params=SimpleNamespace(), input=[],
                          output=["results/eva/crops/manifest.tsv"], log=["logs/eva.log"])
    record = json.loads(write_job_provenance(smk).read_text())
    assert record["outputs"] == {"results/eva/crops/000_a.png": hashlib.sha256(b"png").hexdigest(),
                                 "results/eva/crops/manifest.tsv": hashlib.sha256(b"source\n").hexdigest()}
