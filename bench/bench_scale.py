"""Scale benchmark: an N-subject roster (default 800) with tiny placeholder photos, in a temp dir.

Times, with the real Snakefile and config:
  1. `snakemake -n` on the fresh roster (every job planned: the DAG a cluster run starts from),
  2. `snakemake -n` once every output exists and is up to date (a no-op rerun: "Nothing to be done").
The up-to-date state is made honestly: every declared output is created as a placeholder, then
`snakemake --touch` marks them up to date in DAG order (no job runs), and the timed dry run must report
"Nothing to be done".

    python bench/bench_scale.py                 # 800 subjects, 3 photos each, 2 timed runs per case
    python bench/bench_scale.py --subjects 50 --keep /tmp/scale   # keep the temp dir to look at it

Prints a Markdown section for bench/RESULTS.md (use --record to append it there).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
# A valid 8x8 grey PNG, written as bytes (no image library: the bench measures Snakemake, not PIL).
def tiny_png(shade: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    raw = b"".join(b"\x00" + bytes([shade]) * 8 for _ in range(8))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (8).to_bytes(4, "big") * 2 + b"\x08\x00\x00\x00\x00")
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_roster(root: Path, subjects: int, photos: int) -> list[str]:
    names = [f"person{i:04d}" for i in range(subjects)]
    rows = ["subject\tclass_word\tsources"]
    for i, name in enumerate(names):
        folder = root / "photos" / name
        folder.mkdir(parents=True)
        for j in range(photos):
            (folder / f"img{j}.png").write_bytes(tiny_png((i * 7 + j * 31) % 256))
        rows.append(f"{name}\t{('woman', 'man', 'person')[i % 3]}\tphotos/{name}")
    (root / "roster.tsv").write_text("\n".join(rows) + "\n")
    with open(REPO_ROOT / "config.yaml", encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config["roster"] = "roster.tsv"
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return names


def planned_outputs(plan: str) -> list[str]:
    """Every output path a dry run's job blocks name (`    output: a, b`)."""
    outputs = []
    for line in plan.splitlines():
        stripped = line.strip()
        if stripped.startswith("output: "):
            outputs.extend(part.strip() for part in stripped[len("output: "):].split(","))
    return outputs


def make_placeholder_outputs(root: Path, outputs: list[str]) -> None:
    """Every output the DAG declares, as an empty placeholder, so that --touch can mark it up to date.
    A name without an extension is a directory() output (crops, dataset, checkpoints, the demo model);
    were that guess wrong, the timed dry run below would not report "Nothing to be done" and the bench
    would stop."""
    for output in outputs:
        path = root / output
        if "." in path.name:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        else:
            path.mkdir(parents=True, exist_ok=True)


def snakemake_command(root: Path, *args: str) -> list[str]:
    return ["snakemake", "-s", str(REPO_ROOT / "Snakefile"), "-d", str(root), *args]


def timed(command: list[str], expect: str | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    if result.returncode != 0:
        sys.exit(f"bench: `{' '.join(command)}` failed (rc {result.returncode}):\n{output[-3000:]}")
    if expect and expect not in output:
        sys.exit(f"bench: `{' '.join(command)}` did not print {expect!r}:\n{output[-3000:]}")
    return seconds, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=800)
    parser.add_argument("--photos", type=int, default=3, help="placeholder photos per subject")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per case (the best and all are shown)")
    parser.add_argument("--keep", type=Path, help="build in this (new) folder and keep it")
    parser.add_argument("--record", action="store_true", help="append the Markdown section to bench/RESULTS.md")
    args = parser.parse_args()

    if args.keep:
        args.keep.mkdir(parents=True)
        root = args.keep
    else:
        root = Path(tempfile.mkdtemp(prefix="tifactory-scale-"))
    try:
        load_before = os.getloadavg()
        make_roster(root, args.subjects, args.photos)
        dry = snakemake_command(root, "-n")
        cold = [timed(dry)[0] for _ in range(args.repeat)]
        _, plan = timed(dry)
        jobs_line = next((line for line in plan.splitlines() if line.startswith("total")), "total ?")

        make_placeholder_outputs(root, planned_outputs(plan))
        touch_seconds, _ = timed(snakemake_command(root, "--touch", "--cores", "2"))
        noop = [timed(dry, expect="Nothing to be done")[0] for _ in range(args.repeat)]
        load_after = os.getloadavg()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    def fmt_load(load: tuple[float, float, float]) -> str:
        return " / ".join(f"{value:.2f}" for value in load)

    def fmt(values: list[float]) -> str:
        return f"{min(values):.1f} s (runs: {', '.join(f'{v:.1f}' for v in values)})"

    section = f"""
## Scale: {args.subjects}-subject roster, dry run and no-op rerun ({datetime.date.today().isoformat()})

Command: `python bench/bench_scale.py --subjects {args.subjects} --photos {args.photos} --repeat {args.repeat}`
(each case is `snakemake -s Snakefile -d <tmp> -n` on a roster of {args.subjects} subjects with {args.photos}
8x8 placeholder PNGs each; target <= 15 s). Machine: {os.cpu_count()} CPUs, Python {platform.python_version()},
snakemake {subprocess.run(['snakemake', '--version'], capture_output=True, text=True).stdout.strip()}.
Load average (1/5/15 min; the bench itself adds about 1): {fmt_load(load_before)} before, {fmt_load(load_after)} after.

| case | wall time (best) |
| --- | --- |
| `snakemake -n`, nothing built yet ({jobs_line.split()[-1] if jobs_line.split() else '?'} jobs planned) | {fmt(cold)} |
| `snakemake -n`, every output up to date ("Nothing to be done") | {fmt(noop)} |
| `snakemake --touch --cores 2` (set-up of the no-op case, not a target) | {touch_seconds:.1f} s |
"""
    print(section)
    if args.record:
        results = REPO_ROOT / "bench" / "RESULTS.md"
        if not results.exists():
            results.write_text("# Benchmarks\n")
        with open(results, "a", encoding="utf-8") as handle:
            handle.write(section)
        print(f"appended to {results}")


if __name__ == "__main__":
    main()
