"""Issue 7, reproducibility: two runs from scratch give the same bytes; every artifact has a provenance record.

Run 1 is the shared reference run (tests/support/badcorpus.py: reference_run, also used by test_faults.py); run 2
starts from an empty folder at the very same absolute path (the raw manifests record absolute source paths,
so a different folder would differ there by design, not by chance).

Files that are NOT byte-identical between runs, and why (everything else must be):
  logs/**/*.log, benchmarks/**   wall-clock timings and progress bars
  results/S/train/loss.tsv       its `seconds` column is wall-clock time (step, loss and lr must match)
  logs/train/S.provenance.json   lists loss.tsv's hash (see above); every other field must match
  .snakemake*, hidden files      Snakemake's own bookkeeping (timestamps)
The embeddings' `modelspec.date` is today's date unless SOURCE_DATE_EPOCH is set (the tests set it, as
reproducible-builds do); runs on different days otherwise differ in that one metadata field.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from support import REPO_ROOT
from support.badcorpus import TINY_ROSTER, TINY_TARGETS, reference_run, tiny_roster_workdir
from support.harness import run_snakemake

TIMING_FILES = ("loss.tsv",)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, repo_config, tiny_overrides):
    base = tmp_path_factory.getbasetemp()
    first = reference_run(base, repo_config, tiny_overrides)
    second = tiny_roster_workdir(base / "tiny_run", repo_config, tiny_overrides)  # the same absolute path
    run_snakemake(second, *TINY_TARGETS)
    return first, second


def _files(root: Path, *folders: str) -> dict[str, Path]:
    found = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            relative = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                found[relative.as_posix()] = path
    return found


def _without_seconds(path: Path) -> list[list[str]]:
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    assert rows[0] == ["step", "loss", "lr", "seconds"]
    return [row[:3] for row in rows]


@pytest.mark.slow
def test_two_runs_from_scratch_are_byte_identical(two_runs):
    first, second = two_runs
    a = _files(first, "results", "resources/models/demo-tiny")
    b = _files(second, "results", "resources/models/demo-tiny")
    assert sorted(a) == sorted(b), "the two runs made different files"
    kinds = {"crops": 0, "dataset": 0, "embeddings": 0, "model": 0}
    different = []
    for relative, path in a.items():
        if path.name in TIMING_FILES:
            assert _without_seconds(path) == _without_seconds(b[relative]), relative
            continue
        if path.read_bytes() != b[relative].read_bytes():
            different.append(relative)
        kinds["crops"] += "/crops/" in relative and relative.endswith(".png")
        kinds["dataset"] += "/dataset/" in relative
        kinds["embeddings"] += relative.startswith("results/") and relative.endswith(".safetensors")
        kinds["model"] += relative.startswith("resources/")
    assert not different, f"not byte-identical: {different}"
    assert all(kinds.values()), kinds  # crops, dataset, checkpoints + embeddings and the demo model compared
    assert kinds["embeddings"] == len(TINY_ROSTER) * (1 + 12 // 2)


@pytest.mark.slow
def test_provenance_records_are_identical_too(two_runs):
    first, second = two_runs
    a = _files(first, "logs")
    sidecars = [relative for relative in a if relative.endswith(".provenance.json")]
    assert sidecars
    for relative in sidecars:
        one = json.loads(a[relative].read_text())
        two = json.loads((second / relative).read_text())
        if one["rule"] == "train":
            for record in (one, two):
                record["outputs"] = {k: v for k, v in record["outputs"].items() if not k.endswith("loss.tsv")}
        assert one == two, relative


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_every_artifact_records_provenance(two_runs):
    """Every output file is listed, with its hash, in its job's sidecar, which holds the config hash, the
    input hashes, package versions and the git commit; embeddings also carry them in their metadata."""
    _, root = two_runs
    records = [json.loads(p.read_text()) for p in sorted((root / "logs").rglob("*.provenance.json"))]
    assert {r["rule"] for r in records} == {"demo_model", "collect", "crop", "dataset", "train", "crop_summary"}
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    produced: dict[str, str] = {}
    for record in records:
        canonical = json.dumps(record["params"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert record["config_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
        assert {"torch", "diffusers", "transformers", "tifactory"} <= set(record["package_versions"])
        assert record["git_commit"].startswith(commit) and commit, record["git_commit"]
        for path, digest in record["inputs"].items():
            assert _sha256(root / path) == digest, (record["rule"], path)
        assert record["outputs"], record["rule"]
        produced.update(record["outputs"])
    collect = next(r for r in records if r["rule"] == "collect" and r["wildcards"] == {"subject": "eva"})
    assert any(path.startswith("photos/eva/") for path in collect["inputs"])  # the raw photos' hashes
    artifacts = _files(root, "results", "resources/models/demo-tiny")
    assert sorted(artifacts) == sorted(produced), "every artifact is in exactly the records' outputs"
    for relative, path in artifacts.items():
        assert _sha256(path) == produced[relative], relative

    from tifactory.training.embedding import load_embedding

    for subject in TINY_ROSTER:
        _, metadata = load_embedding(root / "results" / subject / f"{subject}-ti.safetensors")
        for key in ("tifactory.recipe", "tifactory.base_model_sha256", "tifactory.dataset_sha256",
                    "tifactory.package_versions", "tifactory.git_commit"):
            assert metadata[key], key
        assert metadata["tifactory.git_commit"].startswith(commit)
