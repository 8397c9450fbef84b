"""Sample grids: one row per checkpoint step (step 0 = the init word alone), one column per prompt × seed."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from tifactory.fileio import atomic_path

CHECKPOINT_STEP = re.compile(r"-step(\d+)\.safetensors$")
LABEL_HEIGHT = 18


class PromptError(ValueError):
    """The sample prompts file is unusable."""
ROW_LABEL_WIDTH = 96


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts, one per line; blank lines and `#` comments skipped; each must hold `{token}`."""
    prompts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{token}" not in line:
            raise PromptError(f"{path}, line {number}: prompt has no {{token}} placeholder: {line!r}")
        prompts.append(line)
    if not prompts:
        raise PromptError(f"{path}: no prompts")
    return prompts


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    found = []
    for path in Path(checkpoint_dir).glob("*.safetensors"):
        match = CHECKPOINT_STEP.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def make_scheduler(name: str, config):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    schedulers = {"ddim": DDIMScheduler, "euler_a": EulerAncestralDiscreteScheduler,
                  "dpmpp_2m": DPMSolverMultistepScheduler}
    return schedulers[name].from_config(config)


def compose_grid(rows: list[tuple[str, list]], column_labels: list[str]):
    """Paste images into a labelled grid: a label column on the left, a label row on top."""
    from PIL import Image, ImageDraw

    cell_w, cell_h = rows[0][1][0].size
    grid = Image.new("RGB", (ROW_LABEL_WIDTH + cell_w * len(column_labels),
                             LABEL_HEIGHT + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(column_labels):
        draw.text((ROW_LABEL_WIDTH + column * cell_w + 3, 3), label[: max(4, cell_w // 6)], fill="black")
    for row, (label, images) in enumerate(rows):
        top = LABEL_HEIGHT + row * cell_h
        draw.text((4, top + cell_h // 2 - 6), label, fill="black")
        for column, image in enumerate(images):
            grid.paste(image, (ROW_LABEL_WIDTH + column * cell_w, top))
    return grid


def render_sample_grid(*, base_model: str, base_model_config: str = "", vae: str = "", subject: str,
                       init_word: str, checkpoint_dir: str | os.PathLike, prompts_file: str | os.PathLike,
                       seeds: list[int], steps: int, guidance_scale: float, width: int, height: int,
                       scheduler: str, device: str, out_dir: str | os.PathLike,
                       log: Callable[[str], None] = print) -> Path:
    """Render every prompt × seed for step 0 and each checkpoint; write each image and grid.png."""
    import torch
    from diffusers import StableDiffusionPipeline

    from tifactory.models import load_components
    from tifactory.train import pick_device

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(prompts_file)
    checkpoints = list_checkpoints(checkpoint_dir)
    torch_device = pick_device(device)
    dtype = torch.float16 if torch_device.type == "cuda" else torch.float32
    components = load_components(base_model, vae=vae or None, config_dir=base_model_config or None)
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=make_scheduler(scheduler, components.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(torch_device, dtype)
    pipe.set_progress_bar_config(disable=True)

    def render(token_text: str) -> list:
        texts = [prompt.replace("{token}", token_text) for prompt in prompts for _ in seeds]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _ in prompts for seed in seeds]
        return pipe(prompt=texts, generator=generators, num_inference_steps=steps,
                    guidance_scale=guidance_scale, width=width, height=height).images

    rows = [("step 0", render(init_word))]
    for step, path in checkpoints:
        pipe.load_textual_inversion(str(path), token=subject)
        rows.append((f"step {step}", render(subject)))
        added = [token for token in pipe.tokenizer.get_added_vocab()
                 if token == subject or re.fullmatch(rf"{re.escape(subject)}_\d+", token)]
        pipe.unload_textual_inversion(added)
    column_labels = [f"{prompt.replace('{token}', '*')} s{seed}" for prompt in prompts for seed in seeds]

    for label, images in rows:
        step = int(label.split()[1])
        for index, image in enumerate(images):
            with atomic_path(out_dir / f"step{step:08d}_{index:02d}.png") as tmp_path:
                image.save(tmp_path, format="PNG")
    grid_path = out_dir / "grid.png"
    with atomic_path(grid_path) as tmp_path:
        compose_grid(rows, column_labels).save(tmp_path, format="PNG")
    log(f"wrote {grid_path}: {len(rows)} rows (steps) x {len(column_labels)} columns (prompt x seed)")
    return grid_path
