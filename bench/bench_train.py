"""Benchmark the real training code path (tifactory.training.train.train_embedding) on a random SD1.5-shaped model.

No weights can be downloaded, so the model is built with SD1.5's architecture and random weights, on the
target device. The published recipe: 15 samples per optimizer step at 512 px, bf16.

    python bench/bench_train.py --device cuda --steps 40 --variants eager1,eager15,compile15,cudagraph15
    python bench/bench_train.py --device cuda --steps 40 \
        --variants eager15-autocast,eager15,compile15-autocast,compile15@a,compile15@a,blocks15@b,blocks15@b
    python bench/bench_train.py --tiny --device cpu --steps 4 --variants eager15   # CPU smoke test

Variant = <kind><micro-batch>[-autocast][@cache]: kind eager (no compile), compile (torch.compile, the whole
model call), cudagraph (+ CUDA graphs), autotune (max-autotune-no-cudagraphs), blocks (`compile_scope:
blocks`: each repeated block compiled alone); `-autocast` runs the bf16 model under torch.autocast as
kohya does (`train.autocast: true`); variants naming the same `@cache` share one torch.compile cache folder
(the second one finds it warm), any other variant starts with an empty one (cold).

Prints one JSON line per variant and a table: ms per optimizer step, samples/s, TFLOP/s (1.36 TFLOP per
sample at 512 px: UNet forward + input-gradient backward + CLIP), peak GPU memory, and start-up costs
(load, latent caching, first step incl. compilation) separately.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TFLOP_PER_SAMPLE_512 = 1.36
RECIPE_STEPS = 1000
# variant = <name><micro-batch>: eager15, compile15 (torch.compile), cudagraph15 (compile + CUDA graphs), ...
COMPILE_MODES = {"eager": False, "compile": True, "cudagraph": "reduce-overhead",
                 "autotune": "max-autotune-no-cudagraphs", "blocks": True}


def parse_variant(variant: str) -> dict:
    """'compile15-autocast@a' -> kind, micro-batch, autocast flag and cache tag."""
    name, _, cache = variant.partition("@")
    name, _, flag = name.partition("-")
    kind = name.rstrip("0123456789")
    if kind not in COMPILE_MODES or flag not in ("", "autocast"):
        raise SystemExit(f"unknown variant {variant!r}")
    return {"kind": kind, "micro_batch": int(name[len(kind):] or 15), "autocast": flag == "autocast",
            "cache": cache}


def build_random_sd15(device: str, tiny: bool, workdir: Path):
    """Components with SD1.5's shapes (or the tiny test model's) and random weights, built on `device`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tifactory.training.models import Components
    from tifactory.demo.tinymodel import build_tiny_model, write_tiny_tokenizer

    if tiny:
        from tifactory.training.models import load_components
        return load_components(build_tiny_model(workdir / "tiny-model"))
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(workdir / "tokenizer")))
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), sample_size=512,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    return Components(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                      noise_scheduler=scheduler)


def make_dataset(root: Path, num_images: int, size: int) -> Path:
    """Smooth random colour images in a kohya folder + dataset.toml (timing does not depend on content)."""
    import numpy as np
    from PIL import Image

    from tifactory.photos.dataset import dataset_toml_text

    folder = root / "100_bench woman"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(num_images):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{index:03d}.png")
    bucket = {"enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 2048, "bucket_reso_steps": 64,
              "bucket_no_upscale": True}
    toml = root / "dataset.toml"
    toml.write_text(dataset_toml_text(image_dir=str(folder), repeats=100, class_tokens="bench woman",
                                      resolution=size, bucket=bucket))
    return toml


def run_variant(variant: str, args) -> dict:
    import yaml

    from tifactory.training.train import train_embedding

    spec = parse_variant(variant)
    with open(REPO / "config.yaml", encoding="utf-8") as handle:
        params = dict(yaml.safe_load(handle)["train"])
    params.update(init_word="woman", max_train_steps=args.steps, save_every_n_steps=args.steps,
                  micro_batch_size=spec["micro_batch"], compile=COMPILE_MODES[spec["kind"]], device=args.device,
                  resolution=args.resolution, autocast=spec["autocast"],
                  compile_scope="blocks" if spec["kind"] == "blocks" else "model")
    workdir = Path(tempfile.mkdtemp(prefix="tifactory-bench-"))
    built = time.perf_counter()
    components = build_random_sd15(args.device, args.tiny, workdir)
    build_s = time.perf_counter() - built
    toml = make_dataset(workdir / "dataset", args.images, args.resolution)
    result = train_embedding(dataset_toml=toml, base_model="random-sd15" if not args.tiny else "tiny",
                             subject="benchsubject", params=params, final_path=workdir / "out.safetensors",
                             checkpoint_dir=workdir / "checkpoints", loss_tsv=workdir / "loss.tsv",
                             state_dir=workdir / "state", log=lambda message: print(f"  [{variant}] {message}",
                                                                                   file=sys.stderr),
                             components=components)
    stats = dict(result.stats, variant=variant, build_model_s=build_s,
                 compile_cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))
    step_ms = stats.get("steady_ms_per_step")
    if step_ms:
        samples_per_step = stats["samples_per_step"]
        stats["samples_per_s"] = samples_per_step / (step_ms / 1000)
        stats["tflops"] = TFLOP_PER_SAMPLE_512 * (args.resolution / 512) ** 2 * stats["samples_per_s"]
        stats["recipe_estimate_s"] = (stats["load_s"] + stats["cache_latents_s"] + stats["first_step_s"]
                                      + (RECIPE_STEPS - 1) * step_ms / 1000)
    return stats


KERNEL_FAMILIES = [  # (family, substrings of CUDA kernel names), first match wins
    ("attention (flash / efficient)", ("flash", "fmha", "attention", "attn")),
    ("matmul / linear (GEMM)", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul")),
    ("convolution", ("conv", "implicit", "wgrad", "dgrad", "fprop")),
    ("group / layer norm", ("norm", "welford")),
    ("element-wise, reductions, copies", ("elementwise", "vectorized", "reduce", "copy", "triton", "fill",
                                          "index", "cat", "softmax", "gelu", "silu")),
]


def profile_variant(variant: str, args) -> None:
    """Run one variant under torch.profiler; write CUDA kernel time by family and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        stats = run_variant(variant, args)
    kernels = [event for event in prof.key_averages() if event.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(event.self_device_time_total for event in kernels) or 1.0
    families: dict[str, float] = {}
    for event in kernels:
        name = event.key.lower()
        family = next((label for label, needles in KERNEL_FAMILIES if any(n in name for n in needles)), "other")
        families[family] = families.get(family, 0.0) + event.self_device_time_total
    lines = [f"variant {variant}, {args.steps} steps; CUDA kernel time {total / 1e6:.2f} s in all "
             f"(includes latent caching); run stats {json.dumps(stats)}", "", "share  seconds  family"]
    for family, micros in sorted(families.items(), key=lambda item: -item[1]):
        lines.append(f"{100 * micros / total:5.1f}%  {micros / 1e6:7.2f}  {family}")
    lines += ["", "share  seconds   calls  kernel"]
    for event in sorted(kernels, key=lambda e: -e.self_device_time_total)[:30]:
        lines.append(f"{100 * event.self_device_time_total / total:5.1f}%  {event.self_device_time_total / 1e6:7.2f}"
                     f"  {event.count:6d}  {event.key[:140]}")
    Path(args.profile_out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[:40]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--variants", default="eager15,eager5,compile15,compile15")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (CPU smoke test)")
    parser.add_argument("--budget-s", type=float, default=0, help="start no variant after this many seconds")
    parser.add_argument("--cache-root", default="", help="folder for the variants' torch.compile caches "
                                                          "(default: a new temporary folder, i.e. cold)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process
    parser.add_argument("--json-out", help="append each variant's JSON line to this file")
    parser.add_argument("--profile-out", help="profile the first variant's run with torch.profiler and write "
                                              "its CUDA time by kernel family and top kernels here (no timing)")
    args = parser.parse_args()

    if args.profile_out:
        profile_variant(args.variants.split(",")[0], args)
        return
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args)), flush=True)
        return
    rows = []
    bench_started = time.perf_counter()
    cache_root = Path(args.cache_root or tempfile.mkdtemp(prefix="tifactory-compile-cache-"))
    for number, variant in enumerate(args.variants.split(",")):
        tag = parse_variant(variant)["cache"] or f"cold{number}"  # untagged: a cache of its own, empty
        if args.budget_s and time.perf_counter() - bench_started > args.budget_s:
            rows.append({"variant": variant, "error": f"skipped: the {args.budget_s:.0f} s budget is spent"})
            continue
        # each variant in a fresh process: compile caches are then tested across processes, like jobs
        command = [sys.executable, __file__, "--one", variant] + [
            f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
            if key in ("device", "steps", "images", "resolution")] + (["--tiny"] if args.tiny else [])
        started = time.perf_counter()
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_root / tag))
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        if args.json_out:  # the variant's own log (train_embedding's messages, warnings), for the record
            with open(args.json_out + ".log", "a", encoding="utf-8") as handle:
                handle.write(f"==== {variant} (exit {completed.returncode}, {wall:.1f} s)\n{completed.stderr}\n")
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode != 0 or not lines:
            print(completed.stderr[-3000:], file=sys.stderr)
            rows.append({"variant": variant, "error": f"exit {completed.returncode}"})
            continue
        row = json.loads(lines[-1][len("RESULT "):])
        row["process_wall_s"] = wall
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json_out:
            with open(args.json_out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
    print(f"\n{'variant':<22}{'ms/step':>9}{'samples/s':>11}{'TFLOP/s':>9}{'peak GiB':>10}{'load s':>8}"
          f"{'cache s':>9}{'1st step s':>11}{'recipe s':>10}")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<22} {row['error']}")
            continue
        print(f"{row['variant']:<22}{row.get('steady_ms_per_step', float('nan')):>9.1f}"
              f"{row.get('samples_per_s', float('nan')):>11.1f}{row.get('tflops', float('nan')):>9.1f}"
              f"{row.get('peak_memory_gib', float('nan')):>10.2f}{row['load_s']:>8.1f}"
              f"{row['cache_latents_s']:>9.1f}{row['first_step_s']:>11.1f}"
              f"{row.get('recipe_estimate_s', float('nan')):>10.1f}")


if __name__ == "__main__":
    main()
