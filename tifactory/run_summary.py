"""The end of a roster run in a few lines: which subjects have their embedding, which failed and why (the
one-line reason their job logged), and where the embeddings, grids and report are.

The Snakefile's `onsuccess:` and `onerror:` handlers print it. It reads only results/ and logs/: a job's log
starts with `job <rule> <wildcards>` and a failed job's ends with `ERROR in <rule> <wildcards>: <reason>`
(tifactory.jobs.run_job), so the failures of this run are the logs written since it started that hold such a line.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from pathlib import Path

_JOB_LINE = re.compile(r"\] job (?P<rule>\w+) (?P<wildcards>\{.*\})\s*$")
_ERROR_LINE = re.compile(r"\] ERROR in (?P<rule>\w+) (?P<wildcards>\{.*?\}): (?P<reason>.*)$")
_DONE_LINE = re.compile(r"\] done\s*$")
SHOWN_NAMES = 10  # subjects named per line; the rest are counted


@dataclass(frozen=True)
class JobFailure:
    rule: str
    subject: str  # "" for a roster-wide job
    reason: str
    log: str


def _wildcards(text: str) -> dict:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {}
    return value if isinstance(value, dict) else {}


def read_job_failure(log_path: str | os.PathLike) -> JobFailure | None:
    """The failure a job log records: its ERROR line, or, for a log that never reached `done`, a note that
    the job stopped without a message (killed, out of memory); None for a job that finished."""
    text = Path(log_path).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    job = next((m for m in map(_JOB_LINE.search, lines[:5]) if m), None)
    if job is None:
        return None  # not a tifactory job log
    for line in lines:
        error = _ERROR_LINE.search(line)
        if error:
            subject = str(_wildcards(error["wildcards"]).get("subject", ""))
            return JobFailure(error["rule"], subject, error["reason"].strip(), os.fspath(log_path))
    if lines and _DONE_LINE.search(lines[-1]):
        return None
    subject = str(_wildcards(job["wildcards"]).get("subject", ""))
    return JobFailure(job["rule"], subject, "stopped without a message (killed? out of memory?)", os.fspath(log_path))


def job_failures(logs_dir: str | os.PathLike, since: float | None = None) -> list[JobFailure]:
    """Failures recorded by the job logs under `logs_dir` written at or after `since` (a time.time())."""
    failures = []
    for path in sorted(Path(logs_dir).rglob("*.log")):
        try:
            if since is not None and path.stat().st_mtime < since:
                continue
            failure = read_job_failure(path)
        except OSError:
            continue
        if failure is not None:
            failures.append(failure)
    return failures


def _names(subjects: list[str]) -> str:
    shown = ", ".join(subjects[:SHOWN_NAMES])
    return shown + (f" … (+{len(subjects) - SHOWN_NAMES} more)" if len(subjects) > SHOWN_NAMES else "")


def run_summary(subjects: list[str], *, results_dir: str | os.PathLike = "results",
                logs_dir: str | os.PathLike = "logs", since: float | None = None, roster_problems=(),
                publish_dir: str = "") -> str:
    """The summary text: subjects with and without their final embedding, each failure of this run (jobs
    whose logs were written since `since`) with its reason and log, and where the outputs are."""
    results = Path(results_dir)
    done = [s for s in subjects if (results / s / f"{s}-ti.safetensors").is_file()]
    failures = job_failures(logs_dir, since)
    by_subject: dict[str, list[JobFailure]] = {}
    for failure in failures:
        by_subject.setdefault(failure.subject, []).append(failure)
    failed = [s for s in subjects if s not in done and s in by_subject]
    not_built = [s for s in subjects if s not in done and s not in by_subject]

    lines = [f"tifactory: {len(done)} of {len(subjects)} subject(s) have their embedding"
             + (f", {len(failed)} failed" if failed else "")]
    if done:
        lines.append(f"  done: {_names(done)}")
    for subject in failed:
        first = by_subject[subject][0]
        lines.append(f"  FAILED {subject}: {first.rule}: {first.reason} ({first.log})")
    later = [f for s in done for f in by_subject.get(s, [])]
    for failure in later:
        lines.append(f"  failed after training, {failure.subject}: {failure.rule}: {failure.reason} ({failure.log})")
    for failure in by_subject.get("", []):
        lines.append(f"  FAILED {failure.rule}: {failure.reason} ({failure.log})")
    if roster_problems:
        lines.append(f"  {len(roster_problems)} bad roster row(s) left out: {roster_problems[0]}"
                     + (" …" if len(roster_problems) > 1 else ""))
    if not_built:
        lines.append(f"  not built in this run (no embedding, no failed job): {_names(not_built)}")
    if done:
        published = f"; copies in {publish_dir}" if publish_dir else ""
        lines.append(f"  embeddings: {results}/<subject>/<subject>-ti.safetensors{published}")
        lines.append(f"  sample grids: {results}/<subject>/samples/grid.png")
    roster_page = results / "report" / "roster.html"
    if roster_page.is_file():
        lines.append(f"  report: {roster_page} (a page per subject: {results}/<subject>/report/summary.html); "
                     "`snakemake --report report.html` bundles them")
    return "\n".join(lines)
