"""The one Snakemake harness: every test that runs the workflow builds its command line here (conftest.py offers
it as the `run_snakemake` fixture; helper modules import it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from support import REPO_ROOT


def snakemake_env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **extra)
    env.setdefault("SOURCE_DATE_EPOCH", "1700000000")  # the embedding's date field: the same on any day
    return env


def snakemake_command(workdir, *args, cores=2, resources=("gpu=1",), snakefile=None) -> list[str]:
    """Targets and options in `args` come first: `--resources` takes several values and would swallow targets.
    `cores=None` / `resources=None` leave the option out (a profile sets it)."""
    command = [sys.executable, "-m", "snakemake", "-s", str(snakefile or REPO_ROOT / "Snakefile"), "-d", str(workdir),
               *args]
    if cores is not None:
        command += ["--cores", str(cores)]
    if resources:
        command += ["--resources", *resources]
    return command


def run_snakemake(workdir, *args, check=True, timeout=600, env=None, cores=2, resources=("gpu=1",),
                  snakefile=None) -> subprocess.CompletedProcess:
    """Run Snakemake to the end; on timeout kill it with all its jobs (a hung job must not outlive the test).
    `env=None` is the test's environment plus snakemake_env()'s settings."""
    command = snakemake_command(workdir, *args, cores=cores, resources=resources, snakefile=snakefile)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env or snakemake_env(), start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"snakemake {' '.join(args)} still running after {timeout} s (killed):\n"
                             f"{stdout[-4000:]}\n{stderr[-4000:]}") from None
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result
