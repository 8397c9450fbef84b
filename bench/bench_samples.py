"""Time the samples stage's real code path on a random-weight SD1.5-shaped model.

Full size (GPU):  python bench/bench_samples.py --device cuda
    builds SD1.5's UNet (860M), VAE and CLIP text encoder (768 wide, 12 layers) with random weights, then
    renders a grid of 6 steps (step 0 + 5 checkpoints) x 8 images (4 prompts x 2 seeds) at 512 px, 30 steps,
    CFG 7.5, and prints load time and grid time separately. Target on an H200: grid <= 10 s after load.
Smoke test (CPU): python bench/bench_samples.py --tiny --device cpu
The default grid (2 prompts x 2 seeds x 6 rows = 24 images) at three batch settings, one process:
    python bench/bench_samples.py --device cuda --prompts 2 --batch-size 8,24,24cl
    (`cl`: the UNet in channels_last memory layout)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512,
)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
PROMPTS = ["a photo of {token}", "portrait of {token}, studio lighting", "(photo of {token}:0.8) at the beach",
           "a close up photo of {token} smiling --n blurry, dark"]


def full_size_components(workdir: Path, seed: int = 0, device: str = "cpu"):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tifactory.demo.tinymodel import SD15_SCHEDULER_CONFIG, write_tiny_tokenizer
    from tifactory.families.base import Components

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(workdir / "tokenizer"))
    with torch.device(device):  # random init where the model will run (fast on a GPU)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id,
                                                    pad_token_id=tokenizer.pad_token_id)).eval()
        unet = UNet2DConditionModel(**SD15_UNET).eval()
        vae = AutoencoderKL(**SD15_VAE).eval()
    scheduler = DDPMScheduler.from_config({k: v for k, v in SD15_SCHEDULER_CONFIG.items()
                                           if k not in ("skip_prk_steps",)})
    return Components(tokenizers=[tokenizer], text_encoders=[text_encoder], vae=vae, unet=unet,
                      noise_scheduler=scheduler)


def write_checkpoints(folder: Path, subject: str, steps: list[int], num_vectors: int = 5, seed: int = 0):
    import torch

    from tifactory.training.embedding import save_embedding

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for step in steps:
        vectors = torch.randn(num_vectors, 768, generator=generator) * 0.02
        save_embedding(folder / f"{subject}-ti-step{step:08d}.safetensors", vectors, {"tifactory.step": str(step)},
                       "bf16")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny random model, 64 px, 2 steps (CPU smoke test)")
    parser.add_argument("--rows", type=int, default=6, help="grid rows: step 0 + rows-1 checkpoints")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch-size", default="48", help="comma-separated; suffix cl = UNet channels_last")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    parser.add_argument("--scheduler", default="ddim", choices=["ddim", "euler_a", "dpmpp_2m"])
    parser.add_argument("--repeat", type=int, default=2, help="grids to render (the first warms up)")
    parser.add_argument("--out", default="", help="output folder (default: a temporary one)")
    parser.add_argument("--json", default="", help="also write the timings here")
    args = parser.parse_args(argv)

    import torch

    from tifactory.sampling.prompts import parse_prompt_line
    from tifactory.families import ModelSpec, family_named, load_model
    from tifactory.sampling.samples import SampleSettings, Sampler
    from tifactory.training.embedding import list_checkpoints

    steps = args.steps or (2 if args.tiny else 30)
    size = args.size or (64 if args.tiny else 512)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = Path(args.out) if args.out else tmp / "samples"
        started = time.perf_counter()
        if args.tiny:
            from tifactory.demo.tinymodel import build_tiny_model

            components = load_model(ModelSpec(path=build_tiny_model(tmp / "tiny", seed=0), family="sd15"))
        else:
            components = full_size_components(tmp, device="cuda" if args.device.startswith("cuda") else "cpu")
        sampler = Sampler(family_named("sd15"), components, scheduler=args.scheduler, device=args.device)
        if sampler.device.type == "cuda":
            torch.cuda.synchronize()
        load_s = time.perf_counter() - started
        write_checkpoints(tmp / "checkpoints", "subj", [200 * i for i in range(1, args.rows)])
        prompts = [parse_prompt_line(p) for p in PROMPTS[:args.prompts]]
        reports = []
        for setting in args.batch_size.split(","):
            channels_last = setting.endswith("cl")
            batch_size = int(setting.removesuffix("cl"))
            sampler.pipe.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            results = []
            for _ in range(max(1, args.repeat)):
                t0 = time.perf_counter()
                settings = SampleSettings(seeds=[1, 2], steps=steps, guidance_scale=7.5, width=size, height=size,
                                          scheduler=args.scheduler, device=args.device, batch_size=batch_size,
                                          init_word="woman")
                result = sampler.render_grid(
                    subject="subj", settings=settings, checkpoints=list_checkpoints(tmp / "checkpoints"),
                    prompts=prompts, out_dir=out, log=lambda message: print(message, flush=True))
                if sampler.device.type == "cuda":
                    torch.cuda.synchronize()
                results.append(time.perf_counter() - t0)
            images = len(result["rows"]) * result["columns"]
            report = {"device": str(sampler.device), "gpu": torch.cuda.get_device_name(sampler.device)
                      if sampler.device.type == "cuda" else "", "dtype": str(sampler.dtype), "tiny": args.tiny,
                      "rows": len(result["rows"]), "columns": result["columns"], "images": images, "steps": steps,
                      "size": size, "batch_size": batch_size, "channels_last": channels_last,
                      "scheduler": args.scheduler, "load_s": round(load_s, 2), "grid_s": [round(r, 2) for r in results],
                      "last_grid_phases_s": {k: round(result[k], 2) for k in ("encode_s", "sample_s", "write_s")},
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                      if sampler.device.type == "cuda" else None}
            reports.append(report)
            print(f"grid ({len(result['rows'])} steps x {result['columns']} images = {images}, {steps} steps, {size} px,"
                  f" batch {setting}): " + ", ".join(f"{r:.2f} s" for r in results) + " (first includes warm-up)")
            print(json.dumps(report), flush=True)
        print(f"load: {load_s:.2f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")
        assert (out / "grid.png").is_file()
    return 0


if __name__ == "__main__":
    sys.exit(main())
