"""Shared fixtures: the repo's config, tiny-run overrides, a tiny random-weight SD1.5-shaped model and the
Snakemake harness. Tests are grouped by stage (photos/, faces/, training/, sampling/, demo/, workflow/) as the
package is; the helpers they share live in support/ (this folder is put on sys.path so they import from any)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist (`-n auto` in pyproject.toml): share the cores out among the workers, or each worker's torch
# (OpenMP) threads and those of the jobs it starts fight over every core (measured: a third more CPU time)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _CORES // _WORKERS)))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def repo_config() -> dict:
    """config.yaml, except that the demo model is taught only a few steps: workflow tests build it in many work
    folders (test_concept_recovery builds it with config.yaml's own teach_steps)."""
    with open(REPO_ROOT / "config.yaml", encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config["demo_model"]["teach_steps"] = 2
    return config


@pytest.fixture(scope="session")
def tiny_overrides() -> dict:
    """demo_overrides for workflow tests: a few steps, small samples."""
    return {
        "train": {"max_train_steps": 4, "save_every_n_steps": 2, "gradient_accumulation_steps": 3,
                  "micro_batch_size": 3},
        "samples": {"steps": 2, "width": 64, "height": 64, "seeds": [1]},
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tifactory.demo.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory) -> Path:
    """A tiny random SDXL-shaped diffusers folder (tifactory.demo.tinymodel_sdxl)."""
    from tifactory.demo.tinymodel_sdxl import build_tiny_sdxl_model

    return build_tiny_sdxl_model(tmp_path_factory.mktemp("tiny_sdxl") / "model", seed=0)


@pytest.fixture(scope="session")
def astronaut():
    """scikit-image's astronaut.png as RGB (tests must not modify it)."""
    from support.photos import package_photo

    return package_photo("skimage", "data/astronaut.png")


@pytest.fixture(scope="session")
def run_snakemake():
    """The one Snakemake harness (tests/support/harness.py): run_snakemake(workdir, *targets_and_options,
    check=True, timeout=600, env=None, cores=2, resources=("gpu=1",)). Tests that use it are marked slow."""
    from support.harness import run_snakemake as run

    return run


# Test files that share one session-scoped run (support/badcorpus.py's reference_run) go to one xdist worker,
# so that run is made once, not once per worker.
SHARED_RUN_FILES = {"tests/workflow/test_faults.py": "reference run",
                    "tests/workflow/test_reproducibility.py": "reference run"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, except that SHARED_RUN_FILES form one unit."""
    from xdist.scheduler import LoadFileScheduling

    class SharedRunScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid):
            scope = super()._split_scope(nodeid)
            return SHARED_RUN_FILES.get(scope, scope)

    return SharedRunScheduling(config, log)


def pytest_collection_modifyitems(items):
    """Files with slow tests first (stable otherwise): the workers start on the long ones, and the short ones
    fill in at the end, which balances the workers."""
    slow_files = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow_files)
