"""One GPU per GPU job on a multi-GPU machine: a lock file per visible device.

Snakemake counts `--resources gpu=N` but never says *which* GPU a job gets, so without this every job
would land on GPU 0. A job that declares `resources: gpu=1` calls `claim_gpu()` before torch touches CUDA:
it takes the first free device (an exclusive OS lock on `<lock dir>/gpu-<id>.lock` through the `filelock`
package: `flock` on Linux and macOS, `msvcrt.locking` on Windows; held for the life of the process and released
by the operating system when the process ends, even by `kill -9`) and sets
`CUDA_VISIBLE_DEVICES` to it, so the job sees exactly one GPU as `cuda:0`.

- `CUDA_VISIBLE_DEVICES` already set to one device, or inside a SLURM job (which sets it for `--gpus`): kept
  as is. Set by the user to several devices (`0,1`): those are the pool the jobs share out, one each.
- The device list comes from `TIFACTORY_GPUS` (e.g. `0,1,2,3`; for tests and simulation) or else from
  `nvidia-smi -L`; no torch import. No device found: nothing to assign (CPU runs).
- Lock files live in `TIFACTORY_GPU_LOCK_DIR`, default `<tmp>/tifactory-gpus-<uid>`, shared by every
  workflow of the user on this machine.
- More GPU jobs than devices (e.g. `--resources gpu=8` on 4 GPUs): the extra jobs wait for a free device
  instead of sharing one.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from tifactory.errors import TifactoryError

DEVICES_ENV = "TIFACTORY_GPUS"
LOCK_DIR_ENV = "TIFACTORY_GPU_LOCK_DIR"
_NVIDIA_SMI_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)


class GpuSlotError(TifactoryError, RuntimeError):
    """A GPU slot could not be claimed (bad device list, unusable lock directory, timeout)."""


@dataclass
class Claim:
    """What claim_gpu() decided: the device (or None) and why, for the job's log."""

    device: str | None
    message: str
    lock: FileLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release(force=True)
            self.lock = None


def visible_devices(environ: dict | None = None) -> list[str]:
    """Device ids that can be handed out: TIFACTORY_GPUS if set (may be empty), else `nvidia-smi -L`."""
    environ = os.environ if environ is None else environ
    if DEVICES_ENV in environ:
        devices = [part.strip() for part in environ[DEVICES_ENV].split(",") if part.strip()]
        bad = [d for d in devices if not re.fullmatch(r"[A-Za-z0-9_.:-]+", d)]
        if bad or len(set(devices)) != len(devices):
            raise GpuSlotError(f"{DEVICES_ENV}={environ[DEVICES_ENV]!r}: expected distinct device ids "
                               "separated by commas, e.g. 0,1,2,3")
        return devices
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listing.returncode != 0:
        return []
    return _NVIDIA_SMI_LINE.findall(listing.stdout)


def lock_dir(environ: dict | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if environ.get(LOCK_DIR_ENV):
        return Path(environ[LOCK_DIR_ENV])
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")  # no getuid on Windows
    return Path(tempfile.gettempdir()) / f"tifactory-gpus-{user}"


def _write_holder(fd: int) -> None:
    """For people looking at the lock dir: who holds it. The lock, not the text, is what counts."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass


def try_lock(path: Path) -> FileLock | None:
    """The held exclusive lock on `path`, or None if another process holds it. An OS lock only (no fallback to a
    lock file's mere existence, which a killed process would leave behind); the file itself stays."""
    lock = FileLock(path, thread_local=False, fallback_to_soft=False, preserve_lock_file=True,
                    on_acquired=_write_holder)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def claim_gpu(log: Callable[[str], None] = print, environ: dict | None = None, poll_seconds: float = 1.0,
              timeout_seconds: float | None = None) -> Claim:
    """Give this process one free GPU (see the module docstring); sets environ's CUDA_VISIBLE_DEVICES.

    Waits while every device is taken (logging once); raises GpuSlotError after timeout_seconds.
    """
    environ = os.environ if environ is None else environ
    preset = environ.get("CUDA_VISIBLE_DEVICES")
    preset_devices = [part.strip() for part in (preset or "").split(",") if part.strip()]
    if preset is not None and (len(preset_devices) <= 1 or environ.get("SLURM_JOB_ID")):
        claim = Claim(preset, f"CUDA_VISIBLE_DEVICES={preset} (set by the scheduler or the user; kept)")
        log(claim.message)
        return claim
    # several devices listed by the user (e.g. 0,1 of 4): they are the pool the jobs share out
    devices = preset_devices if preset is not None else visible_devices(environ)
    if not devices:
        claim = Claim(None, f"no GPU listed (nvidia-smi -L / {DEVICES_ENV}): no device assigned")
        log(claim.message)
        return claim
    folder = lock_dir(environ)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GpuSlotError(f"GPU lock directory {folder}: {error.strerror} (set {LOCK_DIR_ENV})") from None
    started = time.monotonic()
    waiting_logged = False
    while True:
        for device in devices:
            try:
                lock = try_lock(folder / f"gpu-{device}.lock")
            except OSError as error:
                raise GpuSlotError(f"GPU lock {folder / f'gpu-{device}.lock'}: {error.strerror or error}") from None
            if lock is not None:
                environ["CUDA_VISIBLE_DEVICES"] = device
                environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # the order nvidia-smi numbers them in
                claim = Claim(device, f"CUDA_VISIBLE_DEVICES={device} (GPU slot {device} of "
                                      f"{','.join(devices)}, lock {folder / f'gpu-{device}.lock'})", lock)
                log(claim.message)
                return claim
        waited = time.monotonic() - started
        if timeout_seconds is not None and waited >= timeout_seconds:
            raise GpuSlotError(f"no free GPU among {','.join(devices)} after {waited:.0f} s "
                               f"(locks in {folder})")
        if not waiting_logged:
            log(f"all GPUs busy ({','.join(devices)}, locks in {folder}); waiting for one to free up")
            waiting_logged = True
        time.sleep(poll_seconds)
