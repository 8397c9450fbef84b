"""Run a stage function as a Snakemake job: log file first, clear one-line errors for bad input."""

from __future__ import annotations

import sys
import time
import traceback
from typing import Callable

# Errors that mean "the input or the config is wrong": the job fails with the message, no traceback.
USER_ERROR_NAMES = {"RosterError", "DatasetError", "TrainingError", "ModelLoadError", "CollectError",
                    "CropError", "PromptError", "FileNotFoundError"}


def run_job(smk, main: Callable[[object, Callable[[str], None]], None]) -> None:
    """Redirect stdout/stderr to the job's log, call main(smk, log), exit 1 with a clear message on error."""
    log_path = smk.log[0]
    log_file = open(log_path, "w", encoding="utf-8", buffering=1)
    sys.stdout = sys.stderr = log_file
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:8.1f}s] {message}", file=log_file, flush=True)

    wildcards = dict(smk.wildcards.items()) if hasattr(smk.wildcards, "items") else {}
    log(f"job {smk.rule} {wildcards}")
    try:
        main(smk, log)
    except Exception as error:  # noqa: BLE001 - the job boundary: report and fail
        if type(error).__name__ in USER_ERROR_NAMES:
            message = f"ERROR in {smk.rule} {wildcards}: {error}"
        else:
            traceback.print_exc(file=log_file)
            message = f"ERROR in {smk.rule} {wildcards}: unexpected {type(error).__name__}: {error} (traceback in {log_path})"
        log(message)
        print(message, file=sys.__stderr__, flush=True)
        sys.exit(1)
    log("done")
