"""Peak memory of the sample grid's VAE decode: the whole batch at once against one image at a time.

The pipelines decode all of a batch's latents in one VAE call (diffusers' default); `samples.batch_size`
images at once. Activation memory grows with images x pixels, so this measures the decode's peak above
what was allocated before it, per image, with the family's real VAE architecture (resources/<family>/vae,
random weights), in a fresh process per case (peak RSS on CPU, max_memory_allocated on CUDA):

    python bench/bench_vae_decode.py --family sdxl --side 256 --images 1 2 4
    python bench/bench_vae_decode.py --family sd15 --side 512 --images 1 4 --device cuda --dtype float16

The decoder is convolutions at the image's pixels, so its activations scale with side^2; on CPU small
sides stand in for the large ones (the table also shows GiB per megapixel, to carry them over).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_gib() -> float:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def child(args) -> dict:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(REPO / "resources" / args.family / "vae")))
    vae.to(device, dtype).eval()
    if args.sliced:
        vae.enable_slicing()
    latents = torch.randn(args.n, 4, args.side // 8, args.side // 8, device=device, dtype=dtype)
    with torch.no_grad():  # a warm-up at one small image (kernels, allocator pools), not counted
        vae.decode(latents[:1, :, :8, :8])
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss_gib()
    started = time.perf_counter()
    with torch.no_grad():
        image = vae.decode(latents).sample
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    seconds = time.perf_counter() - started
    return {"family": args.family, "side": args.side, "images": args.n, "sliced": args.sliced, "dtype": args.dtype,
            "device": args.device, "decode_s": seconds, "peak_above_before_gib": peak - before,
            "finite": bool(torch.isfinite(image).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sdxl")
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--images", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="the decode's dtype (SDXL's VAE decodes in float32)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sliced", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for n in args.images:
        for sliced in (False, True):
            command = [sys.executable, __file__, "--child", "--family", args.family, "--side", str(args.side),
                       "--n", str(n), "--device", args.device, "--dtype", args.dtype, *(["--sliced"] if sliced else [])]
            completed = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    if args.json_out:
        Path(args.json_out).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    megapixels = args.side**2 / 1e6
    print(f"\n{'images':>6} {'decode':>10} {'peak GiB above':>15} {'GiB per image-MP':>17} {'seconds':>8}")
    for row in rows:
        decoded_at_once = 1 if row["sliced"] else row["images"]
        per_megapixel = row["peak_above_before_gib"] / decoded_at_once / megapixels
        print(f"{row['images']:>6} {'one by one' if row['sliced'] else 'batched':>10} "
              f"{row['peak_above_before_gib']:>15.2f} {per_megapixel:>17.2f} {row['decode_s']:>8.1f}")


if __name__ == "__main__":
    main()
