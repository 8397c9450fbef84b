"""Run a stage function as a Snakemake job: log file first, clear one-line errors for bad input.

Jobs of rules that declare `resources: gpu=...` get their own GPU first (tifactory.gpu_slots), before any
stage code can import torch and initialise CUDA.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Callable

from tifactory.errors import TifactoryError
from tifactory.provenance import sidecar_path, write_job_provenance

# Errors that mean "the input, the config or the environment is wrong": the job fails with the message and
# no traceback. FileNotFoundError too: the stages raise it with the missing file (or package) named.
USER_ERRORS = (TifactoryError, FileNotFoundError)


COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor's graphs; Triton's kernels go under <it>/triton


def share_compile_cache(path: str, environ=None) -> str:
    """Point torch.compile's on-disk caches at `path` (config `compile_cache`, made absolute) for this
    process and every job it starts; returns the folder. The config decides, not an inherited variable:
    importing diffusers sets TORCHINDUCTOR_CACHE_DIR to torch's per-user default in any process that does
    it, so a parent that did would otherwise leak that default into every job."""
    environ = os.environ if environ is None else environ
    environ[COMPILE_CACHE_ENV] = os.path.abspath(os.path.expanduser(path))
    return environ[COMPILE_CACHE_ENV]


def declared_gpus(smk) -> int:
    """The job's `resources: gpu` (0 when the rule declares none)."""
    resources = getattr(smk, "resources", None)
    value = getattr(resources, "gpu", 0) if resources is not None else 0
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def claim_job_gpu(smk, log: Callable[[str], None]):
    """For a GPU job: hold a free GPU for the rest of this process (CUDA_VISIBLE_DEVICES); else None."""
    if declared_gpus(smk) < 1:
        return None
    from tifactory.gpu_slots import claim_gpu

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log("WARNING: CUDA was initialised before the GPU slot was claimed; CUDA_VISIBLE_DEVICES may not apply")
    return claim_gpu(log)


# Third-party chatter kept out of the job logs (a log holds what tifactory did and what went wrong): the
# Hugging Face libraries' "Loading weights" / "Fetching files" bars and their info and advisory warnings.
# setdefault: a user who exports one of these keeps it (e.g. TRANSFORMERS_VERBOSITY=info to debug).
# TQDM_DISABLE covers the bars of libraries with no switch of their own (diffusers' "Loading pipeline components");
# tqdm reads it when first imported, which in a job is after run_job has set it.
QUIET_LIBRARIES_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TQDM_DISABLE": "1"}


def quiet_third_party(environ=None) -> None:
    """Keep third-party progress bars, advisory warnings and FutureWarnings out of this job's log."""
    import warnings

    environ = os.environ if environ is None else environ
    for key, value in QUIET_LIBRARIES_ENV.items():
        environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes meant for library authors


_CONSOLE_TAG: list[str] = []  # "<rule> <subject>" of the job this process runs (set by run_job)


def console(message: str) -> None:
    """Also show `message` on the console (the terminal Snakemake runs in), tagged with the job's rule and
    subject: for progress a person watches (training's step N/M, loss, ETA). Outside a job: nothing (the
    caller's own log has it)."""
    if _CONSOLE_TAG:
        print(f"[{_CONSOLE_TAG[0]}] {message}", file=sys.__stderr__, flush=True)


def run_job(smk, main: Callable[[object, Callable[[str], None]], None]) -> None:
    """Redirect stdout/stderr to the job's log, call main(smk, log), exit 1 with a clear message on error."""
    log_path = smk.log[0]
    quiet_third_party()  # before any stage imports torch, transformers or diffusers
    log_file = open(log_path, "w", encoding="utf-8", buffering=1)
    sys.stdout = sys.stderr = log_file
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:8.1f}s] {message}", file=log_file, flush=True)

    wildcards = dict(smk.wildcards.items()) if hasattr(smk.wildcards, "items") else {}
    _CONSOLE_TAG[:] = [" ".join([smk.rule, *map(str, wildcards.values())])]
    log(f"job {smk.rule} {wildcards}")
    sidecar_path(log_path).unlink(missing_ok=True)  # a failed rerun must not leave the old record behind
    gpu_claim = None
    try:
        gpu_claim = claim_job_gpu(smk, log)  # held (flock) until released below or this process ends
        main(smk, log)
    except Exception as error:  # noqa: BLE001 - the job boundary: report and fail
        if isinstance(error, USER_ERRORS):
            message = f"ERROR in {smk.rule} {wildcards}: {error}"
        else:
            traceback.print_exc(file=log_file)
            message = f"ERROR in {smk.rule} {wildcards}: unexpected {type(error).__name__}: {error} (traceback in {log_path})"
        log(message)
        print(message, file=sys.__stderr__, flush=True)
        sys.exit(1)
    if gpu_claim is not None:
        gpu_claim.release()  # the GPU's work is done: the next GPU job need not wait for the hashing below
    try:  # the outputs are complete: a provenance problem is reported, it does not fail them
        log(f"provenance: {write_job_provenance(smk)}")
    except Exception as error:  # noqa: BLE001
        log(f"WARNING: no provenance record written: {type(error).__name__}: {error}")
    log("done")
