"""The name of one Snakemake run, for its GPU jobs (tifactory.worker_client) and the GPU worker it starts
(tifactory.worker): host, pid of the Snakemake main process, that pid's start time and a nonce, set in
TIFACTORY_RUN when the Snakefile is parsed by the main process. A worker serves only its own run and ends with
it. Also the worker's greeting, the one other thing both sides share. Parse-time cheap (standard library
only)."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

RUN_ENV = "TIFACTORY_RUN"  # host:pid:start:nonce of the Snakemake main process, set at parse time
HELLO = b"tifactory-worker "  # the worker's first line on each connection it takes: HELLO + its pid


def process_start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None if it is gone
    (or no /proc): with the pid it names one process, whatever pids are reused later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def mark_run(environ: dict | None = None) -> str:
    """Name this Snakemake run for its jobs (call in the main process at parse time): host, pid, the pid's
    start time and a nonce, in TIFACTORY_RUN (replacing any inherited value)."""
    environ = os.environ if environ is None else environ
    pid = os.getpid()
    environ[RUN_ENV] = f"{socket.gethostname()}:{pid}:{process_start_ticks(pid) or '-'}:{secrets.token_hex(4)}"
    return environ[RUN_ENV]


@dataclass(frozen=True)
class RunMark:
    host: str
    pid: int
    start: str
    nonce: str

    @classmethod
    def parse(cls, value: str) -> "RunMark | None":
        parts = value.split(":")
        if len(parts) != 4 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2], parts[3])

    def alive(self) -> bool:
        """Is the run's main process still the one that set the mark?"""
        if self.start == "-":  # no /proc where it was made: the pid alone
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return process_start_ticks(self.pid) == self.start
