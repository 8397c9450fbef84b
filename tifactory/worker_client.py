"""The GPU jobs' side of the long-lived GPU worker (issue 20): reach the worker of this run's GPU slot, or
start it, or run the stage in this process.

Who starts the worker: the first GPU job of a slot (a `train` or `samples` job, after `claim_gpu` gave it
its device) finds no worker listening and starts `python -m tifactory.worker` in a new session. Later jobs
of the same run on the same slot connect to it over a Unix socket, send their stage's arguments, and relay
the log lines it sends back into their own log. A job holds `<worker dir>/<key>.lock` (flock) from before
it connects until its reply came, so one worker serves one job at a time and is started once.

How it dies (tifactory.worker): when the Snakemake run that started it ends (its main process is polled
every second: end, error, Ctrl-C); when the job it serves goes away mid-request (killed, Ctrl-C); after an
unexpected error; after `gpu_worker.idle_timeout_s` without a job. A worker killed mid-step fails only the
job in flight, whose rerun resumes from its last checkpoint as an in-process job would.

Which worker: the key hashes the run (host, Snakemake's main pid and its start time, a random nonce: set by
`tifactory.run_mark.mark_run` when the Snakefile is parsed by the main process), the GPU slot
(CUDA_VISIBLE_DEVICES after the claim), the interpreter and the environment the stages read, so two runs never
share one.

In process instead (today's path, same bytes): `gpu_worker.enabled: false`; no run mark (a script run
outside Snakemake); inside a SLURM job (each job is its own allocation); a job on another host than the
Snakemake main process (other cluster executors: nothing there can watch the run).

Parse-time cheap: no torch here (a GPU job imports it before anything heavy).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tifactory.errors import TifactoryError
from tifactory.run_mark import HELLO, RUN_ENV, RunMark

try:
    import fcntl  # flock: one job at a time per worker
except ImportError:  # Windows: no flock and no Unix-socket worker there; its jobs run in process
    fcntl = None

DIR_ENV = "TIFACTORY_WORKER_DIR"  # where sockets, locks and worker logs live (default <tmp>/tifactory-workers-<uid>)
# the environment a stage reads (besides its arguments): a worker started under other values is another worker
KEYED_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "TORCHINDUCTOR_CACHE_DIR", "PYTHONPATH",
             "PYTORCH_CUDA_ALLOC_CONF", "OMP_NUM_THREADS", "HF_HUB_OFFLINE")


class WorkerTaskError(TifactoryError, RuntimeError):
    """The stage failed in the worker with a user-facing message, or the worker died during it."""


@dataclass(frozen=True)
class WorkerSettings:
    """Config `gpu_worker`."""

    enabled: bool
    idle_timeout_s: float
    start_timeout_s: float

    @classmethod
    def from_config(cls, config: dict) -> "WorkerSettings":
        section = config["gpu_worker"]
        return cls(enabled=bool(section["enabled"]), idle_timeout_s=float(section["idle_timeout_s"]),
                   start_timeout_s=float(section["start_timeout_s"]))


def worker_dir(environ: dict | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get(DIR_ENV) or Path(tempfile.gettempdir()) / f"tifactory-workers-{os.getuid()}")


def worker_key(run: str, environ: dict | None = None) -> str:
    """One worker per (run, GPU slot, interpreter, keyed environment, working directory)."""
    environ = os.environ if environ is None else environ
    payload = json.dumps([run, sys.executable, os.getcwd(), [(name, environ.get(name)) for name in KEYED_ENV]])
    slot = environ.get("CUDA_VISIBLE_DEVICES") or "cpu"
    safe_slot = "".join(c if c.isalnum() else "_" for c in slot)[:12]
    return f"{safe_slot}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def in_process_reason(settings: WorkerSettings, environ: dict | None = None) -> str | None:
    """Why this job runs its stage in process (None: it uses the worker)."""
    environ = os.environ if environ is None else environ
    if not settings.enabled:
        return "gpu_worker.enabled is false"
    if fcntl is None or not hasattr(socket, "AF_UNIX"):
        return f"no flock or Unix sockets on {sys.platform}"
    if environ.get("SLURM_JOB_ID"):
        return "inside a SLURM job (each job is its own allocation)"
    mark = RunMark.parse(environ.get(RUN_ENV, ""))
    if mark is None:
        return f"not started by a Snakemake run ({RUN_ENV} unset)"
    if mark.host != socket.gethostname():
        return f"this job runs on {socket.gethostname()}, the Snakemake run on {mark.host}"
    return None


# ----------------------------------------------------------------------------- the job's side

def run_stage(task: str, kwargs: dict, *, settings: WorkerSettings, log: Callable[[str], None]) -> None:
    """Run stage `task` ("train" or "samples", tifactory.worker.TASKS) with `kwargs`: in this run's GPU
    worker when there can be one, else in this process."""
    reason = in_process_reason(settings)
    if reason is not None:
        log(f"GPU worker: not used ({reason}); running in this process")
        from tifactory.worker import run_task

        run_task(task, kwargs, log, cache=None)
        return
    folder = worker_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = worker_key(os.environ[RUN_ENV])
    lock_fd = os.open(folder / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # this run's jobs on this slot, one at a time
        connection, note = connect_or_start(folder, key, settings, log)
        log(f"GPU worker: {note}")
        with connection:
            exchange(connection, task, kwargs, log, folder / f"{key}.log")
    finally:
        os.close(lock_fd)


def socket_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.sock"


def try_connect(path: Path, timeout_s: float) -> socket.socket | None:
    """A connection to the worker listening at `path`, once it greeted it; None where none listens, or where
    the listener is a worker that is dying (killed, or ending): it closes or resets the connection unanswered.
    Without the greeting a job could reach a killed worker's socket in the moment before the kernel closes it
    and take that worker's end for its own job's death."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except OSError as error:
        connection.close()
        if error.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        raise
    connection.settimeout(timeout_s)
    try:
        greeting = read_line(connection)
    except socket.timeout:
        connection.close()
        raise WorkerTaskError(f"the GPU worker at {path} took the connection but did not answer within "
                              f"{timeout_s:.0f} s (gpu_worker.start_timeout_s); is it stuck? Its pid is in "
                              f"{path.with_suffix('.log')}") from None
    except OSError:
        greeting = b""
    connection.settimeout(None)
    if not greeting.startswith(HELLO):
        connection.close()
        return None
    return connection


def read_line(connection: socket.socket) -> bytes:
    """One short line, byte by byte (nothing after it is read: the reply stream stays whole)."""
    data = b""
    while not data.endswith(b"\n"):
        byte = connection.recv(1)
        if not byte:
            break
        data += byte
    return data


def connect_or_start(folder: Path, key: str, settings: WorkerSettings,
                     log: Callable[[str], None]) -> tuple[socket.socket, str]:
    """A connection to the slot's worker, starting one if none listens (a stale socket is replaced)."""
    path = socket_path(folder, key)
    connection = try_connect(path, settings.start_timeout_s)
    if connection is not None:
        return connection, f"reusing the worker at {path}"
    path.unlink(missing_ok=True)  # left by a worker that was killed (or is dying: it leaves the new one's be)
    worker_log = folder / f"{key}.log"
    with open(worker_log, "a", encoding="utf-8") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "tifactory.worker", "--socket", str(path), "--run", os.environ[RUN_ENV],
             "--idle-timeout", str(settings.idle_timeout_s)],
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + settings.start_timeout_s
    while time.monotonic() < deadline:
        connection = try_connect(path, settings.start_timeout_s)
        if connection is not None:
            return connection, f"started worker pid {process.pid} at {path} (its own log: {worker_log})"
        if process.poll() is not None:
            raise WorkerTaskError(f"the GPU worker exited at start (code {process.returncode}); its log "
                                  f"{worker_log} ends:\n{tail(worker_log)}")
        time.sleep(0.05)
    process.kill()
    raise WorkerTaskError(f"the GPU worker did not listen within {settings.start_timeout_s:.0f} s "
                          f"(gpu_worker.start_timeout_s); its log {worker_log} ends:\n{tail(worker_log)}")


def tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-size:]
    except OSError:
        return "(no log)"


def list_lines(reader):
    """The worker's reply lines as they come; a reset connection ends them (the worker died)."""
    try:
        yield from reader
    except ConnectionResetError:
        return


def exchange(connection: socket.socket, task: str, kwargs: dict, log: Callable[[str], None],
             worker_log: Path) -> None:
    """Send one request; relay the worker's log lines; raise on its error or its death."""
    request = {"task": task, "kwargs": kwargs, "cwd": os.getcwd()}
    connection.sendall((json.dumps(request) + "\n").encode())
    reader = connection.makefile("r", encoding="utf-8")
    for line in list_lines(reader):  # a worker killed mid-request may reset the connection, not close it
        message = json.loads(line)
        if "log" in message:
            log(message["log"])
        elif message.get("ok"):
            return
        elif "error" in message:
            if message.get("traceback"):
                for text in message["traceback"].rstrip().splitlines():
                    log(text)
            raise WorkerTaskError(message["error"])
    raise WorkerTaskError(f"the GPU worker died during this job (killed, or out of memory); a rerun resumes "
                          f"from the last checkpoint. Its log {worker_log} ends:\n{tail(worker_log)}")
