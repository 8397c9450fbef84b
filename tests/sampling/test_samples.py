"""The samples stage on the tiny model: per-line options, determinism across batch sizes, grid files; the
loss plot; and the GPU benchmark script's CPU smoke mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tifactory.training.embedding import save_embedding
from tifactory.sampling.plots import line_plot, nice_ticks, plot_loss, smooth, y_range
from support.models import sd15_spec
from tifactory.sampling.samples import SampleSettings, load_sampler, plan_columns, render_sample_grid
from tifactory.sampling.prompts import parse_prompt_line

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_columns_take_line_options_over_config():
    prompts = [parse_prompt_line("a photo of {token}"), parse_prompt_line("portrait of {token} --d 9 --s 3 --w 96")]
    columns = plan_columns(prompts, seeds=[1, 2], steps=2, guidance_scale=7.5, width=64, height=64)
    assert [(c.prompt_index, c.seed, c.steps, c.width, c.height) for c in columns] == [
        (0, 1, 2, 64, 64), (0, 2, 2, 64, 64), (1, 9, 3, 96, 64)]


def test_unknown_scheduler_is_a_prompt_error():
    from tifactory.sampling.prompts import PromptError
    from tifactory.sampling.samples import make_scheduler

    with pytest.raises(PromptError, match="unknown scheduler 'plms'"):
        make_scheduler("plms", {})


def test_column_labels_show_the_word_people_type(tmp_path, tiny_model_dir, monkeypatch):
    """The grid's column labels name the trigger (the roster's output_name), else `<subject>-ti`."""
    from tifactory.sampling import samples

    labels = []
    real = samples.compose_grid
    monkeypatch.setattr(samples, "compose_grid", lambda rows, columns, title="": labels.append(columns)
                        or real(rows, columns, title))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "prompts.txt").write_text("a photo of {token}\n")
    settings = SampleSettings(seeds=[1], steps=1, guidance_scale=7.5, width=64, height=64, scheduler="ddim",
                              device="cpu", batch_size=4, init_word="woman")
    for out, trigger in (("a", "evagreen_v2"), ("b", None)):
        render_sample_grid(model=sd15_spec(tiny_model_dir), settings=settings, subject="eva",
                           checkpoint_dir=tmp_path / "checkpoints", prompts_file=tmp_path / "prompts.txt",
                           out_dir=tmp_path / out, trigger=trigger, log=lambda message: None)
    assert labels == [["seed 1 · a photo of evagreen_v2"], ["seed 1 · a photo of eva-ti"]]


def test_the_preview_leaves_the_grid_image_alone(tmp_path):
    """The grid's PNG and its preview are written by two threads from one Image; Image.save keeps its options on
    the image it saves, so a preview saved from the grid itself made the PNG thread write at the JPEG's options
    (zlib's default level instead of level 1: a worker and an in-process grid then differed in bytes)."""
    from tifactory.sampling.samples import write_preview

    for side in (64, 4000):  # kept as it is, and scaled down
        grid = Image.new("RGB", (side, side // 2), (120, 30, 200))
        write_preview(grid, tmp_path / f"preview{side}.jpg")
        assert getattr(grid, "encoderinfo", {}) == {} and getattr(grid, "_default_encoderinfo", {}) == {}
        assert Image.open(tmp_path / f"preview{side}.jpg").format == "JPEG"


def test_images_are_written_while_later_batches_sample(tmp_path, tiny_model_dir, monkeypatch):
    """Each batch's PNGs go to the writer threads as the batch comes, not after the last one; every file and
    the grid's cells hold the sampled pixels exactly."""
    import time

    from tifactory.sampling import samples

    events, kept = [], {}
    real_save, real_compose = samples.save_png, samples.compose_grid

    def save(image, path):
        events.append(("write", time.perf_counter()))
        kept[Path(path).name] = np.asarray(image)
        return real_save(image, path)

    monkeypatch.setattr(samples, "save_png", save)
    monkeypatch.setattr(samples, "compose_grid", lambda rows, columns, title="": kept.update(
        rows=[[np.asarray(image) for image in images] for _, images in rows]) or real_compose(rows, columns, title))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "prompts.txt").write_text("a photo of {token}\n")
    settings = SampleSettings(seeds=[1, 2, 3], steps=1, guidance_scale=7.5, width=64, height=64, scheduler="ddim",
                              device="cpu", batch_size=1, init_word="woman")
    render_sample_grid(model=sd15_spec(tiny_model_dir), settings=settings, subject="eva",
                       checkpoint_dir=tmp_path / "checkpoints", prompts_file=tmp_path / "prompts.txt",
                       out_dir=tmp_path, progress_every_s=1e-9,
                       log=lambda message: events.append((message.split()[0], time.perf_counter())))
    last_batch = [when for what, when in events if what == "sampled"][-1]
    assert min(when for what, when in events if what == "write") < last_batch  # the first batch's, early
    cells = [image for row in kept["rows"] for image in row]
    for name in sorted(p.name for p in tmp_path.glob("step*.png")):
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), kept[name])
        assert any(np.array_equal(kept[name], cell) for cell in cells)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid.png")), kept["grid.png"])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("samples")
    checkpoints = root / "checkpoints"
    checkpoints.mkdir()
    for step in (10, 20):
        save_embedding(checkpoints / f"eva-ti-step{step:08d}.safetensors",
                       torch.randn(2, 768, generator=torch.Generator().manual_seed(step)), {}, "bf16")
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of {token}\n(portrait of {token}:0.8), smiling --n blurry --d 5 --s 3 --w 72\n")
    settings = SampleSettings(seeds=[1, 2], steps=2, guidance_scale=7.5, width=64, height=64, scheduler="euler_a",
                              device="cpu", batch_size=16, init_word="woman")
    kwargs = dict(model=sd15_spec(tiny_model_dir), subject="eva", checkpoint_dir=checkpoints, prompts_file=prompts)
    render_sample_grid(out_dir=root / "a", settings=settings, **kwargs)
    messages = []
    render_sample_grid(out_dir=root / "b", settings=SampleSettings.from_config(settings.__dict__, batch_size=1),
                       log=messages.append, progress_every_s=1e-9, **kwargs)
    (root / "b.log").write_text("\n".join(messages))
    return root


def test_sampling_progress_counts_images_with_eta(rendered):
    lines = [line for line in (rendered / "b.log").read_text().splitlines() if line.startswith("sampled ")]
    assert [line.split()[1] for line in lines] == [f"{done}/9" for done in range(1, 10)]
    assert all("ETA" in line for line in lines) and lines[-1].endswith("ETA 0 s")


def test_grid_images_and_table(rendered):
    out = rendered / "a"
    lines = (out / "images.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:4] == ["step", "column", "prompt", "seed"] and len(lines) == 1 + 3 * 3
    names = sorted(p.name for p in out.glob("step*.png"))
    assert names == sorted(f"step{s:08d}_{c}.png" for s in (0, 10, 20) for c in ("p00_s1", "p00_s2", "p01_s5"))
    assert Image.open(out / "step00000000_p01_s5.png").size == (72, 64)
    grid, preview = Image.open(out / "grid.png"), Image.open(out / "grid_preview.jpg")
    assert grid.width > 3 * 72 and grid.height > 3 * 64 and preview.format == "JPEG"
    # rows differ: the checkpoint's vectors change the images
    first = np.asarray(Image.open(out / "step00000010_p00_s1.png"), dtype=int)
    assert np.abs(first - np.asarray(Image.open(out / "step00000020_p00_s1.png"), dtype=int)).max() > 0


def test_batching_does_not_change_images(rendered):
    for path in (rendered / "a").glob("step*.png"):
        a = np.asarray(Image.open(path), dtype=int)
        b = np.asarray(Image.open(rendered / "b" / path.name), dtype=int)
        assert np.abs(a - b).max() <= 2, path.name


class TightGpu:
    """A pipeline stand-in that runs out of GPU memory above `fits` images at once (and forwards the rest)."""

    def __init__(self, pipe, fits):
        self.pipe, self.fits, self.tried = pipe, fits, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        self.tried.append(len(kwargs["generator"]))
        if len(kwargs["generator"]) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 60.00 GiB (test)")
        return self.pipe(**kwargs)


def test_running_out_of_gpu_memory_halves_the_batch_and_keeps_the_images(tmp_path, tiny_model_dir):
    """A batch too large for the card is split (logged) instead of failing the job, and every image is the one
    its seed gives; the VAE decodes a batch one image at a time (its peak is one image's)."""
    (tmp_path / "checkpoints").mkdir()
    save_embedding(tmp_path / "checkpoints" / "eva-ti-step00000010.safetensors",
                   torch.randn(2, 768, generator=torch.Generator().manual_seed(10)), {}, "bf16")
    (tmp_path / "prompts.txt").write_text("a photo of {token}\n")
    settings = SampleSettings(seeds=[1, 2, 3], steps=1, guidance_scale=7.5, width=64, height=64, scheduler="ddim",
                              device="cpu", batch_size=6, init_word="woman")
    kwargs = dict(model=sd15_spec(tiny_model_dir), subject="eva", checkpoint_dir=tmp_path / "checkpoints",
                  prompts_file=tmp_path / "prompts.txt")
    sampler = load_sampler(model=kwargs["model"], scheduler="ddim", device="cpu")
    assert sampler.pipe.vae.use_slicing
    sampler.pipe = tight = TightGpu(sampler.pipe, fits=2)
    messages = []
    render_sample_grid(out_dir=tmp_path / "tight", settings=settings, sampler=sampler, log=messages.append, **kwargs)
    assert tight.tried == [6, 3, 1, 1, 1, 1, 1, 1]
    assert [m for m in messages if m.startswith("out of GPU memory")] == [
        "out of GPU memory sampling 6 images at once: batches of 3 from here on (samples.batch_size sets the "
        "first try)",
        "out of GPU memory sampling 3 images at once: batches of 1 from here on (samples.batch_size sets the "
        "first try)"]
    render_sample_grid(out_dir=tmp_path / "ones", settings=SampleSettings.from_config(settings.__dict__, batch_size=1),
                       **kwargs)
    names = sorted(path.name for path in (tmp_path / "ones").glob("step*.png"))
    assert len(names) == 6 and names == sorted(path.name for path in (tmp_path / "tight").glob("step*.png"))
    for name in names:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "tight" / name)),
                              np.asarray(Image.open(tmp_path / "ones" / name))), name


def test_one_image_that_does_not_fit_fails_the_job(tmp_path, tiny_model_dir):
    (tmp_path / "prompts.txt").write_text("a photo of {token}\n")
    (tmp_path / "none").mkdir()
    settings = SampleSettings(seeds=[1], steps=1, guidance_scale=7.5, width=64, height=64, scheduler="ddim",
                              device="cpu", batch_size=4, init_word="woman")
    sampler = load_sampler(model=sd15_spec(tiny_model_dir), scheduler="ddim", device="cpu")
    sampler.pipe = TightGpu(sampler.pipe, fits=0)
    with pytest.raises(torch.OutOfMemoryError):
        render_sample_grid(out_dir=tmp_path / "out", settings=settings, sampler=sampler, log=lambda message: None,
                           model=sd15_spec(tiny_model_dir), subject="eva", checkpoint_dir=tmp_path / "none",
                           prompts_file=tmp_path / "prompts.txt")


def test_seed_changes_image(rendered):
    a = np.asarray(Image.open(rendered / "a" / "step00000000_p00_s1.png"), dtype=int)
    b = np.asarray(Image.open(rendered / "a" / "step00000000_p00_s2.png"), dtype=int)
    assert np.abs(a - b).max() > 10


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m"])
def test_schedulers_load(tiny_model_dir, scheduler):
    sampler = load_sampler(model=sd15_spec(tiny_model_dir), scheduler=scheduler, device="cpu")
    assert type(sampler.pipe.scheduler).__name__ == {"ddim": "DDIMScheduler",
                                                     "dpmpp_2m": "DPMSolverMultistepScheduler"}[scheduler]


def test_loss_plot_and_smoothing(tmp_path):
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    loss = tmp_path / "loss.tsv"
    loss.write_text("step\tloss\tlr\tseconds\n" + "".join(f"{s}\t{1 / s:.4f}\t0.005\t1\n" for s in range(1, 30)))
    plot_loss(loss, tmp_path / "loss.png", subject="eva")
    image = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    assert image.shape == (500, 900, 3) and (image != 255).any(axis=2).mean() > 0.01
    loss.write_text("nope\n")
    with pytest.raises(FileNotFoundError, match="not a loss table"):
        plot_loss(loss, tmp_path / "loss2.png")


def test_plot_axes_are_sane_and_the_legend_fits(tmp_path):
    """All-zero likeness (no face anywhere) is drawn on 0..1, not -1..1; a share plot keeps 0..1; the legend and
    the note are inside the picture (matplotlib's constrained layout)."""
    low, high = y_range([0.0, 0.0, 0.0])
    assert low == pytest.approx(-0.05) and high == pytest.approx(1.05)
    assert y_range([0.2, 0.5], least=(0.0, 1.0)) == pytest.approx((-0.05, 1.05))
    assert y_range([2.0, 2.0])[0] > 1.5  # a constant loss: around its value
    out = line_plot(tmp_path / "l.png", [{"label": "score (mean similarity, no face = 0)", "x": [0, 10],
                                          "y": [0.0, 0.0], "points": True}],
                    title="eva: likeness vs step", xlabel="step", ylabel="similarity", ylim=(0, 1),
                    note="no face in any sample: likeness not scored")
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (500, 900, 3)
    assert (image[:, -1] == 255).all() and (image[-1] == 255).all()  # nothing runs off the right or bottom edge


@pytest.mark.slow
def test_bench_script_tiny_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_samples.py"), "--tiny", "--device", "cpu",
                             "--rows", "3", "--repeat", "1", "--json", str(tmp_path / "t.json")],
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    [report] = json.loads((tmp_path / "t.json").read_text())  # one entry per --batch-size setting
    assert report["rows"] == 3 and report["columns"] == 8 and report["images"] == 24
    assert report["load_s"] > 0 and len(report["grid_s"]) == 1
    assert "load:" in result.stdout and "grid (3 steps x 8 images" in result.stdout
