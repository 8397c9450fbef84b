"""Workflow-level benchmark: the real Snakemake `train` and `samples` rules on a random full-size SD1.5 or SDXL.

Two halves, because the CPU stages (collect, crop, dataset) need photos and detectors the GPU machine lacks:

    # 1. here (CPU): a roster of N subjects from the demo photos, built up to results/<s>/dataset
    python bench/bench_workflow.py prepare --subjects 3
    # 2. on the GPU machine (snakemake, diffusers wheels installed; results/ and resources/demo_photos/ carried):
    python bench/bench_workflow.py run --subjects 3 --out OUTDIR --budget-s 560

`run` writes SD1.5's architecture with random weights as a diffusers folder (fp32 safetensors, ~4 GB, like a
downloaded SD1.5), marks the CPU stages up to date (`snakemake --touch`), then runs, one subject after the
other, `snakemake results/<s>/samples/grid.png --allowed-rules train samples` with the recipe's defaults
(1000 steps x 15 samples, the default grid) and an empty torch.compile cache for the first subject (the
later ones find it warm, as a roster's later subjects do). It stops starting subjects once `--budget-s`
would be exceeded. The phase table is read from the jobs' own logs and Snakemake benchmark files.

`series` (issue 20) runs N subjects in ONE Snakemake run, as a roster runs (`snakemake --cores 16 --resources
gpu=1 results/<s>/samples/grid.png ...`), through the GPU worker (`--worker on`, the default config) or with
every job loading its own models (`--worker off`), optionally with fewer steps than the recipe
(`--steps 200 --save-every 40` keeps the recipe's grid: 5 checkpoints + step 0). Per subject: the jobs'
phases, step ms, grid s, the train job's peak GPU memory, and the time between consecutive grids; the GPU
worker's own log (memory after each request); nvidia-smi every 0.5 s. At `--budget-s` the run is stopped as
a Ctrl-C would stop it (SIGINT to Snakemake's process group), and the bench then checks that no GPU worker
outlived it.

    python bench/bench_workflow.py series --subjects 8 --steps 200 --save-every 40 --cold --out OUT --budget-s 380
    python bench/bench_workflow.py series --first 8 --subjects 1 --steps 200 --save-every 40 --worker off --out OUT

`--family sdxl` (issue 19; `prepare` and `series`) does the same for SDXL: `prepare --family sdxl` builds the
datasets with a tiny SDXL-shaped model as the base model, so that `train.resolution: auto` resolves to SDXL's
1024 (crops at 1024, as for a real SDXL base); `series --family sdxl` writes a random full-architecture SDXL
base as one original-layout fp16 file (`sd_xl_base_1.0.safetensors`'s layout, ~6.9 GB: the user's A1111 file,
loaded offline through the key map) and runs its subjects through the rules. Its subjects are named xl<N>...,
its roster is results/bench_workflow/roster-sdxl.tsv, so both families' datasets live side by side.

    python bench/bench_workflow.py prepare --family sdxl --subjects 2
    python bench/bench_workflow.py series --family sdxl --subjects 2 --steps 50 --save-every 10 --cold --out OUT

`--tiny` (with either family) is the CPU smoke test of the bench itself: the tiny model of the family, no
compile, a few steps, a 64 px grid.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

BENCH = REPO / "results" / "bench_workflow"
# per family: the subjects' name prefix, the roster, the random full-size model's default path
ROSTERS = {"sd15": BENCH / "roster.tsv", "sdxl": BENCH / "roster-sdxl.tsv"}
PREFIXES = {"sd15": "wf", "sdxl": "xl"}
MODEL_PATHS = {"sd15": "/tmp/tifactory-bench/sd15-random", "sdxl": "/tmp/tifactory-bench/sdxl-random.safetensors"}
TINY_SDXL = Path("/tmp/tifactory-bench/tiny-sdxl")  # prepare's SDXL stand-in: only its family matters there
ROSTER = ROSTERS["sd15"]
PHOTOS = ("astronaut", "t1person")  # demo photo sets, used in turn
LOG_LINE = re.compile(r"^\[\s*([0-9.]+)s\] (.*)$")


def subjects(count: int, family: str = "sd15") -> list[str]:
    return [f"{PREFIXES[family]}{index + 1}{PHOTOS[index % len(PHOTOS)][:5]}" for index in range(count)]


def tiny_sdxl(folder: Path) -> Path:
    """The tiny SDXL-shaped model (tifactory.demo.tinymodel_sdxl), built once."""
    from tifactory.demo.tinymodel_sdxl import build_tiny_sdxl_model

    if not (folder / "model_index.json").is_file():
        build_tiny_sdxl_model(folder)
    return folder


def snakemake(*args: str, log: Path | None = None) -> float:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(REPO), *args]
    started = time.perf_counter()
    with open(log, "a", encoding="utf-8") if log else open(os.devnull, "w") as handle:
        completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if completed.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:] if log else ""
        raise SystemExit(f"snakemake {' '.join(args)} failed (exit {completed.returncode}); {log} ends:\n{tail}")
    return time.perf_counter() - started


def prepare(args) -> None:
    names = subjects(args.subjects, args.family)
    roster = ROSTERS[args.family]
    roster.parent.mkdir(parents=True, exist_ok=True)
    classes = {"astronaut": "woman", "t1person": "person"}
    rows = ["subject\tclass_word\tsources"] + [
        f"{name}\t{classes[PHOTOS[index % len(PHOTOS)]]}\tresources/demo_photos/{PHOTOS[index % len(PHOTOS)]}"
        for index, name in enumerate(names)]
    roster.write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = [f"roster={roster.relative_to(REPO)}"]
    if args.family == "sdxl":  # an SDXL base at DAG time: train.resolution auto = 1024, the crops' side too
        config.append(f"base_model={tiny_sdxl(TINY_SDXL)}")
    seconds = snakemake("--cores", str(args.cores), "--config", *config, "--",
                        *[f"results/{name}/dataset/dataset.toml" for name in names], log=roster.parent / "prepare.log")
    print(f"datasets of {names} built in {seconds:.1f} s")


def write_random_sd15(folder: Path) -> dict:
    """SD1.5's architecture with random weights, saved as a diffusers folder in fp32."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from bench_samples import SD15_TEXT, SD15_UNET, SD15_VAE
    from tifactory.demo.tinymodel import SD15_SCHEDULER_CONFIG, write_tiny_tokenizer

    started = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(folder / "tokenizer")))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id,
                                                    pad_token_id=tokenizer.pad_token_id))
    built = time.perf_counter()
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    scheduler = DDPMScheduler.from_config({k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k != "skip_prk_steps"})
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    del unet, vae, text_encoder
    return {"build_s": built - started, "write_s": time.perf_counter() - built, "bytes": size}


def write_random_sdxl(path: Path) -> dict:
    """SDXL base's architecture with random weights, as one original-layout fp16 file (what A1111 users hold)."""
    import torch

    from tifactory.families.sdxl_checkpoint import write_random_sdxl_single_file

    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_random_sdxl_single_file(path, device="cuda" if torch.cuda.is_available() else "cpu")
    return {"build_s": 0.0, "write_s": time.perf_counter() - started, "bytes": path.stat().st_size}


def read_log(path: Path) -> list[tuple[float, str]]:
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = LOG_LINE.match(line)
        if match:
            lines.append((float(match.group(1)), match.group(2)))
    return lines


def first(lines, prefix: str, default=None):
    return next((t for t, message in lines if message.startswith(prefix)), default)


def last(lines, prefix: str, default=None):
    return next((t for t, message in reversed(lines) if message.startswith(prefix)), default)


def benchmark_seconds(path: Path) -> float:
    with open(path, encoding="utf-8") as handle:
        return float(next(csv.DictReader(handle, delimiter="\t"))["s"])


def phases(subject: str) -> dict:
    """Seconds per phase of one subject, from its train/samples job logs and Snakemake benchmark files."""
    train = read_log(REPO / "logs" / "train" / f"{subject}.log")
    stats = next(json.loads(message.split("stats ", 1)[1]) for _, message in train if " stats {" in message)
    train_wall = benchmark_seconds(REPO / "benchmarks" / "train" / f"{subject}.tsv")
    train_outside_log = train_wall - last(train, "done")  # interpreter start, imports, exit
    loaded = first(train, "loaded ")
    started_loop = first(train, "training ")
    last_step = last(train, "step ")
    samples = read_log(REPO / "logs" / "samples" / f"{subject}.log")
    samples_wall = benchmark_seconds(REPO / "benchmarks" / "samples" / f"{subject}.tsv")
    samples_outside_log = samples_wall - last(samples, "done")
    grid_message = next(message for _, message in samples if message.startswith("wrote ") and "grid" in message)
    timings = dict(re.findall(r"(encode|sample|write) ([0-9.]+)s", grid_message))
    row = {
        "train: job start + model load": train_outside_log + loaded,
        "train: model load (in the job)": stats["load_s"],
        "train:   of which importing diffusers": stats.get("import_s"),
        "train: latents + token set-up": started_loop - loaded,
        "train: first step incl. torch.compile": stats["first_step_s"],
        "train: other steps": last_step - started_loop - stats["first_step_s"],
        "train: steady ms/step": stats.get("steady_ms_per_step"),
        "train: save + provenance + exit": last(train, "done") - last_step,
        "train job (Snakemake benchmark)": train_wall,
        "samples: job start + model load": samples_outside_log + first(samples, "loaded "),
        "samples:   of which importing diffusers": next((float(match.group(1)) for _, message in samples
                                                       if (match := re.search(r"of which ([0-9.]+)s importing",
                                                                              message))), None),
        "samples: grid (encode+sample+write)": last(samples, "wrote ") - first(samples, "loaded "),
        "samples: sampling alone": float(timings.get("sample", "nan")),
        "samples: provenance + exit": last(samples, "done") - last(samples, "wrote "),
        "samples job (Snakemake benchmark)": samples_wall,
        "peak GPU GiB (train)": stats.get("peak_memory_gib"),
    }
    row["per subject, train + samples jobs"] = train_wall + samples_wall
    return row


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    names = subjects(args.subjects)
    model = Path(args.model_dir)
    if args.tiny:  # CPU smoke test of the bench itself: the tiny model, a few steps
        from tifactory.demo.tinymodel import build_tiny_model

        shutil.rmtree(model, ignore_errors=True)
        build_tiny_model(model)
        made = {"build_s": 0.0, "write_s": 0.0, "bytes": sum(p.stat().st_size for p in model.rglob("*") if p.is_file())}
    else:
        made = write_random_sd15(model)
    print(f"random SD1.5 written to {model}: {made['bytes'] / 1e9:.2f} GB, built in {made['build_s']:.1f} s, "
          f"written in {made['write_s']:.1f} s", flush=True)
    cache = Path(args.compile_cache)
    shutil.rmtree(cache, ignore_errors=True)  # the first subject compiles from scratch
    config = ["--config", f"roster={ROSTER.relative_to(REPO)}", f"base_model={model}", f"compile_cache={cache}"]
    if args.tiny:
        overrides = out / "tiny-overrides.yaml"
        overrides.write_text("train: {max_train_steps: 4, save_every_n_steps: 2, compile: false}\n"
                             "samples: {steps: 2, width: 64, height: 64}\n")
        config = ["--configfile", str(REPO / "config.yaml"), str(overrides)] + config
    log = out / "snakemake.log"
    snakemake("--cores", "4", "--touch", "--allowed-rules", "demo_photos", "collect", "crop", "dataset", *config,
              "--", *[f"results/{name}/dataset/dataset.toml" for name in names], log=log)
    for name in names:
        for folder in ("checkpoints", "train", "train_state", "samples"):
            shutil.rmtree(REPO / "results" / name / folder, ignore_errors=True)
        (REPO / "results" / name / f"{name}-ti.safetensors").unlink(missing_ok=True)
    table, walls = {}, {}
    try:
        for index, name in enumerate(names):
            elapsed = time.perf_counter() - started
            if index and elapsed + args.warm_estimate_s > args.budget_s:
                print(f"stopping before {name}: {elapsed:.0f} s used of the {args.budget_s:.0f} s budget", flush=True)
                break
            walls[name] = snakemake("--cores", "16", "--resources", "gpu=1", "--allowed-rules", "train", "samples",
                                    *config, "--", f"results/{name}/samples/grid.png", log=log)
            table[name] = dict(phases(name), **{"snakemake wall (DAG + both jobs)": walls[name]})
            print(f"{name}: snakemake {walls[name]:.1f} s; " + json.dumps(table[name]), flush=True)
            (out / "workflow.json").write_text(json.dumps({"model": made, "subjects": table}, indent=1) + "\n")
    finally:
        save_logs(out, names)
    print_table(table, started)


def save_logs(out: Path, names: list[str], archive: str = "logs.tar.gz") -> None:
    """The jobs' logs, benchmark files, loss tables and the first grid's preview, in one archive."""
    with tarfile.open(out / archive, "w:gz") as tar:
        for name in names:
            for folder in ("logs/train", "logs/samples", "benchmarks/train", "benchmarks/samples"):
                for path in sorted((REPO / folder).glob(f"{name}*")):
                    tar.add(path, arcname=str(path.relative_to(REPO)))
            loss = REPO / "results" / name / "train" / "loss.tsv"
            if loss.is_file():
                tar.add(loss, arcname=f"results/{name}/loss.tsv")
        preview = REPO / "results" / names[0] / "samples" / "grid_preview.jpg"
        if preview.is_file():
            tar.add(preview, arcname="grid_preview.jpg")


def print_table(table: dict, started: float) -> None:
    if not table:
        return
    columns = list(table)
    print(f"\n{'phase (s)':<40}" + "".join(f"{name:>14}" for name in columns))
    for key in next(iter(table.values())):
        cells = "".join(f"{table[name][key]:>14.1f}" if isinstance(table[name][key], (int, float)) else f"{'-':>14}"
                        for name in columns)
        print(f"{key:<40}{cells}")
    print(f"(first column: empty torch.compile cache; the others: warm. Total {time.perf_counter() - started:.0f} s)")


def worker_processes() -> list[str]:
    """`pid cmdline` of every live `python -m tifactory.worker` on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "tifactory.worker " in command and "--socket" in command:
                found.append(f"{entry.name} {command.strip()}")
    return found


def gpu_memory_used_mib() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "no nvidia-smi"


def series(args) -> None:
    """N subjects in one Snakemake run (see the module docstring)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    names = subjects(args.first + args.subjects, args.family)[args.first:]
    roster = ROSTERS[args.family]
    model = Path(args.model_dir or MODEL_PATHS[args.family])
    if args.tiny:
        model = model.with_name(f"tiny-{args.family}")
        if args.family == "sdxl":
            tiny_sdxl(model)
        elif not (model / "model_index.json").is_file():
            from tifactory.demo.tinymodel import build_tiny_model

            build_tiny_model(model)
        made = {"build_s": 0.0, "write_s": 0.0}
    elif ((model / "model_index.json").is_file() or model.is_file()) and not args.rewrite_model:
        made = {"build_s": 0.0, "write_s": 0.0, "reused": True}
    elif args.family == "sdxl":
        made = write_random_sdxl(model)
    else:
        made = write_random_sd15(model)
    print(f"model {model}: {made}", flush=True)
    cache = Path(args.compile_cache)
    if args.cold:
        shutil.rmtree(cache, ignore_errors=True)
    overrides = out / f"series-{args.tag}.yaml"
    train = {"max_train_steps": args.steps, "save_every_n_steps": args.save_every}
    samples = {}
    if args.tiny:
        train.update(compile=False)
        if args.family == "sdxl":  # the crops stay at 1024 (prepare's), the tiny UNet is cheap there
            train.update(gradient_accumulation_steps=2)
        samples = {"steps": 2, "width": 64, "height": 64}
    overrides.write_text(json.dumps({"train": train, "samples": samples,
                                     "gpu_worker": {"enabled": args.worker == "on", "idle_timeout_s": 300,
                                                    "start_timeout_s": 120}}) + "\n")
    config = ["--configfile", str(REPO / "config.yaml"), str(overrides), "--config",
              f"roster={roster.relative_to(REPO)}", f"base_model={model}", f"compile_cache={cache}"]
    log = out / f"snakemake-{args.tag}.log"
    snakemake("--cores", "4", "--touch", "--allowed-rules", "demo_photos", "collect", "crop", "dataset", *config,
              "--", *[f"results/{name}/dataset/dataset.toml" for name in names], log=log)
    for name in names:
        for folder in ("checkpoints", "train", "train_state", "samples"):
            shutil.rmtree(REPO / "results" / name / folder, ignore_errors=True)
        (REPO / "results" / name / f"{name}-ti.safetensors").unlink(missing_ok=True)
        for folder in ("logs/train", "logs/samples", "benchmarks/train", "benchmarks/samples"):
            for path in (REPO / folder).glob(f"{name}.*"):
                path.unlink()
    env = dict(os.environ, TIFACTORY_WORKER_DIR=args.worker_dir)
    shutil.rmtree(args.worker_dir, ignore_errors=True)
    smi = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,memory.used,utilization.gpu", "--format=csv",
                                "-lms", "500"], stdout=open(out / f"nvidia-smi-{args.tag}.csv", "w"),
                               stderr=subprocess.DEVNULL)
    try:
        import pulp  # noqa: F401 - the ILP scheduler's solver; without it (not carried to the GPU machine): greedy
        scheduler = []
    except ImportError:
        scheduler = ["--scheduler", "greedy"]
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(REPO), "--cores", "16",
               "--resources", "gpu=1", *scheduler, "--allowed-rules", "train", "samples", *config, "--",
               *[f"results/{name}/samples/grid.png" for name in names]]
    run_started = time.time()
    with open(log, "a", encoding="utf-8") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                   start_new_session=True)
        deadline = started + args.budget_s
        interrupted = False
        while process.poll() is None:
            if time.perf_counter() > deadline and not interrupted:
                print(f"budget reached: SIGINT to Snakemake's process group (as Ctrl-C)", flush=True)
                os.killpg(process.pid, signal.SIGINT)
                interrupted = True
            time.sleep(0.5)
    wall = time.time() - run_started
    time.sleep(3)  # the worker polls the run every second
    after = {"snakemake_exit": process.returncode, "interrupted": interrupted, "wall_s": wall,
             "workers_alive_3s_after": worker_processes(), "gpu_memory_used_3s_after": gpu_memory_used_mib()}
    if smi is not None:
        smi.terminate()
    rows, previous = {}, run_started
    grids = [REPO / "results" / name / "samples" / "grid.png" for name in names]
    for grid in sorted((path for path in grids if path.is_file()), key=lambda path: path.stat().st_mtime):
        name = grid.parent.parent.name
        try:
            row = phases(name)
        except (OSError, StopIteration, ValueError) as error:
            row = {"phases": f"unreadable: {error}"}
        row["grid written at s (since snakemake start)"] = grid.stat().st_mtime - run_started
        row["since the previous grid s"] = grid.stat().st_mtime - previous
        previous = grid.stat().st_mtime
        rows[name] = row
    for path in Path(args.worker_dir).glob("*.log"):
        shutil.copy(path, out / f"worker-{args.tag}-{path.name}")
    result = {"tag": args.tag, "family": args.family, "worker": args.worker, "steps": args.steps,
              "save_every": args.save_every, "cold": args.cold, "model": made, "run": after, "subjects": rows}
    (out / f"series-{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    save_logs(out, names, f"logs-{args.tag}.tar.gz")
    print(json.dumps(after), flush=True)
    print_table(rows, started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--family", choices=tuple(ROSTERS), default="sd15")
    r = sub.add_parser("run")
    r.add_argument("--subjects", type=int, default=3)
    r.add_argument("--out", required=True)
    r.add_argument("--model-dir", default="/tmp/tifactory-bench/sd15-random")
    r.add_argument("--compile-cache", default="/tmp/tifactory-bench/torch_compile")
    r.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 4 steps, 64 px grid")
    r.add_argument("--budget-s", type=float, default=560, help="start no subject that would end past this")
    r.add_argument("--warm-estimate-s", type=float, default=175, help="a warm subject's expected seconds "
                                                                         "(171 s measured on an H200)")
    q = sub.add_parser("series", help="N subjects in one Snakemake run (issue 20)")
    q.add_argument("--subjects", type=int, default=10)
    q.add_argument("--first", type=int, default=0, help="skip this many roster subjects")
    q.add_argument("--steps", type=int, default=1000)
    q.add_argument("--save-every", type=int, default=200)
    q.add_argument("--worker", choices=("on", "off"), default="on")
    q.add_argument("--cold", action="store_true", help="empty the torch.compile cache first")
    q.add_argument("--tag", default="series")
    q.add_argument("--out", required=True)
    q.add_argument("--family", choices=tuple(ROSTERS), default="sd15")
    q.add_argument("--model-dir", default=None, help="the random model's path (default: per family, see "
                                                      "MODEL_PATHS; written unless it exists)")
    q.add_argument("--rewrite-model", action="store_true")
    q.add_argument("--compile-cache", default="/tmp/tifactory-bench/torch_compile")
    q.add_argument("--worker-dir", default="/tmp/tfw")
    q.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, no compile, 64 px grid")
    q.add_argument("--budget-s", type=float, default=560, help="stop the run (SIGINT) at this many seconds")
    args = parser.parse_args()
    {"prepare": prepare, "run": run, "series": series}[args.command](args)


if __name__ == "__main__":
    main()
