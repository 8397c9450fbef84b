"""The job wrapper (tifactory.jobs.run_job): a user error is one line without a traceback, a bug keeps its
traceback in the log; and every stage's error class is a TifactoryError."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from tifactory.errors import TifactoryError
from tifactory.jobs import run_job


def _smk(tmp_path):
    return SimpleNamespace(log=[str(tmp_path / "job.log")], rule="crop", wildcards={"subject": "eva"},
                           resources=SimpleNamespace(gpu=0))


def _run(tmp_path, monkeypatch, error: Exception) -> tuple[str, str]:
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # run_job redirects both to the log: restored after the test
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w", encoding="utf-8") as handle:
        monkeypatch.setattr(sys, "__stderr__", handle)

        def main(smk, log):
            log("working")
            raise error

        with pytest.raises(SystemExit) as info:
            run_job(_smk(tmp_path), main)
    assert info.value.code == 1
    return (tmp_path / "job.log").read_text(encoding="utf-8"), stderr.read_text(encoding="utf-8")


@pytest.mark.parametrize("error", ["tifactory.photos.crop.CropError", "tifactory.training.embedding.EmbeddingError",
                                   "tifactory.training.sd15.SD15ResourceError"])
def test_user_error_is_one_line_without_traceback(tmp_path, monkeypatch, error):
    import importlib

    module, _, name = error.rpartition(".")
    error_class = getattr(importlib.import_module(module), name)
    log, stderr = _run(tmp_path, monkeypatch, error_class("bad crop setting: crop.face_share must be in (0, 1]"))
    assert "Traceback" not in log and "Traceback" not in stderr
    assert stderr.splitlines() == ["ERROR in crop {'subject': 'eva'}: bad crop setting: crop.face_share must be "
                                   "in (0, 1]"]
    assert stderr.strip() in log


def test_unexpected_error_keeps_its_traceback_in_the_log(tmp_path, monkeypatch):
    log, stderr = _run(tmp_path, monkeypatch, ValueError("a bug"))
    assert "Traceback (most recent call last)" in log and "in main" in log
    assert "Traceback" not in stderr
    assert "unexpected ValueError: a bug (traceback in" in stderr and str(tmp_path / "job.log") in stderr


def test_every_stage_error_is_a_tifactory_error_keeping_its_builtin_base():
    from tifactory.device import DeviceError
    from tifactory.faces.models import FaceModelError
    from tifactory.gpu_slots import GpuSlotError
    from tifactory.photos.collect import CollectError
    from tifactory.photos.crop import CropError
    from tifactory.photos.dataset import DatasetError
    from tifactory.photos.sources import SourceKindError
    from tifactory.roster import RosterError
    from tifactory.sampling.prompts import PromptError
    from tifactory.training.embedding import EmbeddingError
    from tifactory.training.model_check import ModelCheckError
    from tifactory.families.loading import ModelLoadError
    from tifactory.training.sd15 import SD15ResourceError
    from tifactory.training.train import TrainingError

    for error in (DeviceError, FaceModelError, GpuSlotError, CollectError, CropError, DatasetError, SourceKindError,
                  RosterError, PromptError, EmbeddingError, ModelCheckError, ModelLoadError, SD15ResourceError,
                  TrainingError):
        assert issubclass(error, TifactoryError), error
    for error in (RosterError, DatasetError, PromptError, CropError, CollectError, FaceModelError, ModelCheckError):
        assert issubclass(error, ValueError), error  # callers that catch ValueError still see them
    assert issubclass(TrainingError, RuntimeError) and issubclass(GpuSlotError, RuntimeError)


def test_bad_crop_settings_raise_crop_error_naming_the_key():
    import yaml

    from tifactory import REPO_ROOT
    from tifactory.photos.crop import CropError, CropSettings

    config = yaml.safe_load((REPO_ROOT / "config.yaml").read_text(encoding="utf-8"))
    with pytest.raises(CropError, match=r"crop\.face_share must be in \(0, 1\], got 1.5"):
        CropSettings.from_config(config, resolution=512, face_share=1.5)
    with pytest.raises(CropError, match=r"unknown crop setting\(s\) \['face_shar'\]"):
        CropSettings.from_config(config, resolution=512, face_shar=0.5)


def test_training_progress_reaches_the_console_once_per_step(tmp_path, monkeypatch):
    """The progress line (subject, step N/M, loss, ETA) is in the job's log and on the console; a checkpoint
    step that is also due for a timed line prints it once."""
    import torch

    from tifactory.training.train import LossLog, RunState

    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    scheduler = SimpleNamespace(get_last_lr=lambda: [0.005])

    def main(smk, log):
        losses = LossLog(RunState(step=0, date="", loss_rows=[], saved_vectors={}), max_steps=20, samples_per_step=2,
                         loss_tsv=tmp_path / "loss.tsv", lr_scheduler=scheduler, progress_every_s=1e-9, log=log)
        for step in range(1, 21):
            losses.add(torch.tensor(0.25))
            if step % 10 == 0:
                losses.flush(step)  # due for a timed line (progress_every_s ~ 0) ...
                losses.progress(step)  # ... and a checkpoint step: one line, not two
        losses.close()

    console = tmp_path / "console.txt"
    with open(console, "w", encoding="utf-8") as handle:
        monkeypatch.setattr(sys, "__stderr__", handle)
        smk = _smk(tmp_path)
        smk.rule = "train"
        run_job(smk, main)
    lines = console.read_text(encoding="utf-8").splitlines()
    assert [line.split(":")[0] for line in lines] == ["[train eva] step 10/20", "[train eva] step 20/20"]
    assert "loss 0.2500" in lines[0] and "ETA" in lines[0]
    log = (tmp_path / "job.log").read_text(encoding="utf-8")
    assert log.count("step 10/20:") == 1 and log.count("step 20/20:") == 1


def test_third_party_bars_and_future_warnings_stay_out_of_the_log(tmp_path, monkeypatch):
    import warnings

    from tifactory.jobs import QUIET_LIBRARIES_ENV

    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    for key in QUIET_LIBRARIES_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # a user's own choice is kept
    # tqdm reads TQDM_* when it is imported, as in a job's fresh process (nothing imports it before run_job)
    for name in [name for name in sys.modules if name == "tqdm" or name.startswith("tqdm.")]:
        monkeypatch.delitem(sys.modules, name)

    def main(smk, log):
        from tqdm import tqdm

        for _ in tqdm(range(3), desc="Loading weights"):
            pass
        warnings.warn("`foo` is deprecated", FutureWarning)
        log("loaded")

    with warnings.catch_warnings():
        run_job(_smk(tmp_path), main)
        import os

        assert os.environ["TRANSFORMERS_VERBOSITY"] == "info" and os.environ["TQDM_DISABLE"] == "1"
    log = (tmp_path / "job.log").read_text(encoding="utf-8")
    assert "loaded" in log and "Loading weights" not in log and "deprecated" not in log
