"""tifactory.run_summary: the end-of-run summary read from results/ and logs/ (Snakefile onsuccess/onerror)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tifactory.run_summary import SHOWN_NAMES, job_failures, read_job_failure, run_summary

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_log(path: Path, rule: str, subject: str | None, *tail: str) -> Path:
    wildcards = {} if subject is None else {"subject": subject}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"[{0.1 * i:8.1f}s] {line}\n" for i, line in
                            enumerate([f"job {rule} {wildcards}", *tail])), encoding="utf-8")
    return path


def make_run(root: Path):
    results, logs = root / "results", root / "logs"
    for subject in ("eva", "tom"):
        (results / subject).mkdir(parents=True)
        (results / subject / f"{subject}-ti.safetensors").write_bytes(b"x")
        write_log(logs / "train" / f"{subject}.log", "train", subject, "step 4", "done")
    write_log(logs / "dataset" / "rejects.log", "dataset", "rejects",
              "ERROR in dataset {'subject': 'rejects'}: subject 'rejects': no usable photos (2 rejected: no face x2)")
    write_log(logs / "likeness" / "tom.log", "likeness", "tom", "scoring", "ERROR in likeness {'subject': 'tom'}: "
              "unexpected KeyError: 'x' (traceback in logs/likeness/tom.log)")
    write_log(logs / "train" / "killed.log", "train", "killed", "step 2")
    write_log(logs / "roster_check" / "roster_check.log", "roster_check", None,
              "ERROR in roster_check {}: roster r.tsv: 1 bad row(s) left out of the run:", "  row 3: subject: bad")
    return results, logs


def test_summary_names_done_failed_and_where_outputs_are(tmp_path):
    results, logs = make_run(tmp_path)
    (results / "report").mkdir()
    (results / "report" / "roster.html").write_text("<html/>")
    text = run_summary(["eva", "killed", "never", "rejects", "tom"], results_dir=results, logs_dir=logs,
                       roster_problems=["row 3: subject: bad"], publish_dir="/ui/embeddings")
    lines = text.splitlines()
    assert lines[0] == "tifactory: 2 of 5 subject(s) have their embedding, 2 failed"
    assert "  done: eva, tom" in lines
    assert (f"  FAILED rejects: dataset: subject 'rejects': no usable photos (2 rejected: no face x2) "
            f"({logs / 'dataset' / 'rejects.log'})") in lines
    assert any(line.startswith("  FAILED killed: train: stopped without a message") for line in lines)
    assert any(line.startswith("  failed after training, tom: likeness: unexpected KeyError") for line in lines)
    assert any(line.startswith("  FAILED roster_check: roster r.tsv: 1 bad row(s)") for line in lines)
    assert "  1 bad roster row(s) left out: row 3: subject: bad" in lines
    assert "  not built in this run (no embedding, no failed job): never" in lines
    assert f"  embeddings: {results}/<subject>/<subject>-ti.safetensors; copies in /ui/embeddings" in lines
    assert f"  sample grids: {results}/<subject>/samples/grid.png" in lines
    assert any(line.startswith(f"  report: {results / 'report' / 'roster.html'}") for line in lines)


def test_summary_prompts_are_the_published_names(tmp_path):
    """A roster's output_name is the published file's name and the word to type; results/ keeps <subject>-ti."""
    results, logs = make_run(tmp_path)
    (results / "eva" / "eva-ti-best.safetensors").write_bytes(b"x")
    text = run_summary(["eva", "tom"], results_dir=results, logs_dir=logs, publish_dir="/ui",
                       triggers={"eva": "evagreen_v2"})
    assert "  eva: /ui/evagreen_v2.safetensors, /ui/evagreen_v2-best.safetensors -> prompt " \
           "`photo of evagreen_v2` or `photo of evagreen_v2-best`" in text.splitlines()
    assert "  tom: /ui/tom-ti.safetensors -> prompt `photo of tom-ti`" in text.splitlines()
    unpublished = run_summary(["eva"], results_dir=results, logs_dir=logs, triggers={"eva": "evagreen_v2"})
    assert (f"  eva: {results / 'eva' / 'eva-ti.safetensors'}, {results / 'eva' / 'eva-ti-best.safetensors'} "
            "-> prompt `photo of evagreen_v2` or `photo of evagreen_v2-best`") in unpublished.splitlines()


def test_only_logs_of_this_run_count(tmp_path):
    results, logs = make_run(tmp_path)
    old = time.time() - 3600
    os.utime(logs / "dataset" / "rejects.log", (old, old))
    assert {f.subject for f in job_failures(logs)} == {"rejects", "tom", "killed", ""}
    assert {f.subject for f in job_failures(logs, since=time.time() - 60)} == {"tom", "killed", ""}
    text = run_summary(["rejects"], results_dir=results, logs_dir=logs, since=time.time() - 60)
    assert text.splitlines() == ["tifactory: 0 of 1 subject(s) have their embedding",
                                 f"  FAILED roster_check: roster r.tsv: 1 bad row(s) left out of the run: "
                                 f"({logs / 'roster_check' / 'roster_check.log'})",
                                 "  not built in this run (no embedding, no failed job): rejects"]


def test_finished_and_foreign_logs_are_no_failures(tmp_path):
    done = write_log(tmp_path / "a.log", "crop", "eva", "cropped", "done")
    assert read_job_failure(done) is None
    (tmp_path / "other.log").write_text("some tool's own log\nno job line\n")
    assert read_job_failure(tmp_path / "other.log") is None


def test_long_rosters_are_counted_not_listed(tmp_path):
    subjects = [f"s{i:03d}" for i in range(SHOWN_NAMES + 5)]
    for subject in subjects:
        (tmp_path / "results" / subject).mkdir(parents=True)
        (tmp_path / "results" / subject / f"{subject}-ti.safetensors").write_bytes(b"x")
    text = run_summary(subjects, results_dir=tmp_path / "results", logs_dir=tmp_path / "logs")
    assert "  done: s000, s001" in text and "… (+5 more)" in text and "s014" not in text


@pytest.mark.slow
def test_reads_what_run_job_writes(tmp_path):
    """The format this module parses is the one tifactory.jobs.run_job writes (a job failing with a user error)."""
    log = tmp_path / "logs" / "dataset" / "eva.log"
    log.parent.mkdir(parents=True)
    script = textwrap.dedent(f"""
        from types import SimpleNamespace
        from tifactory.jobs import run_job
        from tifactory.photos.dataset import DatasetError

        def main(smk, log):
            raise DatasetError("subject 'eva': no usable photos (1 rejected: no face)")

        smk = SimpleNamespace(log=[{str(log)!r}], wildcards={{"subject": "eva"}}, rule="dataset",
                              resources=SimpleNamespace(), input=[], output=[], params=SimpleNamespace())
        run_job(smk, main)
    """)
    failed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert failed.returncode == 1, failed.stderr
    [failure] = job_failures(tmp_path / "logs")
    assert (failure.rule, failure.subject) == ("dataset", "eva")
    assert failure.reason == "subject 'eva': no usable photos (1 rejected: no face)"
