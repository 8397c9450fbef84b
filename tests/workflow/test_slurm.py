"""The tiny demo roster through profiles/slurm on a real single-node SLURM cluster started on localhost.

Needs Linux, root, Debian's `slurm-wlm` and `munge` (`.ci/run` installs them) and the pinned
snakemake-executor-plugin-slurm. Elsewhere the test is skipped with the reason; with
TIFACTORY_REQUIRE_SLURM=1 (set by `.ci/run`) a missing prerequisite is a failure instead of a skip.

Everything the cluster writes (munge key and socket, slurm.conf, state, spool, logs) lives in a temp dir,
on free ports, so it neither needs nor touches /etc/slurm, /etc/munge or a system munged/slurmctld.
The daemons run in the foreground as children of this process and are stopped by their PIDs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import test_workflow as workflow_tests

REPO_ROOT = Path(__file__).resolve().parents[2]
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "srun")


def rules_by_gpu() -> tuple[set[str], set[str]]:
    """(rules declaring `resources: gpu`, the other rules) from rules/*.smk (checkpoints are rules too)."""
    gpu, cpu = set(), set()
    for smk in sorted((REPO_ROOT / "rules").glob("*.smk")):
        for block in re.split(r"^(?=(?:rule|checkpoint) \w+:)", smk.read_text(), flags=re.MULTILINE):
            name = re.match(r"(?:rule|checkpoint) (\w+):", block)
            if name:
                (gpu if re.search(r"^\s+gpu\s*=", block, re.MULTILINE) else cpu).add(name.group(1))
    return gpu, cpu


GPU_RULES, CPU_RULES = rules_by_gpu()


def missing_prerequisites() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux (runs a local SLURM cluster)"
    if os.geteuid() != 0:
        return "needs root (slurmd runs jobs as their user; the cluster here runs as root)"
    missing = [name for name in DAEMONS if shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin")
               is None]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm not installed: pip install -r requirements.txt"
    return None


REASON = missing_prerequisites()
if REASON and os.environ.get("TIFACTORY_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"TIFACTORY_REQUIRE_SLURM=1 but the SLURM test cannot run: {REASON}")
requires_slurm = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports (all held open while choosing, so no two are the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for(predicate, timeout: float, what: str, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"local SLURM cluster: {what} not ready after {timeout:.0f} s\n{tails}")


class LocalCluster:
    """munged + slurmctld + slurmd for one node `localhost` with 16 CPUs, 64 GB and one fake GPU."""

    def __init__(self, root: Path):
        self.root = root
        self.processes: list[subprocess.Popen] = []
        path = os.environ.get("PATH", "")
        # Inside a job the plugin runs `srun` with every SLURM_* variable dropped, SLURM_CONF too, so srun
        # would look for /etc/slurm/slurm.conf. Rather than write there, the test puts an srun shim first
        # on PATH that restores SLURM_CONF from a variable the plugin keeps.
        shims = root / "bin"
        shims.mkdir()
        srun = shutil.which("srun", path=path)
        (shims / "srun").write_text(f'#!/bin/sh\nexport SLURM_CONF="$TIFACTORY_TEST_SLURM_CONF"\nexec {srun} "$@"\n')
        (shims / "srun").chmod(0o755)
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"),
                        TIFACTORY_TEST_SLURM_CONF=str(root / "slurm.conf"), PATH=f"{shims}:{path}:/usr/sbin")
        for name in list(self.env):  # a test run inside a SLURM job must not leak that job's settings
            if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and name != "SLURM_CONF":
                del self.env[name]

    def spawn(self, *command: str):
        process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=self.env, start_new_session=True)
        self.processes.append(process)
        return process

    def command(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), capture_output=True, text=True, env=self.env, timeout=60)

    def start(self):
        root = self.root
        munge = root / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        socket_path = munge / "munge.socket"
        # munged keeps inherited descriptors open: std fds go to /dev/null (spawn), never to a pipe.
        self.spawn("munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
                   f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
                   f"--seed-file={munge / 'munged.seed'}")
        wait_for(socket_path.exists, 15, "munged socket", [munge / "munged.log"])
        for folder in ("state", "spool", "log"):
            (root / folder).mkdir()
        ctld_port, slurmd_port = free_ports(2)
        (root / "slurm.conf").write_text(f"""\
ClusterName=tifactory-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
MinJobAge=600
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerParameters=sched_interval=2
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=16 RealMemory=64000 Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        # A fake GPU: without File= the node drains; AutoDetect=off keeps slurmd from probing NVML.
        (root / "gres.conf").write_text("AutoDetect=off\nNodeName=localhost Name=gpu File=/dev/null\n")
        logs = [root / "log" / "slurmctld.log", root / "log" / "slurmd.log"]
        conf = str(root / "slurm.conf")
        self.spawn("slurmctld", "-D", "-c", "-f", conf)  # -c: start from a clean state
        self.spawn("slurmd", "-D", "-N", "localhost", "-f", conf)  # this box's hostname is not localhost
        wait_for(lambda: self.command("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", 60,
                 "node localhost idle", logs)

    def cancel_jobs(self, timeout: float = 30):
        """Cancel every job still queued or running (a failed or timed-out run leaves some) and wait until
        their slurmstepd processes are gone: they are not our children and outlive slurmd."""
        if len(self.processes) < 3 or any(p.poll() is not None for p in self.processes):
            return  # the cluster never came up (or a daemon died): no job can be running
        jobs = self.command("squeue", "-h", "-o", "%A").stdout.split()
        if jobs:
            self.command("scancel", "--full", *jobs)
        spool = self.root / "spool"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.command("squeue", "-h", "-o", "%A").stdout.split() and not list(spool.glob("localhost_*")):
                return
            time.sleep(0.5)
        print(f"local SLURM cluster: jobs or job steps still running after {timeout:.0f} s: "
              f"{self.command('squeue').stdout}", file=sys.stderr)

    def stop(self):
        try:
            self.cancel_jobs()
        except (OSError, subprocess.SubprocessError) as error:
            print(f"local SLURM cluster: cancelling jobs failed: {error}", file=sys.stderr)
        for process in reversed(self.processes):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait(timeout=15)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    local = LocalCluster(Path(tmp_path_factory.mktemp("slurm")))
    try:
        local.start()
        yield local
    finally:
        local.stop()


def slurm_jobs(cluster) -> list[dict[str, str]]:
    """Every job slurmctld still knows (MinJobAge keeps finished ones), as key=value dicts."""
    text = cluster.command("scontrol", "show", "job", "--oneliner").stdout
    jobs = []
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in fields:
            jobs.append(fields)
    return jobs


def test_slurm_profile_sizes_every_gpu_rule():
    """Runs everywhere (no cluster): a GPU rule missing from set-resources would be submitted with the
    CPU defaults (20 min, 2 GB), and a --gres in slurm_extra is refused by the plugin."""
    profile = yaml.safe_load((REPO_ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    per_rule = profile["set-resources"]
    assert set(per_rule) <= GPU_RULES | CPU_RULES, f"unknown rules: {set(per_rule) - GPU_RULES - CPU_RULES}"
    for rule in GPU_RULES:
        assert {"runtime", "mem_mb", "cpus_per_task"} <= set(per_rule.get(rule, {})), f"size GPU rule {rule}"
    for resources in [profile["default-resources"], *per_rule.values()]:
        assert "--gres" not in str(resources.get("slurm_extra", ""))
        assert "gpu" not in resources, "GPU requests come from the rules' own `resources: gpu=1`"


@pytest.mark.slow
@requires_slurm
def test_demo_roster_through_slurm_profile(cluster, tmp_path, repo_config, tiny_overrides, run_snakemake):
    workdir = workflow_tests.make_workdir(tmp_path / "wf", repo_config, tiny_overrides)
    # The README's command, with the two settings a cluster without slurmdbd needs, and status checks every
    # second instead of Snakemake's 10 (each wave of the DAG waits for the next check; seconds here, not minutes).
    started = time.monotonic()
    result = run_snakemake(workdir, "--workflow-profile", str(REPO_ROOT / "profiles" / "slurm"),
                           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
                           "--seconds-between-status-checks", "1",
                           "--slurm-keep-successful-logs", cores=None, resources=None, env=cluster.env, timeout=900,
                           check=False)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        job_logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log")) + sorted(
            (workdir / "logs").rglob("*.log"))
        tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2500:]}" for p in job_logs)
        raise AssertionError(f"snakemake via SLURM failed after {elapsed:.0f} s:\n{result.stderr[-6000:]}\n{tails}")

    # Every job went through SLURM; GPU rules asked for a GPU, CPU rules did not.
    jobs = slurm_jobs(cluster)
    by_rule: dict[str, list[dict[str, str]]] = {}
    for job in jobs:
        rule = re.match(r"rule_(\w+?)(?:_wildcards_|$)", job.get("Comment", ""))
        assert rule, f"a SLURM job without the plugin's rule comment: {job}"
        by_rule.setdefault(rule.group(1), []).append(job)
    assert {"train", "samples"} <= GPU_RULES
    assert {"demo_model", "collect", "crop", "dataset", "train", "samples"} <= set(by_rule) <= GPU_RULES | CPU_RULES
    assert len(by_rule["train"]) == len(by_rule["samples"]) == len(workflow_tests.SUBJECTS)
    for rule, rule_jobs in by_rule.items():
        for job in rule_jobs:
            assert job["JobState"] == "COMPLETED", job
            gres = job.get("TresPerJob", "")
            if rule in GPU_RULES:
                assert gres == "gres:gpu:1", f"{rule} job {job['JobId']} without a GPU request: {job}"
            else:
                assert "gpu" not in gres, f"CPU job {rule} asked for a GPU: {job}"
    train = by_rule["train"][0]
    assert train["MinMemoryNode"] == "16000M" and train["NumCPUs"] == "4" and train["TimeLimit"] == "04:00:00"

    # The job saw the device SLURM gave it and tifactory kept it.
    for subject in workflow_tests.SUBJECTS:
        log = (workdir / "logs" / "train" / f"{subject}.log").read_text()
        assert "CUDA_VISIBLE_DEVICES=0 (set by the scheduler or the user; kept)" in log, log[:2000]

    # Nothing left to do, and every output checked as the local workflow test checks them.
    assert workflow_tests.planned_jobs(workdir) == []
    workflow_tests.test_full_run_produces_every_contract_path(workdir, repo_config, tiny_overrides)
