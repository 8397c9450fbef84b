"""Where a GPU job's load phase goes (issue 15): interpreter start, `import torch`, `import diffusers,
transformers`, the model classes, tifactory's training module, CUDA start-up, then reading a 4 GB fp32
diffusers folder onto the GPU through the jobs' own `SD15.load` (tifactory.families) (UNet in bf16 as the train job does,
then again in fp16 as the samples job does), and each model's `from_pretrained` and a raw safetensors read
alone for comparison.

    python bench/bench_load.py --model-dir /tmp/sd15-random --write --runs 2 --json-out load.json

`--write` first saves a random-weight full-size SD1.5 there (bench_workflow.write_random_sd15; its files
are then in the page cache, as for a roster's later jobs). Each run is a fresh interpreter; the first may
pay for compiling .pyc files, so compare the later ones. A last run under `python -X importtime` gives the
imports' cumulative times by module (the top ones are kept).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

IMPORTS = ("import torch, diffusers, transformers; from diffusers import UNet2DConditionModel, AutoencoderKL, "
           "DDPMScheduler; from transformers import CLIPTextModel, CLIPTokenizer; import tifactory.training.train")


def child(folder: Path, device: str, spawned_at: float) -> dict:
    """One job-like process: each phase timed in order; returns seconds per phase."""
    entered = time.time()
    marks: list[tuple[str, float]] = [("interpreter start (spawn -> first line)", entered - spawned_at)]
    last = time.perf_counter()

    def mark(label: str) -> None:
        nonlocal last
        if device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        marks.append((label, now - last))
        last = now

    import torch
    mark("import torch")
    import diffusers  # noqa: F401  (lazy module: the classes below do the work)
    import transformers  # noqa: F401
    mark("import diffusers, transformers")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
    mark("import the model classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, ...)")
    import tifactory.training.train  # noqa: F401
    from tifactory.families import ModelSpec, load_model
    mark("import tifactory.training.train")
    if device == "cuda":
        torch.cuda.init()
        torch.zeros(1, device=device)
    mark("CUDA start-up (init + first allocation)")
    spec = ModelSpec(path=folder, family="sd15")
    components = load_model(spec, device=device, unet_dtype=torch.bfloat16)
    mark("SD15.load, UNet bf16 (train job)")
    del components
    components = load_model(spec, device=device, unet_dtype=torch.float16)
    mark("SD15.load again, UNet fp16 (samples job)")
    del components
    UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.bfloat16,
                                         device_map={"": device}, local_files_only=True)
    mark("  UNet2DConditionModel.from_pretrained alone (bf16, to the GPU)")
    CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32, device_map={"": device},
                                  local_files_only=True)
    mark("  CLIPTextModel.from_pretrained alone (fp32)")
    AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32, device_map={"": device},
                                  local_files_only=True)
    mark("  AutoencoderKL.from_pretrained alone (fp32)")
    from safetensors.torch import load_file

    unet_file = next((folder / "unet").glob("*.safetensors"))
    tensors = load_file(unet_file, device=device)
    mark(f"  safetensors.load_file of the UNet ({unet_file.stat().st_size / 1e9:.2f} GB) to the GPU")
    {name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}
    mark("  ... and casting it to bf16 there")
    return {"phases": marks, "total_s": sum(seconds for _, seconds in marks)}


def import_times(top: int) -> list[dict]:
    """`python -X importtime` of the jobs' imports: cumulative seconds by module, the largest `top`."""
    completed = subprocess.run([sys.executable, "-X", "importtime", "-c", IMPORTS], capture_output=True, text=True,
                               cwd=REPO, check=True)
    rows = []
    for line in completed.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if match:
            rows.append({"module": match.group(4), "depth": len(match.group(3)) // 2,
                         "self_s": int(match.group(1)) / 1e6, "cumulative_s": int(match.group(2)) / 1e6})
    total = sum(row["cumulative_s"] for row in rows if row["depth"] == 0)
    kept = sorted((row for row in rows if row["depth"] <= 2), key=lambda row: -row["cumulative_s"])[:top]
    return [{"module": "(all top-level imports)", "depth": 0, "self_s": None, "cumulative_s": total}] + kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="/tmp/tifactory-bench/sd15-random")
    parser.add_argument("--write", action="store_true", help="first write a random SD1.5 folder there")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--top", type=int, default=30, help="modules kept from -X importtime")
    parser.add_argument("--json-out")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)  # the spawn time
    args = parser.parse_args()
    folder = Path(args.model_dir)
    if args.child is not None:
        print("RESULT " + json.dumps(child(folder, args.device, args.child)), flush=True)
        return
    result: dict = {}
    if args.write:
        from bench_workflow import write_random_sd15

        result["write"] = write_random_sd15(folder)
        print(f"wrote {folder}: {json.dumps(result['write'])}", flush=True)
    result["runs"] = []
    for run in range(args.runs):
        spawned = time.time()
        completed = subprocess.run([sys.executable, __file__, "--model-dir", str(folder), "--device", args.device,
                                    "--child", repr(spawned)], capture_output=True, text=True, cwd=REPO)
        wall = time.time() - spawned
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode != 0 or not lines:
            print(completed.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"run {run + 1} failed (exit {completed.returncode})")
        measured = json.loads(lines[-1][len("RESULT "):])
        measured["process_wall_s"] = wall
        result["runs"].append(measured)
        print(f"\nrun {run + 1}: process {wall:.2f} s")
        for label, seconds in measured["phases"]:
            print(f"  {seconds:7.2f} s  {label}")
    result["importtime"] = import_times(args.top)
    print("\npython -X importtime (cumulative s, depth <= 2):")
    for row in result["importtime"]:
        print(f"  {row['cumulative_s']:7.3f}  {'  ' * row['depth']}{row['module']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
