"""Benchmark: the likeness stage (score_subject) on a 6 x 8 sample grid with the default face models.

    python bench/bench_likeness.py [--steps 6] [--images 8] [--crops 12] [--cores 2] [--rounds 2] [--workers 2]

Builds `--crops` 512 px training crops (scikit-image's astronaut, shifted, turned and re-lit copies) and a
sample grid of `--steps` rows x `--images` 512 px images (per row: astronaut copies, the people of
insightface's t1.jpg and one image without a face), then times `score_subject` end to end (model loading,
reference, every sample, scores.tsv, the plot) with config.yaml's `faces:` settings (no insightface pack:
YuNet + dlib). Reports wall seconds and CPU seconds (process time: less sensitive than wall time to other
work on the box) per round.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_inputs(root: Path, steps: int, images: int, crops: int) -> None:
    import numpy as np
    from PIL import Image, ImageEnhance

    from tifactory.demo.photos import package_file

    with Image.open(package_file("skimage", "data/astronaut.png")) as opened:
        astronaut = opened.convert("RGB")
    with Image.open(package_file("insightface", "data/images/t1.jpg")) as opened:
        t1 = opened.convert("RGB")
    people = [t1.crop(box).resize((512, 512), Image.Resampling.BICUBIC)
              for box in [(10, 180, 260, 430), (380, 180, 640, 440), (200, 60, 420, 280), (680, 270, 920, 510)]]
    rng = np.random.default_rng(0)

    def variant(i: int) -> Image.Image:
        turned = astronaut.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BICUBIC,
                                  translate=(int(rng.integers(-30, 30)), int(rng.integers(-20, 20))))
        return ImageEnhance.Brightness(turned).enhance(float(rng.uniform(0.7, 1.2)))

    (root / "crops").mkdir()
    lines = ["source\tstatus\treason\toutput"]
    for i in range(crops):
        variant(i).save(root / "crops" / f"{i:03d}_a.png")
        lines.append(f"a{i}.jpg\tkept\t\t{i:03d}_a.png")
    (root / "crops" / "manifest.tsv").write_text("\n".join(lines) + "\n")
    (root / "samples").mkdir()
    (root / "checkpoints").mkdir()
    table = ["step\tcolumn\tfile"]
    for row in range(steps):
        step = row * 200
        for column in range(images):
            if column == images - 1:
                image = Image.new("RGB", (512, 512), (int(rng.integers(0, 255)), 90, 120))  # no face
            elif column % 2:
                image = people[(row + column) % len(people)]
            else:
                image = variant(column)
            name = f"step{step:08d}_p{column:02d}.png"
            image.save(root / "samples" / name)
            table.append(f"{step}\t{column}\t{name}")
        if step:
            (root / "checkpoints" / f"s-ti-step{step:08d}.safetensors").write_bytes(b"stand-in checkpoint")
    (root / "samples" / "images.tsv").write_text("\n".join(table) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--crops", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="threads embedding the images (the rule's threads)")
    parser.add_argument("--cores", type=int, default=2, help="pin the process to this many CPUs (Linux)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and args.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    import yaml

    import tifactory.sampling.likeness  # noqa: F401 - imported before the clock, like a job's imports
    from tifactory.faces.models import FaceSettings
    from tifactory.sampling.likeness import score_subject

    with open(Path(__file__).resolve().parent.parent / "config.yaml", encoding="utf-8") as handle:
        settings = FaceSettings.from_config(yaml.safe_load(handle)["faces"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_inputs(root, args.steps, args.images, args.crops)
        print(f"{args.steps} x {args.images} sample grid, {args.crops} crops, 512 px; "
              f"{len(os.sched_getaffinity(0))} cores; load average {os.getloadavg()[0]:.1f}")
        for round_ in range(args.rounds):
            said: list[str] = []
            cpu, started = time.process_time(), time.perf_counter()
            result = score_subject(subject="s", images_tsv=root / "samples" / "images.tsv", crops_dir=root / "crops",
                                   checkpoint_dir=root / "checkpoints", scores_tsv=root / "scores.tsv",
                                   plot_png=root / "likeness.png", summary_json=root / "likeness.json",
                                   settings=settings, workers=args.workers, log=said.append)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            print(f"round {round_ + 1}: {wall:.2f} s wall, {cpu:.2f} s CPU (load average {os.getloadavg()[0]:.1f}); "
                  f"{result['recogniser']}, best step {result['best_step']}")
        print((root / "scores.tsv").read_text())


if __name__ == "__main__":
    main()
