"""Benchmark: photos/s of collect + crop on 12 MP JPEGs, side by side with autocrop's own Cropper.

    python bench/bench_crop.py [--photos 24] [--workers 2] [--autocrop-photos 12] [--rounds 2] [--cores 2]
                               [--no-autocrop]

Builds N 4000x3000 JPEGs (quality 92) from scikit-image's astronaut placed at varied positions and
scales on a textured background (real photo pixels, a 12 MP camera's size; shifted and mirrored per
photo so that no two are near-duplicates and every photo goes the whole way), then times, in one run:
  tifactory: collect_photos + crop_faces (draft-mode JPEG decoding, `--workers` threads), end to end,
             manifest, PNG crops and contact sheet included, with config.yaml's settings: the identity
             filter on (dlib's descriptor, no insightface pack), and once more with it off (the ratio is
             the identity filter's cost);
  autocrop:  autocrop.Cropper(512, 512, face_percent=45).crop(path) per photo (its own API, one call at
             a time as it is documented), on the first `--autocrop-photos` of the same photos.
Imports and model loading (pandas, OpenCV, PIL, autocrop's Cropper) happen before either clock starts.
The two sides alternate `--rounds` times and each side's best round is reported, with CPU ms per photo
(process time, the dlib worker processes' included: less sensitive than wall time to other work on the
box).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_photos(folder: Path, count: int) -> list[Path]:
    import numpy as np
    from PIL import Image, ImageFilter

    from tifactory.demo.photos import package_file

    with Image.open(package_file("skimage", "data/astronaut.png")) as opened:
        face = opened.convert("RGB")
    with Image.open(package_file("skimage", "data/coffee.png")) as opened:
        texture = opened.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 6, (3000, 4000, 3))
    background = Image.fromarray(np.clip(np.asarray(texture, np.float64) + noise, 0, 255).astype(np.uint8))
    background = np.asarray(background.filter(ImageFilter.GaussianBlur(2)))
    paths = []
    for i in range(count):
        side = int(rng.integers(900, 2400))
        x = int(rng.integers(0, 4000 - side))
        y = int(rng.integers(0, 3000 - side))
        shifted = np.roll(background, (int(rng.integers(0, 3000)), int(rng.integers(0, 4000))), axis=(0, 1))
        photo = Image.fromarray(shifted[:, ::-1] if i % 2 else shifted)
        photo.paste(face.resize((side, side), Image.Resampling.BICUBIC), (x, y))
        path = folder / f"photo_{i:03d}.jpg"
        photo.save(path, format="JPEG", quality=92)
        paths.append(path)
    return paths


def repo_config() -> dict:
    import yaml

    with open(Path(__file__).resolve().parent.parent / "config.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def settings(identity: bool):
    from tifactory.photos.crop import CropSettings

    return CropSettings.from_config(repo_config(), identity_filter=identity)


def cpu_seconds() -> float:
    """CPU time of this process and of its ended child processes (the crop stage's dlib workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def run_ours(photos_dir: Path, out: Path, workers: int, count: int, identity: bool) -> dict:
    from tifactory.photos.collect import CollectSettings, collect_photos
    from tifactory.photos.crop import crop_faces, read_identity

    chosen = settings(identity)
    cpu_started = cpu_seconds()
    started = time.perf_counter()
    raw = collect_photos([str(photos_dir)], out / "raw.tsv", CollectSettings.from_config(repo_config()),
                         workers=workers)
    collected = time.perf_counter()
    crops = crop_faces(out / "raw.tsv", out / "crops", out / "crops.tsv", chosen, workers=workers)
    finished = time.perf_counter()
    cpu = cpu_seconds() - cpu_started
    kept = int((crops["status"] == "kept").sum())
    result = {"photos_s": count / (finished - started), "cpu_ms": cpu / count * 1000}
    outcome = read_identity(out / "crops")
    print(f"  tifactory identity {outcome.get('filter')} ({outcome.get('model', '-')}): collect "
          f"{collected - started:.2f} s + crop {finished - collected:.2f} s "
          f"({kept}/{count} kept, raw kept {int((raw['status'] == 'kept').sum())}): "
          f"{result['photos_s']:.2f} photos/s (workers={workers}), CPU {result['cpu_ms']:.0f} ms/photo")
    return result


def run_autocrop(cropper, paths: list[Path]) -> dict:
    cpu_started = time.process_time()
    started = time.perf_counter()
    found = 0
    for path in paths:
        result = cropper.crop(str(path))
        found += result is not None and getattr(result, "image", result) is not None
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    result = {"photos_s": len(paths) / elapsed, "cpu_ms": cpu / len(paths) * 1000}
    print(f"  autocrop Cropper ({len(paths)} photos, {found} cropped, {elapsed:.2f} s): "
          f"{result['photos_s']:.2f} photos/s, CPU {result['cpu_ms']:.0f} ms/photo")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--autocrop-photos", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternate tifactory and autocrop this many times; report each side's best "
                             "(other processes on the box slow both sides alike)")
    parser.add_argument("--cores", type=int, default=2, help="pin the process to this many CPUs (Linux)")
    parser.add_argument("--no-autocrop", action="store_true", help="time tifactory only")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity") and args.cores:
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[: args.cores])
    import cv2  # noqa: F401 - imported before the clocks start, like autocrop's own imports
    import pandas  # noqa: F401
    from autocrop import Cropper

    import tifactory.photos.collect  # noqa: F401
    import tifactory.photos.crop  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos_dir = root / "photos"
        photos_dir.mkdir()
        paths = make_photos(photos_dir, args.photos)
        megapixels = 4000 * 3000 / 1e6
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"{len(paths)} photos of {megapixels:.0f} MP, {sum(p.stat().st_size for p in paths) / len(paths) / 1e6:.1f} "
              f"MB each; {cores} cores; load average at the start {os.getloadavg()[0]:.1f}")
        cropper = None if args.no_autocrop else Cropper(512, 512, face_percent=45)
        ours, plain, theirs = [], [], []
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} (load average {os.getloadavg()[0]:.1f})")
            ours.append(run_ours(photos_dir, root / f"out{round_}", args.workers, len(paths), identity=True))
            plain.append(run_ours(photos_dir, root / f"plain{round_}", args.workers, len(paths), identity=False))
            if cropper is not None:
                theirs.append(run_autocrop(cropper, paths[: args.autocrop_photos]))
        best_ours, best_plain = max(r["photos_s"] for r in ours), max(r["photos_s"] for r in plain)
        cpu_ours, cpu_plain = min(r["cpu_ms"] for r in ours), min(r["cpu_ms"] for r in plain)
        print(f"best: tifactory identity on {best_ours:.2f} photos/s ({cpu_ours:.0f} CPU ms/photo), off "
              f"{best_plain:.2f} photos/s ({cpu_plain:.0f} CPU ms/photo): the identity filter costs "
              f"x{cpu_ours / cpu_plain:.2f} CPU; on {cores} idle cores at most {cores * 1000 / cpu_ours:.1f} photos/s "
              f"with it")
        if theirs:
            best_theirs = max(r["photos_s"] for r in theirs)
            cpu_theirs = min(r["cpu_ms"] for r in theirs)
            print(f"autocrop {best_theirs:.2f} photos/s: tifactory (identity on) x{best_ours / best_theirs:.1f}; "
                  f"CPU per photo autocrop {cpu_theirs:.0f} ms: x{cpu_theirs / cpu_ours:.1f} more than tifactory")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, "
              f"{platform.platform()}")


if __name__ == "__main__":
    main()
