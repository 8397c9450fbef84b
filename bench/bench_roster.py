"""Roster from folders at scale: `tifactory roster` on N subject folders (default 800), in a temp dir.

Half the folders are prepared kohya datasets (`<name>/100_<name> woman/` with PNGs and captions), half raw
photo folders; names are mixed case with spaces and accents (so most are renamed, some clash). Times:
  1. `python -m tifactory roster DATA --class woman -o roster.tsv` (a fresh process, as a user runs it),
  2. reading that roster as the Snakefile does at DAG time (`read_roster_rows`: schema checks plus the
     prepared-dataset recognition, which looks into every source folder).
Files are placeholder bytes: neither step decodes images.

    python bench/bench_roster.py                 # 800 folders, 10 files each, 3 timed runs per case
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FIRST = ["Eva", "Zoë", "Anna", "Tom", "Søren", "Li", "Maria", "José", "Kim", "Ann-Marie"]


def make_tree(root: Path, folders: int, files: int) -> None:
    for index in range(folders):
        name = f"{FIRST[index // 2 % len(FIRST)]} Person {index // 2}"  # pairs clash after renaming ("Eva Person 0")
        if index % 2:
            name = name.upper()
        folder = root / name
        if index % 2 == 0:  # a prepared dataset
            folder = folder / f"100_p{index} woman"
        folder.mkdir(parents=True)
        for number in range(files):
            (folder / f"{number:03d}.png").write_bytes(b"\x89PNG placeholder")
            if index % 2 == 0:
                (folder / f"{number:03d}.txt").write_text("a photo\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folders", type=int, default=800)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    from tifactory.roster import read_roster_rows

    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with tempfile.TemporaryDirectory() as tmp:
        data, roster = Path(tmp) / "data", Path(tmp) / "roster.tsv"
        make_tree(data, args.folders, args.files)
        command = [sys.executable, "-m", "tifactory", "roster", str(data), "--class", "woman", "-o", str(roster)]
        cli, dag = [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            cli.append(time.perf_counter() - started)
            started = time.perf_counter()
            rows, problems = read_roster_rows(roster)
            dag.append(time.perf_counter() - started)
            assert not problems and len(rows) == args.folders, problems[:3]
        summary = result.stderr.strip().splitlines()[-1]
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    print(f"tifactory roster, {args.folders} folders x {args.files} files: median {statistics.median(cli):.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in cli)}); its own summary: {summary}")
    print(f"read_roster_rows on that roster (DAG time): median {statistics.median(dag):.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in dag)})")


if __name__ == "__main__":
    main()
