"""The end of a roster run in a few lines: which subjects have their embedding, which failed and why (the
one-line reason their job logged), each weak subject with the reasons of its verdict (tifactory.verdict), and
where the embeddings, grids and report are, with the real file names of the first subjects. A roster other than
the demo's trained on the demo's toy model gets a loud warning first and last (demo_model_warning).

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
# where the demo roster's sources live (resources/roster.tsv): any other source means a user's own roster
DEMO_SOURCE_FOLDERS = ("resources/demo_photos", "resources/demo_concepts")


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


def demo_model_warning(demo_model: str, sources_by_subject: dict[str, list[str]]) -> str:
    """A loud warning when the toy demo model (base_model `demo_model`) trains subjects whose sources are not the
    demo's own (a user's roster run without `base_model`): their embeddings are useless in a UI. "" otherwise."""
    def is_demo_source(source: str) -> bool:
        folder = os.path.normpath(source).replace(os.sep, "/")
        return any(folder == root or folder.startswith(root + "/") for root in DEMO_SOURCE_FOLDERS)

    own = sorted(subject for subject, sources in sources_by_subject.items()
                 if not sources or not all(is_demo_source(source) for source in sources))
    if not own:
        return ""
    return (f"WARNING: DEMO MODEL. base_model is {demo_model!r}, the demo's tiny toy model (it draws no faces), "
            f"but {len(own)} subject(s) of this roster are not the demo's: {_names(own)}. Their embeddings only "
            "fit that toy model and are useless in A1111/ComfyUI. Train on your SD1.5 checkpoint: "
            "--config base_model=/path/to/v1-5-pruned-emaonly.safetensors")


def _verdict_lines(subjects: list[str], results: Path, settings) -> tuple[list[str], dict[str, int]]:
    from tifactory.verdict import WEAK, subject_verdict

    verdicts = [subject_verdict(subject, settings, results) for subject in subjects]
    counts: dict[str, int] = {}
    for verdict in verdicts:
        counts[verdict.status] = counts.get(verdict.status, 0) + 1
    weak = [verdict for verdict in verdicts if verdict.status == WEAK]
    lines = [f"  WEAK {verdict.subject}: {'; '.join(verdict.reasons)}" for verdict in weak[:SHOWN_NAMES]]
    if len(weak) > SHOWN_NAMES:
        lines.append(f"  … and {len(weak) - SHOWN_NAMES} more weak subject(s): see the report")
    return lines, counts


def run_summary(subjects: list[str], *, results_dir: str | os.PathLike = "results",
                logs_dir: str | os.PathLike = "logs", since: float | None = None, roster_problems=(),
                publish_dir: str = "", verdict_settings=None, warning: str = "",
                triggers: dict[str, str] | None = None) -> str:
    """The summary text: subjects with and without their final embedding, each failure of this run (jobs
    whose logs were written since `since`) with its reason and log, the weak subjects with their reasons
    (with `verdict_settings`, a tifactory.verdict.VerdictSettings), and where the outputs are. `warning`
    (demo_model_warning) opens and closes it. `triggers`: {subject: output name} (tifactory.publish.output_name;
    a subject not in it is `<subject>-ti`), the word to type and the published file's name."""
    from tifactory.publish import published_files

    results = Path(results_dir)
    done = [s for s in subjects if (results / s / f"{s}-ti.safetensors").is_file()]
    failures = job_failures(logs_dir, since)
    by_subject: dict[str, list[JobFailure]] = {}
    for failure in failures:
        by_subject.setdefault(failure.subject, []).append(failure)
    failed = [s for s in subjects if s not in done and s in by_subject]
    not_built = [s for s in subjects if s not in done and s not in by_subject]

    verdict_lines, counts = _verdict_lines(done, results, verdict_settings) if verdict_settings else ([], {})
    judged = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    lines = [warning] if warning else []
    lines.append(f"tifactory: {len(done)} of {len(subjects)} subject(s) have their embedding"
                 + (f" ({judged})" if judged else "") + (f", {len(failed)} failed" if failed else ""))
    if done:
        lines.append(f"  done: {_names(done)}")
    lines += verdict_lines
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
        for subject in done[:SHOWN_NAMES]:  # the real file names, and the word to type in a UI
            names = published_files((triggers or {}).get(subject) or f"{subject}-ti")
            files = {"final": results / subject / f"{subject}-ti.safetensors"}
            best = results / subject / f"{subject}-ti-best.safetensors"
            if best.is_file():
                files["best"] = best
            shown = ", ".join(os.fspath(Path(publish_dir) / names[kind]) if publish_dir else os.fspath(path)
                              for kind, path in files.items())
            # the published file's name is the trigger (results/ keeps <subject>-ti; publish renames)
            words = " or ".join(f"`photo of {Path(names[kind]).stem}`" for kind in files)
            lines.append(f"  {subject}: {shown} -> prompt {words}")
    roster_page = results / "report" / "roster.html"
    if roster_page.is_file():
        lines.append(f"  report: {roster_page} (a page per subject: {results}/<subject>/report/summary.html); "
                     "`snakemake --report report.html` bundles them")
    if warning:
        lines.append(warning)
    return "\n".join(lines)
