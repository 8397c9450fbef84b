"""Shared fixtures: the repo's config, tiny-run overrides, and a tiny random-weight SD1.5-shaped model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
def astronaut():
    """scikit-image's astronaut.png as RGB (tests must not modify it)."""
    from photos import package_photo

    return package_photo("skimage", "data/astronaut.png")
