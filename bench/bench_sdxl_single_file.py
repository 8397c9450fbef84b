"""A random full-architecture SDXL single file (original layout, fp16, ~6.9 GB): write it, then load it
offline the way the SDXL family will (tifactory.families.sdxl_checkpoint.load_sdxl_single_file with the
configs shipped in resources/sdxl/), in a fresh process with HF_HUB_OFFLINE=1 and an empty HF_HOME.

    python bench/bench_sdxl_single_file.py --file /tmp/sdxl-random.safetensors --write --json-out sdxl.json

Reports the file's size and tensor count, the write time (streamed: one tensor in memory at a time), the
load time and the loading process's peak RSS, the modules' parameter counts and dtypes, a CLIP-L + bigG
encoding of one prompt, and whether HF_HOME is still empty afterwards. Why this is a benchmark, not a CI
test: writing and reading a 6.9 GB file and holding several GB of weights costs minutes and a share of
memory that CI's 24 GB / 2-core runner cannot spare beside the suite; CI keeps the key-map test
(tests/training/test_sdxl_single_file.py) that checks all 2515 keys and shapes on meta tensors, and a
tiny file's round trip. Numbers: bench/RESULTS.md.

`--through-rules` then takes the user's whole path with that file, on the CPU: a folder per person (two demo
photos), `tifactory roster people --class woman -o roster.tsv`, and one `snakemake --cores 2 --resources gpu=1`
with `base_model:` the file, offline with an empty HF_HOME: crops, dataset, 2 training steps at 256 px (the
smallest train.resolution; the crops follow it), the sample grid (64 px, 1 sampling step), likeness, report.
Each GPU job loads its own copy (`gpu_worker.enabled: false`): a worker holding a training and a sampling copy
of SDXL in float32 (~14 GB each on a CPU) does not fit a 23 GB box. It checks the embedding (clip_l [5, 768] +
clip_g [5, 1280], bf16, finite), the checkpoints, the grid, the report's family and the empty HF_HOME, and
reports each job's seconds and peak RSS from Snakemake's benchmark files.

    python bench/bench_sdxl_single_file.py --file /tmp/sdxl-random.safetensors --through-rules --keep \
        --json-out rules.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def child_write(path: Path, seed: int) -> dict:
    from tifactory.families.sdxl_checkpoint import write_random_sdxl_single_file

    start = time.perf_counter()
    write_random_sdxl_single_file(path, seed=seed)
    return {"write_s": round(time.perf_counter() - start, 1),
            "write_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def child_load(path: Path, text_dtype: str) -> dict:
    start = time.perf_counter()
    import torch

    from tifactory.families.sdxl_checkpoint import load_sdxl_single_file

    imported = time.perf_counter()
    modules = load_sdxl_single_file(path, unet_dtype=torch.float16, text_dtype=getattr(torch, text_dtype))
    loaded = time.perf_counter()
    parts = {"unet": modules.unet, "vae": modules.vae, "text_encoder": modules.text_encoders[0],
             "text_encoder_2": modules.text_encoders[1]}
    report = {
        "import_s": round(imported - start, 1),
        "load_s": round(loaded - imported, 1),
        "load_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()},
        "dtypes": {name: str(next(m.parameters()).dtype) for name, m in parts.items()},
    }
    # The UNet's fp16 tensors can stay backed by the file's pages (safetensors maps it) until read; read every
    # page once, as moving the UNet to a GPU does, and report the peak again.
    touched = sum(float(p.detach().view(-1)[::1024].float().sum()) for p in modules.unet.parameters())
    report["unet_read_s"] = round(time.perf_counter() - loaded, 1)
    report["peak_rss_after_reading_unet_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    report["unet_finite"] = bool(touched == touched and abs(touched) != float("inf"))
    loaded = time.perf_counter()
    ids = [tokenizer("a photo of a woman", padding="max_length", max_length=77, return_tensors="pt").input_ids
           for tokenizer in modules.tokenizers]
    with torch.no_grad():
        hidden = [encoder(i, output_hidden_states=True).hidden_states[-2] for encoder, i in zip(modules.text_encoders, ids)]
        pooled = modules.text_encoders[1](ids[1]).text_embeds
    context = torch.cat(hidden, dim=-1)
    report["encode_s"] = round(time.perf_counter() - loaded, 1)
    report["context_shape"], report["pooled_shape"] = list(context.shape), list(pooled.shape)
    report["encodings_finite"] = bool(torch.isfinite(context).all() and torch.isfinite(pooled).all())
    return report


def through_rules(path: Path, env: dict) -> dict:
    """The user's path with the SDXL single file (see the module docstring); returns timings and checks."""
    import csv
    import shutil

    import yaml

    from tifactory.demo.photos import make_demo_photos
    from tifactory.families.sdxl_embedding import read_sdxl_embedding

    work = Path(tempfile.mkdtemp(prefix="sdxl-rules-"))
    photos = make_demo_photos("astronaut", work / "all_photos")
    (work / "people" / "QZV").mkdir(parents=True)
    for photo in photos[:2]:
        shutil.copy(photo, work / "people" / "QZV" / photo.name)
    subprocess.run(["tifactory", "roster", "people", "--class", "woman", "-o", "roster.tsv"], cwd=work, env=env,
                   check=True, capture_output=True, text=True)
    with open(REPO / "config.yaml", encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config.update(roster="roster.tsv", base_model=str(path), base_model_config="", vae="",
                  gpu_worker=dict(config["gpu_worker"], enabled=False))
    config["dataset"]["repeats"] = 1
    config["train"].update(max_train_steps=2, save_every_n_steps=1, gradient_accumulation_steps=1,
                           micro_batch_size=1, resolution=256, device="cpu", compile=False)
    config["samples"].update(seeds=[1], steps=1, width=64, height=64, device="cpu")
    (work / "prompts.txt").write_text("a photo of {token}\n")
    config["samples"]["prompts"] = "prompts.txt"
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    hf_home = work / "empty-hf-home"
    hf_home.mkdir()
    offline = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(hf_home)}
    offline.pop("HF_HUB_CACHE", None)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work),
                           "--configfile", str(work / "config.yaml"), "--cores", "2", "--resources", "gpu=1"],
                          cwd=work, env=offline, capture_output=True, text=True, check=False)
    report = {"workdir": str(work), "snakemake_exit": done.returncode,
              "snakemake_s": round(time.perf_counter() - started, 1)}
    if done.returncode != 0:
        report["snakemake_tail"] = (done.stdout + done.stderr)[-3000:]
        return report
    jobs = {}
    for tsv in sorted((work / "benchmarks").rglob("*.tsv")):
        with open(tsv, encoding="utf-8") as handle:
            row = next(csv.DictReader(handle, delimiter="\t"))
        jobs[str(tsv.relative_to(work / "benchmarks"))] = {"s": round(float(row["s"]), 1),
                                                          "max_rss_gib": round(float(row["max_rss"]) / 1024, 2)}
    vectors, metadata = read_sdxl_embedding(work / "results" / "qzv" / "qzv-ti.safetensors")
    page = (work / "results" / "qzv" / "report" / "summary.html").read_text(encoding="utf-8")
    report.update(
        jobs=jobs,
        embedding={"shapes": [list(tensor.shape) for tensor in vectors], "dtypes": [str(t.dtype) for t in vectors],
                   "finite": all(bool(t.float().isfinite().all()) for t in vectors),
                   "architecture": metadata.get("modelspec.architecture")},
        checkpoints=sorted(p.name for p in (work / "results" / "qzv" / "checkpoints").glob("*.safetensors")),
        grid_bytes=(work / "results" / "qzv" / "samples" / "grid.png").stat().st_size,
        report_names_sdxl="model family <b>sdxl</b>" in page,
        hf_home_still_empty=not any(hf_home.rglob("*")))
    return report


def run_child(role: str, args: argparse.Namespace, env: dict) -> dict:
    command = [sys.executable, __file__, "--role", role, "--file", str(args.file), "--seed", str(args.seed),
               "--text-dtype", args.text_dtype]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{role} child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=Path(tempfile.gettempdir()) / "sdxl-random.safetensors")
    parser.add_argument("--write", action="store_true", help="write the random file first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--keep", action="store_true", help="keep the file afterwards")
    parser.add_argument("--through-rules", action="store_true",
                        help="then run the user's path through the rules with the file (see above)")
    parser.add_argument("--skip-load", action="store_true", help="skip the load child (with --through-rules)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--role", choices=["write", "load"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.role == "write":
        print(json.dumps(child_write(args.file, args.seed)))
        return 0
    if args.role == "load":
        print(json.dumps(child_load(args.file, args.text_dtype)))
        return 0

    report: dict = {"file": str(args.file), "text_dtype": args.text_dtype, "unet_dtype": "float16"}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.write:
        report.update(run_child("write", args, env))
    from tifactory.training.model_check import detect_family_keys, read_safetensors_header

    header = read_safetensors_header(args.file)
    report["file_gb"] = round(args.file.stat().st_size / 1e9, 3)
    report["tensors"] = len(header.shapes)
    report["family"] = detect_family_keys(header.shapes, header.metadata).family
    if not args.skip_load:
        with tempfile.TemporaryDirectory(prefix="empty-hf-home-") as hf_home:
            offline = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": hf_home}
            report.update(run_child("load", args, offline))
            report["hf_home_still_empty"] = not any(Path(hf_home).rglob("*"))
    if args.through_rules:
        report["through_rules"] = through_rules(args.file, env)
    if not args.keep and args.write:
        args.file.unlink()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
