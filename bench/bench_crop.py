"""Benchmark: photos/s of collect + crop on 12 MP JPEGs, side by side with autocrop's own Cropper.

    python bench/bench_crop.py [--photos 24] [--workers 2] [--autocrop-photos 12]

Builds N 4000x3000 JPEGs (quality 92) from scikit-image's astronaut placed at varied positions and
scales on a textured background (real photo pixels, a 12 MP camera's size), then times, in one run:
  tifactory: collect_photos + crop_faces (draft-mode JPEG decoding, `--workers` threads), end to end,
             manifest, PNG crops and contact sheet included;
  autocrop:  autocrop.Cropper(512, 512, face_percent=45).crop(path) per photo (its own API, one call at
             a time as it is documented), on the first `--autocrop-photos` of the same photos.
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

    from tifactory.demo import _package_file

    with Image.open(_package_file("skimage", "data/astronaut.png")) as opened:
        face = opened.convert("RGB")
    with Image.open(_package_file("skimage", "data/coffee.png")) as opened:
        texture = opened.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 6, (3000, 4000, 3))
    background = Image.fromarray(np.clip(np.asarray(texture, np.float64) + noise, 0, 255).astype(np.uint8))
    background = background.filter(ImageFilter.GaussianBlur(2))
    paths = []
    for i in range(count):
        side = int(rng.integers(900, 2400))
        x = int(rng.integers(0, 4000 - side))
        y = int(rng.integers(0, 3000 - side))
        photo = background.copy()
        photo.paste(face.resize((side, side), Image.Resampling.BICUBIC), (x, y))
        path = folder / f"photo_{i:03d}.jpg"
        photo.save(path, format="JPEG", quality=92)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--autocrop-photos", type=int, default=12)
    args = parser.parse_args()

    from tifactory.collect import collect_photos
    from tifactory.crop import crop_faces

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos_dir = root / "photos"
        photos_dir.mkdir()
        paths = make_photos(photos_dir, args.photos)
        megapixels = 4000 * 3000 / 1e6
        print(f"{len(paths)} photos of {megapixels:.0f} MP, {sum(p.stat().st_size for p in paths) / len(paths) / 1e6:.1f} MB each")

        cpu_started = time.process_time()
        started = time.perf_counter()
        raw = collect_photos([str(photos_dir)], root / "raw.tsv", workers=args.workers)
        collected = time.perf_counter()
        crops = crop_faces(root / "raw.tsv", root / "crops", root / "crops.tsv", workers=args.workers)
        finished = time.perf_counter()
        cpu = time.process_time() - cpu_started
        kept = int((crops["status"] == "kept").sum())
        ours = len(paths) / (finished - started)
        print(f"tifactory collect: {collected - started:.2f} s, crop: {finished - collected:.2f} s "
              f"({kept}/{len(paths)} kept, raw kept {int((raw['status'] == 'kept').sum())})")
        print(f"tifactory collect+crop: {ours:.2f} photos/s (workers={args.workers}); "
              f"CPU {cpu / len(paths) * 1000:.0f} ms/photo")

        from autocrop import Cropper

        cropper = Cropper(512, 512, face_percent=45)
        subset = paths[: args.autocrop_photos]
        cpu_started = time.process_time()
        started = time.perf_counter()
        found = 0
        for path in subset:
            result = cropper.crop(str(path))
            found += result is not None and getattr(result, "image", result) is not None
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        theirs = len(subset) / elapsed
        print(f"autocrop Cropper: {theirs:.2f} photos/s ({len(subset)} photos, {elapsed:.2f} s); "
              f"CPU {cpu / len(subset) * 1000:.0f} ms/photo")
        print(f"speed-up: x{ours / theirs:.1f}")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, "
              f"{platform.platform()}")


if __name__ == "__main__":
    main()
