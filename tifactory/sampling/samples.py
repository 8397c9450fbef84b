"""Sample grids: one row per checkpoint step (step 0 = the init word alone), one column per prompt × seed.

`load_sampler` loads a base model once (through its family, tifactory.families); `Sampler.render_grid` encodes
every (step, prompt) with the weighted-prompt encoder of `tifactory.sampling.prompts` (the subject's vectors
swapped in per checkpoint), then
samples all images of the grid in batches (images of different steps share a batch: only their prompt
embeddings differ). Every image has its own CPU generator seeded with its column's seed, so an image does
not depend on the batch it lands in. Outputs in `out_dir`: each image, `images.tsv`, the labelled
`grid.png` and a smaller `grid_preview.jpg`.

Parse-time cheap: torch/diffusers are imported inside the functions.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from tifactory.families import ModelSpec, family_named
from tifactory.fileio import atomic_path, write_text_atomic
from tifactory.sampling.prompts import PromptError, SamplePrompt, read_prompts
from tifactory.training.embedding import list_checkpoints

SCHEDULERS = ("ddim", "euler_a", "dpmpp_2m")
PREVIEW_MAX_SIDE = 1600
IMAGES_COLUMNS = ("step", "column", "prompt", "seed", "negative", "steps", "guidance_scale", "width", "height",
                  "file")


@dataclass(frozen=True)
class SampleSettings:
    """One subject's sample-grid settings: config.yaml's `samples:` section (demo overrides applied) less its
    files (prompts, extra embeddings: the rule's inputs), plus the subject's init word (the step-0 row)."""

    seeds: tuple[int, ...]
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    device: str
    batch_size: int
    init_word: str

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(self.seeds))
        checks = [(self.scheduler in SCHEDULERS, f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}"),
                  (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
                  (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
                  (bool(self.seeds), "seeds is empty")]
        for ok, message in checks:
            if not ok:
                raise PromptError(f"bad sample setting: samples.{message}")

    @classmethod
    def from_config(cls, samples: dict, **overrides) -> "SampleSettings":
        """From the subject's `samples` settings (rules/samples_functions.smk's sample_grid_params)."""
        values = {**samples, **overrides}
        names = [item.name for item in fields(cls)]
        unknown = sorted(set(values) - set(names))
        missing = [name for name in names if name not in values]
        if unknown or missing:
            raise PromptError(f"sample settings: unknown {unknown}, missing {missing}")
        return cls(**{name: values[name] for name in names})


@dataclass(frozen=True)
class Column:
    """One grid column: a prompt with its resolved options and one seed."""

    index: int
    prompt_index: int
    prompt: SamplePrompt
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int

    def label(self, token: str) -> str:
        options = []
        if self.prompt.negative:
            options.append(f"neg: {self.prompt.negative}")
        if self.prompt.steps is not None or self.prompt.guidance_scale is not None:
            options.append(f"{self.steps} steps, CFG {self.guidance_scale:g}")
        if self.prompt.width is not None or self.prompt.height is not None:
            options.append(f"{self.width}x{self.height}")
        extra = f" [{'; '.join(options)}]" if options else ""
        # the seed first: a long prompt is cut at the end of the label, and the seed tells columns apart
        return f"seed {self.seed} · {self.prompt.text.replace('{token}', token)}{extra}"


def plan_columns(prompts: list[SamplePrompt], *, seeds: list[int], steps: int, guidance_scale: float,
                 width: int, height: int) -> list[Column]:
    """prompt × seed (a prompt with its own `--d` seed gets that one column), config defaults filled in."""
    columns = []
    for prompt_index, prompt in enumerate(prompts):
        for seed in ([prompt.seed] if prompt.seed is not None else seeds):
            columns.append(Column(
                index=len(columns), prompt_index=prompt_index, prompt=prompt, seed=seed,
                steps=prompt.steps if prompt.steps is not None else steps,
                guidance_scale=prompt.guidance_scale if prompt.guidance_scale is not None else guidance_scale,
                width=prompt.width if prompt.width is not None else width,
                height=prompt.height if prompt.height is not None else height))
    return columns


def image_name(step: int, column: Column) -> str:
    return f"step{step:08d}_p{column.prompt_index:02d}_s{column.seed}.png"


def make_scheduler(name: str, config):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    if name not in SCHEDULERS:
        raise PromptError(f"unknown scheduler {name!r} (use one of {', '.join(SCHEDULERS)})")
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    schedulers = {"ddim": DDIMScheduler, "euler_a": EulerAncestralDiscreteScheduler}
    return schedulers[name].from_config(config)


# ---------------------------------------------------------------------------------------------
# Grid drawing
# ---------------------------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and draw.textlength(lines[-1] + "…", font=font) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "…"
    return lines


def compose_grid(rows: list[tuple[str, list]], column_labels: list[str], title: str = ""):
    """Paste images into a labelled grid: row labels on the left, wrapped column labels on top."""
    from PIL import Image, ImageDraw

    cell_w = max(image.size[0] for _, images in rows for image in images)
    cell_h = max(image.size[1] for _, images in rows for image in images)
    size = max(12, min(28, cell_w // 20))
    font = _font(size)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = size // 2
    wrapped = [_wrap(scratch, label, font, cell_w - 2 * pad, 4) for label in column_labels]
    title_h = (size + 2 * pad) if title else 0
    header_h = title_h + max(len(lines) for lines in wrapped) * (size + 3) + 2 * pad
    label_w = int(max(scratch.textlength(label, font=font) for label, _ in rows)) + 3 * pad
    grid = Image.new("RGB", (label_w + cell_w * len(column_labels), header_h + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for column, lines in enumerate(wrapped):
        for number, line in enumerate(lines):
            draw.text((label_w + column * cell_w + pad, title_h + pad + number * (size + 3)), line, fill="black",
                      font=font)
    for row, (label, images) in enumerate(rows):
        top = header_h + row * cell_h
        draw.text((pad, top + cell_h // 2 - size // 2), label, fill="black", font=font)
        for column, image in enumerate(images):
            grid.paste(image, (label_w + column * cell_w + (cell_w - image.size[0]) // 2,
                               top + (cell_h - image.size[1]) // 2))
        draw.line([(0, top), (grid.width, top)], fill=(200, 200, 200))
    return grid


def save_png(image, path: str | os.PathLike) -> Path:
    """Write image as PNG atomically (fast zlib level: the grids are big and rewritten often; zlib's run-length
    strategy was no faster on photos and 11-21 % bigger: bench/bench_grid_write.py)."""
    with atomic_path(path) as tmp_path:
        image.save(tmp_path, format="PNG", compress_level=1)
    return Path(path)


def write_preview(grid, path: str | os.PathLike, max_side: int = PREVIEW_MAX_SIDE) -> Path:
    """A smaller JPEG copy of the grid for the report."""
    from PIL import Image

    scale = min(1.0, max_side / max(grid.size))
    # never `grid` itself: Image.save keeps its options on the image, and the grid's PNG is being written by
    # another thread (render_grid), which would then write with the JPEG's options
    preview = grid.resize((max(1, round(grid.width * scale)), max(1, round(grid.height * scale))),
                          Image.Resampling.LANCZOS) if scale < 1 else grid.copy()
    with atomic_path(path) as tmp_path:
        preview.save(tmp_path, format="JPEG", quality=85)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


class Sampler:
    """A loaded base model ready to render grids (the family's pipeline + the weighted-prompt encoder)."""

    def __init__(self, family, components, *, scheduler: str, device: str):
        from tifactory.device import pick_device
        from tifactory.sampling.prompts import PromptEncoder

        self.family = family
        self.device = pick_device(device)
        self.dtype = self.dtype_for(self.device)
        self.pipe = family.pipeline(components, make_scheduler(scheduler, components.noise_scheduler.config))
        self.pipe.to(self.device, self.dtype)
        # the VAE decodes one image at a time: a batch's decode at once peaks at ~3 GiB per 1024 px image in
        # SDXL's float32 (~75 GiB for a 24-image batch); one by one, at one image's (bench/RESULTS.md)
        self.pipe.vae.enable_slicing()
        self.pipe.set_progress_bar_config(disable=True)
        self.encoder = PromptEncoder(family, components)

    @staticmethod
    def dtype_for(device):
        import torch

        return torch.float16 if device.type == "cuda" else torch.float32

    def sample(self, jobs: list[dict], batch_size: int, log: Callable[[str], None] = print,
               progress_every_s: float | None = None,
               on_image: Callable[[int, object], None] | None = None) -> list:
        """jobs: dicts with cond, uncond (the family's prompt-embedding arguments, PromptEncoder.encode), seed,
        steps, guidance_scale, width, height. Returns one PIL image per job, in order. Jobs that share
        steps/CFG/size share batches. With `progress_every_s`, a line (images done / total, ETA) that often
        and after the last batch. `on_image(index, image)` as each batch comes (to write it while the next
        batch samples). A batch that runs out of GPU memory is tried again in halves, and so are the batches
        after it (one image that does not fit fails)."""
        import torch

        images: list = [None] * len(jobs)
        started = last_line = time.perf_counter()
        done = 0
        groups: dict = {}
        for index, job in enumerate(jobs):
            groups.setdefault((job["steps"], job["guidance_scale"], job["width"], job["height"]), []).append(index)
        for (steps, guidance_scale, width, height), indices in groups.items():
            start = 0
            while start < len(indices):
                batch = indices[start:start + batch_size]
                embeddings = {key: torch.cat([jobs[i]["cond"][key] for i in batch]).to(self.device, self.dtype)
                              for key in jobs[batch[0]]["cond"]}
                embeddings.update({f"negative_{key}": torch.cat([jobs[i]["uncond"][key] for i in batch]).to(
                    self.device, self.dtype) for key in jobs[batch[0]]["uncond"]})
                try:
                    output = self.pipe(
                        **embeddings,
                        generator=[torch.Generator(device="cpu").manual_seed(jobs[i]["seed"]) for i in batch],
                        num_inference_steps=steps, guidance_scale=guidance_scale, width=width, height=height)
                except torch.OutOfMemoryError:
                    if len(batch) == 1:
                        raise
                    del embeddings
                    self.pipe.vae.to(dtype=self.dtype)  # SDXL's pipeline upcasts it to decode, then back
                    torch.cuda.empty_cache()
                    batch_size = max(1, len(batch) // 2)  # each image keeps its own seed's noise
                    log(f"out of GPU memory sampling {len(batch)} images at once: batches of {batch_size} from "
                        "here on (samples.batch_size sets the first try)")
                    continue
                start += len(batch)
                for i, image in zip(batch, output.images):
                    images[i] = image
                    if on_image is not None:
                        on_image(i, image)
                done += len(batch)
                now = time.perf_counter()
                if progress_every_s and (now - last_line >= progress_every_s or done == len(jobs)):
                    last_line = now
                    log(f"sampled {done}/{len(jobs)} images in {now - started:.1f} s, "
                        f"ETA {(now - started) / done * (len(jobs) - done):.0f} s")
        return images

    def render_grid(self, *, subject: str, settings: SampleSettings, checkpoints: list[tuple[int, Path]],
                    prompts: list[SamplePrompt], out_dir: str | os.PathLike,
                    extra_embeddings: dict[str, str] | None = None, title: str = "",
                    log: Callable[[str], None] = print, progress_every_s: float | None = None,
                    trigger: str | None = None) -> dict:
        """Render step 0 and every checkpoint; write the images, images.tsv, grid.png, grid_preview.jpg.
        `trigger`: the word people type, shown in the column labels (the roster's output_name; None =
        `<subject>-ti`). Returns timings (seconds) and paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for word, path in sorted((extra_embeddings or {}).items()):
            self.encoder.set(word, [tensor.float() for tensor in self.family.read_vectors(path)])
        init_word, batch_size = settings.init_word, settings.batch_size
        columns = plan_columns(prompts, seeds=list(settings.seeds), steps=settings.steps,
                               guidance_scale=settings.guidance_scale, width=settings.width, height=settings.height)
        row_steps = [0] + [step for step, _ in checkpoints]
        jobs = []
        for step, path in [(0, None)] + list(checkpoints):
            if path is not None:
                self.encoder.set(subject, [tensor.float() for tensor in self.family.read_vectors(path)])
            token = init_word if path is None else subject
            encoded_texts: dict = {}  # the same text in several columns is encoded once per row
            for column in columns:
                where = f"prompt on line {column.prompt.line}"
                for text in (column.prompt.text.replace("{token}", token),
                             column.prompt.negative.replace("{token}", token)):
                    if text not in encoded_texts:
                        encoded_texts[text] = self.encoder.encode(text, where=where, log=log)
                cond = encoded_texts[column.prompt.text.replace("{token}", token)]
                uncond = encoded_texts[column.prompt.negative.replace("{token}", token)]
                jobs.append(dict(step=step, column=column, cond=cond, uncond=uncond, seed=column.seed,
                                 steps=column.steps, guidance_scale=column.guidance_scale, width=column.width,
                                 height=column.height))
        encoded = time.perf_counter()
        names = [image_name(job["step"], job["column"]) for job in jobs]
        # PNG encoding releases the GIL: threads write each batch's images while the GPU samples the next one,
        # and the grid and its preview on threads of their own once the last batch is in
        writer, grid_writer = (ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)),
                               ThreadPoolExecutor(max_workers=2))
        pending = []
        try:
            images = self.sample(jobs, batch_size, log, progress_every_s, on_image=lambda index, image: pending.append(
                writer.submit(save_png, image, out_dir / names[index])))
            sampled = time.perf_counter()
            rows = []
            for row, step in enumerate(row_steps):
                label = f"step 0 ({init_word})" if step == 0 else f"step {step}"
                rows.append((label, images[row * len(columns):(row + 1) * len(columns)]))
            grid = compose_grid(rows, [column.label(trigger or f"{subject}-ti") for column in columns],
                                title=title)
            grid_path = out_dir / "grid.png"
            pending.append(grid_writer.submit(save_png, grid, grid_path))
            pending.append(grid_writer.submit(write_preview, grid, out_dir / "grid_preview.jpg"))
            rows_table = ["\t".join(IMAGES_COLUMNS)]
            for job, name in zip(jobs, names):
                column = job["column"]
                rows_table.append("\t".join(str(value).replace("\t", " ") for value in (
                    job["step"], column.index, column.prompt.text, column.seed, column.prompt.negative,
                    column.steps, column.guidance_scale, column.width, column.height, name)))
            write_text_atomic(out_dir / "images.tsv", "\n".join(rows_table) + "\n")
        finally:
            writer.shutdown(wait=True)
            grid_writer.shutdown(wait=True)
        for future in pending:
            future.result()  # re-raise the first write error, if any
        written = time.perf_counter()
        timings = {"encode_s": encoded - started, "sample_s": sampled - encoded, "write_s": written - sampled,
                   "total_s": written - started}
        log(f"wrote {grid_path}: {len(rows)} rows (steps {row_steps}) x {len(columns)} columns (prompt x seed), "
            f"{len(images)} images in batches of {batch_size}; encode {timings['encode_s']:.2f}s, "
            f"sample {timings['sample_s']:.2f}s, write {timings['write_s']:.2f}s")
        return {"grid": grid_path, "rows": row_steps, "columns": len(columns), **timings}


def load_sampler(*, model: ModelSpec, scheduler: str, device: str) -> Sampler:
    """`model` loaded by its family for sampling (weights read straight onto the device, the UNet in the
    sampling dtype)."""
    from tifactory.device import pick_device

    family = family_named(model.family)
    target = pick_device(device)
    components = family.load(model, device=target, unet_dtype=Sampler.dtype_for(target))
    return Sampler(family, components, scheduler=scheduler, device=device)


def render_sample_grid(*, model: ModelSpec, settings: SampleSettings, subject: str,
                       checkpoint_dir: str | os.PathLike, prompts_file: str | os.PathLike,
                       out_dir: str | os.PathLike, extra_embeddings: dict[str, str] | None = None,
                       model_label: str = "", log: Callable[[str], None] = print,
                       progress_every_s: float | None = None, sampler: Sampler | None = None,
                       trigger: str | None = None) -> Path:
    """The samples stage: read the prompts, load the model (unless `sampler`, loaded already: the GPU worker,
    tifactory.worker), render the grid of every checkpoint (`trigger` labels its columns: Sampler.render_grid)."""
    prompts = read_prompts(prompts_file)
    checkpoints = list_checkpoints(checkpoint_dir)
    if not checkpoints:
        log(f"no checkpoints in {checkpoint_dir}: the grid has the step-0 row only")
    started = time.perf_counter()
    imported = 0.0
    if sampler is None:
        from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401 - timed
        from transformers import CLIPTextModel  # noqa: F401 - apart from reading the weights
        imported = time.perf_counter() - started
        sampler = load_sampler(model=model, scheduler=settings.scheduler, device=settings.device)
    log(f"loaded {model.name} ({model.family}) on {sampler.device} ({sampler.dtype}) in "
        f"{time.perf_counter() - started:.1f}s (of which {imported:.1f}s importing diffusers and transformers); "
        f"scheduler {settings.scheduler}")
    title = f"{subject} on {model_label or model.name} · {settings.scheduler}"
    result = sampler.render_grid(
        subject=subject, settings=settings, checkpoints=checkpoints, prompts=prompts, out_dir=out_dir,
        extra_embeddings=extra_embeddings, title=title, log=log, progress_every_s=progress_every_s,
        trigger=trigger)
    return result["grid"]
