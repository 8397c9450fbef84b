"""Benchmark the real training code path (tifactory.training.train.train_embedding) on a random SD1.5-shaped model.

No weights can be downloaded, so the model is built with SD1.5's architecture and random weights, on the
target device. The published recipe: 15 samples per optimizer step at 512 px, bf16.

    python bench/bench_train.py --device cuda --steps 40 --variants eager1,eager15,compile15,cudagraph15
    python bench/bench_train.py --device cuda --steps 40 \
        --variants eager15-autocast,eager15,compile15-autocast,compile15@a,compile15@a,blocks15@b,blocks15@b
    python bench/bench_train.py --device cuda --steps 40 --profile-out prof/ \
        --variants compile15@a,compile15-prof@a,eager15-flops   # kernel profile of the warm compiled step
    python bench/bench_train.py --tiny --device cpu --steps 4 --variants eager15   # CPU smoke test
    python bench/bench_train.py --family sdxl --resolution 1024 --device cuda --steps 12 \
        --variants eager15,eager2-gc,compile15   # SDXL: the recipe's micro-batch, the 24 GB setting

Variant = <kind><micro-batch>[-flag...][@cache]: kind eager (no compile), compile (torch.compile, the whole
model call), cudagraph (+ CUDA graphs), autotune (max-autotune-no-cudagraphs), blocks (`compile_scope:
blocks`: each repeated block compiled alone); variants naming the same `@cache` share one torch.compile
cache folder (the second one finds it warm), any other variant starts with an empty one (cold). Flags:
`-gc` turns on `train.gradient_checkpointing`; `-autocast` runs the bf16 model under torch.autocast as kohya does (`train.autocast: true`);
`-cudnn`/`-flash`/`-efficient`/`-math` allow only that scaled-dot-product-attention backend (the whole
run, compilation included, inside `torch.nn.attention.sdpa_kernel`); `-prof` runs torch.profiler (CPU ops + CUDA; `-profgpu`: CUDA only, less overhead) over
steady steps only (`--profile-skip` steps after the first, then 2 warm-up and `--profile-steps` recorded
steps, counted by an optimizer-step hook) and writes kernel time by category, GPU-busy time and the top
kernels to `--profile-out`; `-flops` counts the FLOPs of the text encoder + UNet per step by op
(torch.utils.flop_counter; use it with an eager variant) into `--profile-out`.

Prints one JSON line per variant and a table: ms per optimizer step, samples/s, TFLOP/s (1.36 TFLOP per
sample at 512 px: UNet forward + input-gradient backward + CLIP, attention left out; with it 1.75), peak GPU memory
of the training (the random model's build is left out: its peak is `build_peak_gib`) and its floor (memory
allocated when the loop starts: weights, latents, vectors), and start-up costs (load, latent caching, first
step incl. compilation) separately.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# kept for comparison with earlier records: it leaves attention out. Counted with `-flops` on the H200
# (2026-12-02): 1.75 TFLOP per sample with attention (GEMM 0.49, convolution 0.87, attention 0.39)
TFLOP_PER_SAMPLE_512 = 1.36
TFLOP_PER_SAMPLE_1024_SDXL = 14.9  # SDXL at 1024 px, attention included (a -flops count on the H200, issue 19)
RECIPE_STEPS = 1000
# variant = <name><micro-batch>: eager15, compile15 (torch.compile), cudagraph15 (compile + CUDA graphs), ...
COMPILE_MODES = {"eager": False, "compile": True, "cudagraph": "reduce-overhead",
                 "autotune": "max-autotune-no-cudagraphs", "blocks": True}


SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")
FLAGS = ("autocast", "prof", "profgpu", "flops", "gc") + SDPA_BACKENDS


def parse_variant(variant: str) -> dict:
    """'compile15-autocast-flash@a' -> kind, micro-batch, flags and cache tag."""
    name, _, cache = variant.partition("@")
    name, *flags = name.split("-")
    kind = name.rstrip("0123456789")
    backends = [flag for flag in flags if flag in SDPA_BACKENDS]
    if kind not in COMPILE_MODES or any(flag not in FLAGS for flag in flags) or len(backends) > 1:
        raise SystemExit(f"unknown variant {variant!r}")
    return {"kind": kind, "micro_batch": int(name[len(kind):] or 15), "autocast": "autocast" in flags,
            "sdpa": backends[0] if backends else "", "profile": "prof" in flags or "profgpu" in flags,
            "profile_cpu": "prof" in flags, "flops": "flops" in flags, "checkpointing": "gc" in flags,
            "cache": cache}


def build_random_sd15(device: str, tiny: bool, workdir: Path):
    """Components with SD1.5's shapes (or the tiny test model's) and random weights, built on `device`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tifactory.demo.tinymodel import build_tiny_model, write_tiny_tokenizer
    from tifactory.families import ModelSpec, load_model
    from tifactory.families.base import Components

    if tiny:
        return load_model(ModelSpec(path=build_tiny_model(workdir / "tiny-model"), family="sd15"))
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
    return Components(tokenizers=[tokenizer], text_encoders=[text_encoder], vae=vae, unet=unet,
                      noise_scheduler=scheduler)


def build_random_sdxl(device: str):
    """Components with SDXL base's shapes (resources/sdxl/'s configs and tokenizers) and random weights, built on
    `device` (2.6 B UNet parameters: seconds on a GPU)."""
    import json

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    from tifactory.families import family_named
    from tifactory.families.base import Components

    family = family_named("sdxl")
    root = REPO / "resources" / "sdxl"
    tokenizers = [CLIPTokenizer.from_pretrained(str(root / name)) for name in ("tokenizer", "tokenizer_2")]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(root / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(root / "vae")))
        text_encoders = [family.text_encoder_class(index)(CLIPTextConfig.from_pretrained(str(root / name)))
                         for index, name in enumerate(("text_encoder", "text_encoder_2"))]
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    return Components(tokenizers=tokenizers, text_encoders=text_encoders, vae=vae, unet=unet,
                      noise_scheduler=family.noise_scheduler(config))


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

    from tifactory.families import ModelSpec
    from tifactory.training.settings import TrainSettings
    from tifactory.training.train import train_embedding

    spec = parse_variant(variant)
    with open(REPO / "config.yaml", encoding="utf-8") as handle:
        params = dict(yaml.safe_load(handle)["train"])
    params.update(init_word="woman", max_train_steps=args.steps, save_every_n_steps=args.save_every or args.steps,
                  micro_batch_size=spec["micro_batch"], compile=COMPILE_MODES[spec["kind"]], device=args.device,
                  resolution=args.resolution, autocast=spec["autocast"],
                  compile_scope="blocks" if spec["kind"] == "blocks" else "model",
                  gradient_checkpointing=spec["checkpointing"])
    workdir = Path(tempfile.mkdtemp(prefix="tifactory-bench-"))
    built = time.perf_counter()
    if args.family == "sdxl" and args.tiny:
        from tifactory.demo.tinymodel_sdxl import build_tiny_sdxl_model
        from tifactory.families import load_model

        components = load_model(ModelSpec(path=build_tiny_sdxl_model(workdir / "tiny-sdxl"), family="sdxl"))
    elif args.family == "sdxl":
        components = build_random_sdxl(args.device)
    else:
        components = build_random_sd15(args.device, args.tiny, workdir)
    build_s = time.perf_counter() - built
    build_peak_gib = None
    if args.device.startswith("cuda"):  # the random build's peak (fp32 on the GPU) is not the training's
        import torch

        if params["mixed_precision"] == "bf16":  # as train_embedding places them (there, then, a no-op)
            for module in (components.unet, *components.text_encoders):
                module.to(dtype=torch.bfloat16)
        build_peak_gib = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    toml = make_dataset(workdir / "dataset", args.images, args.resolution)
    with contextlib.ExitStack() as stack:
        if spec["sdpa"]:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([getattr(SDPBackend, spec["sdpa"].upper().replace(
                "EFFICIENT", "EFFICIENT_ATTENTION").replace("CUDNN", "CUDNN_ATTENTION"))]))
        profiler = stack.enter_context(SteadyProfiler(args, variant, spec["profile_cpu"])) if spec["profile"] \
            else None
        flops = stack.enter_context(StepFlops(args, variant)) if spec["flops"] else None
        # in memory: components
        model = ModelSpec(path=f"random-{args.family}" if not args.tiny else "tiny", family=args.family)
        result = train_embedding(dataset_toml=toml, model=model, subject="benchsubject",
                                 settings=TrainSettings.from_config(params), final_path=workdir / "out.safetensors",
                                 checkpoint_dir=workdir / "checkpoints", loss_tsv=workdir / "loss.tsv",
                                 state_dir=workdir / "state",
                                 log=lambda message: print(f"  [{variant}] {message}", file=sys.stderr),
                                 components=components)
    stats = dict(result.stats, variant=variant, build_model_s=build_s, build_peak_gib=build_peak_gib,
                 compile_cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))
    if profiler is not None:
        stats["profile"] = profiler.summary
    if flops is not None:
        stats["flops"] = flops.summary
    step_ms = stats.get("steady_ms_per_step")
    if step_ms:
        samples_per_step = stats["samples_per_step"]
        stats["samples_per_s"] = samples_per_step / (step_ms / 1000)
        per_sample = TFLOP_PER_SAMPLE_1024_SDXL * (args.resolution / 1024) ** 2 if args.family == "sdxl" \
            else TFLOP_PER_SAMPLE_512 * (args.resolution / 512) ** 2
        stats["tflops"] = per_sample * stats["samples_per_s"]
        stats["recipe_estimate_s"] = (stats["load_s"] + stats["cache_latents_s"] + stats["first_step_s"]
                                      + (RECIPE_STEPS - 1) * step_ms / 1000)
    return stats


# kernel categories of a profile, first match wins (names lower-cased); inductor's own kernels are named
# triton_<poi|red|per|tem>_fused_<ops>: pointwise, reduction, persistent reduction, template (autotuned GEMM)
ATTENTION_WORDS = ("sdpa", "flash", "fmha", "attention", "attn", "cudnn::fusion")
KERNEL_CATEGORIES = [
    ("triton: GEMM/conv templates", lambda n: n.startswith("triton_tem")),
    ("triton: norm (reduction)", lambda n: n.startswith(("triton_red", "triton_per")) and "norm" in n),
    ("triton: other reductions", lambda n: n.startswith(("triton_red", "triton_per"))),
    ("triton: pointwise", lambda n: n.startswith("triton")),
    ("copies / casts / fills", lambda n: any(k in n for k in ("memcpy", "memset", "copy_kernel", "direct_copy",
                                                              "catarray", "fill", "nchwtonhwc",
                                                              "nhwctonchw", "transpose"))),
    # cuDNN's attention backward also runs cudnn::fusion::compute_dot_do_o / convert_dq_to_16bits
    ("attention backward", lambda n: any(k in n for k in ATTENTION_WORDS)
     and any(k in n for k in ("bprop", "bwd", "backward", "cutlassb", "dq_dk_dv", "dkdv", "dot_do_o", "_dq_"))),
    ("attention forward", lambda n: any(k in n for k in ATTENTION_WORDS)),
    ("convolution (cuDNN implicit GEMM)", lambda n: any(k in n for k in ("fprop", "dgrad", "wgrad", "conv2d",
                                                                         "convolution", "implicit"))),
    ("GEMM (cuBLAS / nvjet / cutlass)", lambda n: any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma",
                                                                       "matmul", "cublas"))),
    ("aten norm kernels", lambda n: any(k in n for k in ("norm", "welford", "moments"))),
    ("aten element-wise / reductions", lambda n: any(k in n for k in ("elementwise", "vectorized", "reduce",
                                                                      "index", "softmax", "foreach",
                                                                      "multi_tensor"))),
]
GPU_EVENT_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def kernel_category(name: str) -> str:
    lowered = name.lower()
    return next((label for label, test in KERNEL_CATEGORIES if test(lowered)), "other")


def summarize_trace(trace: Path, active_steps: int) -> dict:
    """GPU time per recorded step from a chrome trace: kernel sum, busy (union of kernel intervals), span,
    the profiled wall per step (ProfilerStep annotations), by category and by kernel."""
    events = json.loads(trace.read_text(encoding="utf-8"))["traceEvents"]
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_EVENT_CATEGORIES),
                 key=lambda e: e["ts"])
    busy, current_start, current_end = 0.0, None, None
    for event in gpu:
        start, end = event["ts"], event["ts"] + event["dur"]
        if current_end is None or start > current_end:
            if current_end is not None:
                busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        busy += current_end - current_start
    by_name: dict[str, list] = {}
    for event in gpu:
        entry = by_name.setdefault(event["name"], [0.0, 0])
        entry[0] += event["dur"]
        entry[1] += 1
    total = sum(us for us, _ in by_name.values()) or 1.0
    categories: dict[str, float] = {}
    for name, (us, _) in by_name.items():
        categories[kernel_category(name)] = categories.get(kernel_category(name), 0.0) + us
    steps = [e["dur"] for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("ProfilerStep#")]
    per_step = lambda us: us / 1000 / active_steps  # noqa: E731 (us in all -> ms per step)
    # idle stretches between kernels, by the kernels on either side (where the GPU waits, and for what)
    gaps: dict[str, float] = {}
    reach = None
    for before, after in zip(gpu, gpu[1:]):
        reach = max(reach or 0, before["ts"] + before["dur"])
        if after["ts"] - reach > 5:  # us
            site = f"{kernel_category(before['name'])}: {before['name'][:60]} -> {after['name'][:60]}"
            gaps[site] = gaps.get(site, 0.0) + after["ts"] - reach
    launched_by = attribute_to_ops(events, gpu)
    return {
        "active_steps": active_steps,
        "kernels_per_step": len(gpu) / active_steps,
        "kernel_ms_per_step": per_step(total),
        "busy_ms_per_step": per_step(busy),
        "span_ms_per_step": per_step(gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]) if gpu else 0.0,
        "profiled_wall_ms_per_step": sum(steps) / 1000 / len(steps) if steps else None,
        "categories_ms_per_step": {k: per_step(v) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "idle_ms_per_step": per_step(sum(gaps.values())),
        "top_idle_sites_ms_per_step": {site: per_step(us) for site, us in
                                       sorted(gaps.items(), key=lambda kv: -kv[1])[:15]},
        "copies_launched_by_ms_per_step": {chain: per_step(us) for chain, us in sorted(
            launched_by.get("copies / casts / fills", {}).items(), key=lambda kv: -kv[1])[:10]},
        "kernels": [{"name": name, "ms_per_step": per_step(us), "calls_per_step": count / active_steps,
                     "share": us / total, "category": kernel_category(name),
                     "launched_by": sorted(launched_by.get(name, {}).items(), key=lambda kv: -kv[1])[:3]}
                    for name, (us, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])],
    }


def attribute_to_ops(events: list, gpu: list) -> dict:
    """{kernel name or category: {chain of CPU ops that launched it: us}}; empty without CPU events. The
    chain is the launching op and its enclosing ops (innermost first, 4 at most)."""
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"),
                 key=lambda e: (e["tid"], e["ts"], -e["dur"]))
    parent: dict[int, int] = {}
    by_external: dict = {}
    stack: list[int] = []
    for index, op in enumerate(ops):
        while stack and (ops[stack[-1]]["tid"] != op["tid"]
                         or ops[stack[-1]]["ts"] + ops[stack[-1]]["dur"] < op["ts"] + op["dur"]):
            stack.pop()
        if stack:
            parent[index] = stack[-1]
        stack.append(index)
        external = op.get("args", {}).get("External id")
        if external is not None:
            by_external[external] = index
    out: dict[str, dict[str, float]] = {}
    for kernel in gpu:
        index = by_external.get(kernel.get("args", {}).get("External id"))
        if index is None:
            continue
        chain = []
        while index is not None and len(chain) < 4:
            if not chain or chain[-1] != ops[index]["name"]:
                chain.append(ops[index]["name"][:60])
            index = parent.get(index)
        label = " < ".join(chain)
        for key in (kernel["name"], kernel_category(kernel["name"])):
            out.setdefault(key, {})
            out[key][label] = out[key].get(label, 0.0) + kernel["dur"]
    return out


def profile_text(variant: str, summary: dict, top: int = 25) -> str:
    lines = [f"variant {variant}: {summary['active_steps']} recorded steady steps; per step: "
             f"{summary['kernels_per_step']:.0f} GPU kernels/copies, kernel time {summary['kernel_ms_per_step']:.2f} ms, "
             f"GPU busy (union) {summary['busy_ms_per_step']:.2f} ms, GPU span {summary['span_ms_per_step']:.2f} ms, "
             f"profiled wall {summary['profiled_wall_ms_per_step'] or float('nan'):.2f} ms, "
             f"GPU idle between kernels {summary['idle_ms_per_step']:.2f} ms", "",
             "ms/step  share  category"]
    for category, ms in summary["categories_ms_per_step"].items():
        lines.append(f"{ms:7.2f}  {100 * ms / summary['kernel_ms_per_step']:5.1f}%  {category}")
    lines += ["", "idle ms/step  kernel before -> kernel after (largest idle stretches)"]
    lines += [f"{ms:7.2f}  {site}" for site, ms in summary["top_idle_sites_ms_per_step"].items()]
    lines += ["", "copies ms/step  launched by (op < enclosing ops)"]
    lines += [f"{ms:7.2f}  {chain}" for chain, ms in summary["copies_launched_by_ms_per_step"].items()]
    lines += ["", "ms/step  share  calls/step  category | kernel"]
    for kernel in summary["kernels"][:top]:
        lines.append(f"{kernel['ms_per_step']:7.2f}  {100 * kernel['share']:5.1f}%  {kernel['calls_per_step']:10.1f}  "
                     f"{kernel['category']} | {kernel['name'][:150]}")
    return "\n".join(lines) + "\n"


class SteadyProfiler:
    """torch.profiler over steady training steps only: an optimizer-step hook advances its schedule, so
    the first step (compilation) and `--profile-skip` more are skipped, 2 warm up, `--profile-steps` are
    recorded. The summary (see summarize_trace) goes to `--profile-out`/profile-<variant>.{txt,json}."""

    def __init__(self, args, variant: str, cpu: bool):
        self.args, self.variant, self.cpu, self.summary = args, variant, cpu, {}

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from torch.profiler import ProfilerActivity, profile, schedule

        skip, active = self.args.profile_skip, self.args.profile_steps
        if self.args.steps < 1 + skip + 2 + active:
            raise SystemExit(f"-prof needs --steps >= {1 + skip + 2 + active} (1 + skip + 2 warm-up + recorded)")
        self.trace = Path(tempfile.mkdtemp(prefix="tifactory-prof-")) / "trace.json"
        self.profiler = profile(activities=[ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if self.cpu else []),
                                schedule=schedule(wait=1 + skip, warmup=2, active=active, repeat=1),
                                on_trace_ready=lambda prof: prof.export_chrome_trace(str(self.trace)))
        self.profiler.__enter__()
        self.hook = register_optimizer_step_post_hook(lambda *_: self.profiler.step())
        return self

    def __exit__(self, *exc):
        self.hook.remove()
        self.profiler.__exit__(*exc)
        if exc[0] is None:
            self.summary = summarize_trace(self.trace, self.args.profile_steps)
            out = Path(self.args.profile_out or ".")
            out.mkdir(parents=True, exist_ok=True)
            text = profile_text(self.variant, self.summary)
            (out / f"profile-{self.variant}.txt").write_text(text, encoding="utf-8")
            (out / f"profile-{self.variant}.json").write_text(json.dumps(self.summary, indent=1), encoding="utf-8")
            print(text, file=sys.stderr)
            self.summary = {k: v for k, v in self.summary.items() if k != "kernels"} | {
                "top_kernels": self.summary["kernels"][:15]}
        return False


def flop_kind(op: str) -> str:
    if "attention" in op:
        return "attention"
    if "conv" in op:
        return "convolution"
    if any(op.endswith(name) for name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm")):
        return "GEMM"
    return "other"


STEP_MODELS = ("UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection")  # the modules a training step runs


class StepFlops:
    """FLOPs of the text encoder + UNet per optimizer step, by kind (GEMM, convolution, attention), counted
    by torch.utils.flop_counter over the run (models are attributed by module, so the VAE's latent caching
    is left out) and divided by the number of steps."""

    def __init__(self, args, variant: str):
        self.args, self.variant, self.summary = args, variant, {}

    def __enter__(self):
        from torch.utils.flop_counter import FlopCounterMode

        self.mode = FlopCounterMode(display=False)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        if exc[0] is None:
            counts = self.mode.get_flop_counts()
            models = {name: ops for name, ops in counts.items() if name != "Global" and "." not in name}
            per_step: dict[str, float] = {}
            for name, ops in models.items():
                if name not in STEP_MODELS:  # the VAE's encoder (latent caching) and anything else
                    continue
                for op, flops in ops.items():
                    per_step[flop_kind(str(op))] = per_step.get(flop_kind(str(op)), 0) + flops / self.args.steps
            self.summary = {"tflop_per_step": {k: v / 1e12 for k, v in per_step.items()},
                            "tflop_per_step_total": sum(per_step.values()) / 1e12,
                            "models_tflop_in_run": {name: sum(ops.values()) / 1e12 for name, ops in models.items()},
                            "ops_tflop_in_run": {str(op): flops / 1e12 for op, flops in
                                                 counts.get("Global", {}).items()}}
            out = Path(self.args.profile_out or ".")
            out.mkdir(parents=True, exist_ok=True)
            (out / f"flops-{self.variant}.json").write_text(json.dumps(self.summary, indent=1), encoding="utf-8")
        return False


def achieved_rates(rows: list[dict]) -> list[str]:
    """TFLOP/s by kind: a `-flops` variant's FLOPs over a `-prof` variant's kernel time of that kind."""
    flops = next((row["flops"]["tflop_per_step"] for row in rows if row.get("flops")), None)
    profiles = [row for row in rows if row.get("profile")]
    lines = []
    for row in profiles if flops else []:
        categories = row["profile"]["categories_ms_per_step"]
        gemm_ms = sum(ms for name, ms in categories.items() if name.startswith(("GEMM", "triton: GEMM")))
        conv_ms = sum(ms for name, ms in categories.items() if name.startswith("convolution"))
        attention_ms = sum(ms for name, ms in categories.items() if name.startswith("attention"))
        for label, tflop, ms in (("GEMM", flops.get("GEMM", 0), gemm_ms),
                                 ("convolution", flops.get("convolution", 0), conv_ms),
                                 ("GEMM + convolution", flops.get("GEMM", 0) + flops.get("convolution", 0),
                                  gemm_ms + conv_ms),
                                 ("attention", flops.get("attention", 0), attention_ms),
                                 ("whole step (kernel time)", sum(flops.values()),
                                  row["profile"]["kernel_ms_per_step"])):
            rate = tflop / (ms / 1000) if ms else float("nan")
            lines.append(f"{row['variant']:<22}{label:<26}{tflop:9.3f} TFLOP {ms:9.2f} ms {rate:9.1f} TFLOP/s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=0,
                        help="checkpoint (and time) every N steps; ms/step is read between the 2nd and last "
                             "checkpoint (default: only at the end, and no ms/step)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--variants", default="eager15,eager5,compile15,compile15")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (CPU smoke test)")
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15",
                        help="the random model's family (sdxl: SDXL base's shapes; use --resolution 1024)")
    parser.add_argument("--budget-s", type=float, default=0, help="start no variant after this many seconds")
    parser.add_argument("--cache-root", default="", help="folder for the variants' torch.compile caches "
                                                          "(default: a new temporary folder, i.e. cold)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process
    parser.add_argument("--json-out", help="append each variant's JSON line to this file")
    parser.add_argument("--profile-out", default="", help="folder for the -prof and -flops variants' outputs")
    parser.add_argument("--profile-skip", type=int, default=14, help="-prof: steady steps skipped after the first")
    parser.add_argument("--profile-steps", type=int, default=10, help="-prof: steps recorded")
    args = parser.parse_args()

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
            if key in ("device", "steps", "images", "resolution", "profile_out", "profile_skip", "profile_steps")] + (["--tiny"] if args.tiny else [])
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
    print(f"\n{'variant':<22}{'ms/step':>9}{'samples/s':>11}{'TFLOP/s':>9}{'peak GiB':>10}{'floor GiB':>10}"
          f"{'load s':>8}{'cache s':>9}{'1st step s':>11}{'recipe s':>10}")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<22} {row['error']}")
            continue
        print(f"{row['variant']:<22}{row.get('steady_ms_per_step', float('nan')):>9.1f}"
              f"{row.get('samples_per_s', float('nan')):>11.1f}{row.get('tflops', float('nan')):>9.1f}"
              f"{row.get('peak_memory_gib', float('nan')):>10.2f}"
              f"{row.get('memory_before_loop_gib', float('nan')):>10.2f}{row['load_s']:>8.1f}"
              f"{row['cache_latents_s']:>9.1f}{row['first_step_s']:>11.1f}"
              f"{row.get('recipe_estimate_s', float('nan')):>10.1f}")
    for line in achieved_rates(rows):
        print(line)


if __name__ == "__main__":
    main()
