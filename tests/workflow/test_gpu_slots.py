"""GPU slot assignment on a simulated 3-GPU machine (TIFACTORY_GPUS), with real processes and flocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tifactory import gpu_slots

REPO_ROOT = Path(__file__).resolve().parents[2]
from tifactory.gpu_slots import GpuSlotError, claim_gpu, visible_devices
from tifactory.jobs import declared_gpus

# A worker: claim a GPU, record "<pid> <device> <start> <end>" after holding it for HOLD seconds.
WORKER = r"""
import os, sys, time
from tifactory.gpu_slots import claim_gpu
hold, record = float(sys.argv[1]), sys.argv[2]
claim = claim_gpu(log=lambda m: print(m, flush=True), poll_seconds=0.05)
start = time.time()
print("CLAIMED", os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
time.sleep(hold)
end = time.time()
with open(record, "a") as f:
    f.write(f"{os.getpid()} {os.environ['CUDA_VISIBLE_DEVICES']} {start} {end}\n")
"""


@pytest.fixture
def gpu_env(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    env.update(TIFACTORY_GPUS="0,1,2", TIFACTORY_GPU_LOCK_DIR=str(tmp_path / "locks"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def start_worker(env, hold: float, record: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(hold), str(record)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def claimed_device(process: subprocess.Popen, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        if line.startswith("CLAIMED"):
            return line.split()[1]
        assert time.monotonic() < deadline, "worker never claimed a GPU"
    raise AssertionError(f"worker exited without claiming a GPU (rc {process.wait()})")


@pytest.mark.slow
def test_concurrent_jobs_never_share_a_gpu(gpu_env, tmp_path):
    record = tmp_path / "record.txt"
    workers = [start_worker(gpu_env, 1.5, record) for _ in range(7)]  # 7 jobs on 3 GPUs: some must wait
    outputs = [w.communicate(timeout=60)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    rows = [line.split() for line in record.read_text().splitlines()]
    assert len(rows) == 7
    spans = [(device, float(start), float(end)) for _, device, start, end in rows]
    assert {device for device, _, _ in spans} <= {"0", "1", "2"}
    for i, (device_a, start_a, end_a) in enumerate(spans):
        for device_b, start_b, end_b in spans[i + 1:]:
            if device_a == device_b:
                assert end_a <= start_b or end_b <= start_a, f"GPU {device_a} shared: {spans}"
    # With 7 jobs on 3 slots at least one job waited, and said so.
    assert any("all GPUs busy" in out for out in outputs)
    # All three slots were used while jobs queued.
    assert {device for device, _, _ in spans} == {"0", "1", "2"}


@pytest.mark.slow
def test_killed_job_frees_its_gpu(gpu_env, tmp_path):
    record = tmp_path / "record.txt"
    holders = [start_worker(gpu_env, 120, record) for _ in range(3)]
    devices = [claimed_device(h) for h in holders]
    assert sorted(devices) == ["0", "1", "2"]
    waiter = start_worker(gpu_env, 0, record)
    time.sleep(1.0)
    assert waiter.poll() is None, "a 4th job got a GPU while all 3 were held"
    victim = holders[1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    assert claimed_device(waiter) == devices[1]
    waiter.wait(timeout=30)
    for holder in holders:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=10)


def test_scheduler_set_device_is_kept(tmp_path):
    environ = {"CUDA_VISIBLE_DEVICES": "3", "TIFACTORY_GPUS": "0,1", "TIFACTORY_GPU_LOCK_DIR": str(tmp_path)}
    claim = claim_gpu(log=lambda m: None, environ=environ)
    assert claim.device == "3" and environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert "kept" in claim.message
    assert not list(tmp_path.iterdir())  # no lock taken


def test_no_gpu_assigns_nothing(tmp_path):
    environ = {"TIFACTORY_GPUS": "", "TIFACTORY_GPU_LOCK_DIR": str(tmp_path)}
    claim = claim_gpu(log=lambda m: None, environ=environ)
    assert claim.device is None and "CUDA_VISIBLE_DEVICES" not in environ


def test_in_process_claims_and_timeout(tmp_path):
    environ_a = {"TIFACTORY_GPUS": "5", "TIFACTORY_GPU_LOCK_DIR": str(tmp_path)}
    environ_b = dict(environ_a)
    first = claim_gpu(log=lambda m: None, environ=environ_a)
    assert first.device == "5" and environ_a["CUDA_VISIBLE_DEVICES"] == "5"
    with pytest.raises(GpuSlotError, match="no free GPU among 5"):
        claim_gpu(log=lambda m: None, environ=environ_b, poll_seconds=0.05, timeout_seconds=0.2)
    first.release()
    assert claim_gpu(log=lambda m: None, environ=environ_b).device == "5"


def test_device_list_sources(monkeypatch):
    assert visible_devices({"TIFACTORY_GPUS": " 0, 2 ,3"}) == ["0", "2", "3"]
    with pytest.raises(GpuSlotError, match="distinct device ids"):
        visible_devices({"TIFACTORY_GPUS": "0,0"})

    listing = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)\n"
               "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)\n"
               "  MIG 1g.10gb     Device  0: (UUID: MIG-cccc)\n")
    monkeypatch.setattr(gpu_slots.subprocess, "run",
                        lambda *a, **k: SimpleNamespace(returncode=0, stdout=listing, stderr=""))
    assert visible_devices({}) == ["0", "1"]

    def missing(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(gpu_slots.subprocess, "run", missing)
    assert visible_devices({}) == []


def test_user_listed_devices_are_the_pool_and_slurm_settings_are_kept(tmp_path):
    """CUDA_VISIBLE_DEVICES=2,5 set by the user: the jobs share out 2 and 5, one each (not both on the
    first); inside a SLURM job the scheduler's list is kept as it is."""
    first_env = {"CUDA_VISIBLE_DEVICES": "2,5", "TIFACTORY_GPU_LOCK_DIR": str(tmp_path)}
    second_env = dict(first_env)
    first, second = claim_gpu(lambda m: None, first_env), claim_gpu(lambda m: None, second_env)
    try:
        assert (first.device, second.device) == ("2", "5")
        assert (first_env["CUDA_VISIBLE_DEVICES"], second_env["CUDA_VISIBLE_DEVICES"]) == ("2", "5")
    finally:
        first.release()
        second.release()
    slurm_env = {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_ID": "7", "TIFACTORY_GPU_LOCK_DIR": str(tmp_path)}
    assert claim_gpu(lambda m: None, slurm_env).device == "0,1" and slurm_env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_declared_gpus_reads_rule_resources():
    assert declared_gpus(SimpleNamespace(resources=SimpleNamespace(gpu=1, _cores=1))) == 1
    assert declared_gpus(SimpleNamespace(resources=SimpleNamespace(_cores=1))) == 0
    assert declared_gpus(SimpleNamespace()) == 0


SNAKEFILE = r'''
rule all:
    input: expand("out/{i}.txt", i=range(4)), "out/cpu.txt"

rule gpu_job:
    output: "out/{i}.txt"
    wildcard_constraints: i=r"\d+"
    resources: gpu=1
    log: "logs/{i}.log"
    script: "job.py"

rule cpu_job:
    output: "out/cpu.txt"
    log: "logs/cpu.log"
    script: "job.py"
'''

JOB_SCRIPT = r'''
import os, time
from tifactory.jobs import run_job

def main(smk, log):
    start = time.time()
    time.sleep(1.5)
    with open(smk.output[0], "w") as f:
        f.write(f"{os.environ.get('CUDA_VISIBLE_DEVICES', '-')} {start} {time.time()}\n")

run_job(snakemake, main)
'''


@pytest.mark.slow
def test_snakemake_gpu_jobs_get_their_own_device(gpu_env, tmp_path, run_snakemake):
    """Through Snakemake: `--resources gpu=2` on a simulated 2-GPU box runs 2 GPU jobs at a time, one per
    device; a rule without `resources: gpu` gets no device."""
    workflow = tmp_path / "wf"
    workflow.mkdir()
    (workflow / "Snakefile").write_text(SNAKEFILE)
    (workflow / "job.py").write_text(JOB_SCRIPT)
    env = dict(gpu_env, TIFACTORY_GPUS="0,1")
    result = run_snakemake(workflow, "--workflow-profile", "none", snakefile=workflow / "Snakefile", cores=4,
                           resources=("gpu=2",), env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    spans = []
    for i in range(4):
        device, start, end = (workflow / "out" / f"{i}.txt").read_text().split()
        spans.append((device, float(start), float(end)))
        assert f"CUDA_VISIBLE_DEVICES={device} (GPU slot {device} of 0,1" in (workflow / "logs" / f"{i}.log").read_text()
    assert {device for device, _, _ in spans} == {"0", "1"}
    for i, (device_a, start_a, end_a) in enumerate(spans):
        for device_b, start_b, end_b in spans[i + 1:]:
            if device_a == device_b:
                assert end_a <= start_b or end_b <= start_a, f"GPU {device_a} shared: {spans}"
    assert (workflow / "out" / "cpu.txt").read_text().split()[0] == "-"
