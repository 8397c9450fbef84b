"""`tifactory roster DATA_DIR`: one roster row per subfolder, awkward folder names made to fit."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tifactory.cli import main
from tifactory.roster import read_roster_rows
from tifactory.roster_folders import roster_from_folders, subject_name

REPO_ROOT = Path(__file__).resolve().parents[2]


def touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    data = tmp_path / "data"
    touch(data / "Eva Green" / "a.jpg")
    touch(data / "eva_green" / "a.jpg")  # fits the pattern as it is: no clash with eva-green
    touch(data / "eva green" / "b.jpg")  # -> eva-green, taken by 'Eva Green'
    touch(data / "EVA  GREEN!" / "c.jpg")  # -> eva-green again
    touch(data / "Zoë Saldaña" / "a.jpg")
    touch(data / "Søren Ærø" / "a.jpg")
    touch(data / "李小龙" / "a.jpg")  # nothing ASCII left
    touch(data / "_anna" / "a.jpg")
    (data / "empty").mkdir()
    touch(data / "only-hidden" / ".DS_Store")
    touch(data / ".cache" / "a.jpg")
    touch(data / "notes.txt")
    touch(data / "madonna" / "100_madonna woman" / "a.png")  # a folder with only a kohya subfolder
    touch(data / "40_kim man" / "a.png")  # a kohya folder given directly
    touch(data / "mixed" / "10_x woman" / "a.png")
    touch(data / "mixed" / "10_y man" / "a.png")
    touch(data / "tworeps" / "10_x woman" / "a.png")  # one subject trains with one repeats count
    touch(data / "tworeps" / "20_y woman" / "a.png")
    touch(data / "report" / "a.jpg")  # results/report/ is roster-wide: renamed away
    touch(data / "semi;colon" / "a.jpg")
    return data


def test_subject_names_fit_the_pattern():
    assert subject_name("Zoë Saldaña", 64) == "zoe-saldana"
    assert subject_name("Søren Ærø", 64) == "soren-aero"
    assert subject_name("  --Ann--Marie__ ", 64) == "ann-marie"
    assert subject_name("李小龙", 64) == ""
    assert subject_name("abcdefghijklmnopqrstuvwxyz" * 4, 64) == ("abcdefghijklmnopqrstuvwxyz" * 4)[:64]
    assert subject_name("x" * 100, 64) == "x" * 19  # 20 repeats would stop Snakemake (PeriodicWildcardError)


def test_roster_from_awkward_folders(data_dir):
    result = roster_from_folders(data_dir, "woman")
    rows = {row["subject"]: row for row in result.rows}
    assert set(rows) == {"eva-green", "eva-green-2", "eva-green-3", "eva_green", "zoe-saldana", "soren-aero",
                         "anna", "madonna", "kim", "mixed", "report-2"}
    assert rows["eva-green"]["sources"] == str(data_dir / "EVA  GREEN!")  # sorted by name: 'EVA  GREEN!' first
    assert rows["madonna"] == {"subject": "madonna", "class_word": "woman", "prepared": "yes",
                               "sources": str(data_dir / "madonna")}
    assert rows["kim"]["class_word"] == "man" and rows["kim"]["prepared"] == "yes"  # the folder's class wins
    assert rows["mixed"]["class_word"] == "woman"  # its kohya folders disagree: --class
    assert rows["anna"]["prepared"] == "no" and rows["anna"]["class_word"] == "woman"
    assert dict(result.renamed)["Zoë Saldaña"] == "zoe-saldana"
    assert {folder for folder, _subject, _other in result.clashes} == {"Eva Green", "eva green", "report"}
    skipped = dict(result.skipped)
    assert set(skipped) == {"李小龙", "empty", "only-hidden", ".cache", "notes.txt", "semi;colon", "tworeps"}
    assert skipped["tworeps"].startswith("the prepared folders ('10_x woman', '20_y woman') name different repeats")
    assert skipped["empty"] == skipped["only-hidden"] == "no files"
    assert "rename the folder" in skipped["李小龙"]


def test_without_class_folders_that_name_none_are_skipped(data_dir):
    result = roster_from_folders(data_dir)
    assert {row["subject"] for row in result.rows} == {"madonna", "kim"}
    assert "pass --class" in dict(result.skipped)["Zoë Saldaña"]
    assert "different class words" in dict(result.skipped)["mixed"]


def test_written_roster_is_valid_and_reports_on_stderr(data_dir, tmp_path, capsys):
    out = tmp_path / "roster.tsv"
    assert main(["roster", str(data_dir), "--class", "woman", "-o", str(out)]) == 0
    rows, problems = read_roster_rows(out)
    assert problems == [] and len(rows) == 11
    assert {row["subject"]: row["prepared"] for row in rows}["madonna"] == "yes"
    err = capsys.readouterr().err
    assert "renamed: 'Zoë Saldaña' -> zoe-saldana" in err
    assert "clash:   'eva green' -> eva-green-3 (its name is taken by 'EVA  GREEN!')" in err
    assert "clash:   'report' -> report-2 (its name is taken by the roster-wide results/report/)" in err
    assert "skipped: 'empty' (no files)" in err
    assert "11 subject(s) (3 prepared dataset(s), 8 photo folder(s))" in err


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["roster", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["roster", str(tmp_path / "empty"), "-o", str(tmp_path / "r.tsv")]) == 1
    assert not (tmp_path / "r.tsv").exists()
    with pytest.raises(SystemExit):
        main(["roster", str(tmp_path), "--class", "girl"])


@pytest.mark.slow  # a subprocess
def test_console_command_is_declared_and_help_lists_roster(repo_root):
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["tifactory"] == "tifactory.cli:main"
    assert "-e ." in (repo_root / "requirements.txt").read_text().split("\n")  # the README's install step
    result = subprocess.run([sys.executable, "-m", "tifactory", "--help"], capture_output=True, text=True,
                            cwd=repo_root, timeout=60)
    assert result.returncode == 0 and "roster" in result.stdout


def test_many_renamed_folders_are_summarised_on_stderr(tmp_path, capsys):
    from tifactory.cli import SHOWN_RENAMES

    data = tmp_path / "data"
    for index in range(SHOWN_RENAMES + 20):
        touch(data / f"Person {index:02d}" / "a.jpg")
    assert main(["roster", str(data), "--class", "woman", "-o", str(tmp_path / "r.tsv")]) == 0
    err = capsys.readouterr().err.splitlines()
    renamed = [line for line in err if line.startswith("renamed:")]
    assert len(renamed) == SHOWN_RENAMES + 1 and renamed[-1].startswith("renamed: ... and 20 more folder(s)")
    assert len(read_roster_rows(tmp_path / "r.tsv")[0]) == SHOWN_RENAMES + 20


def test_run_builds_the_roster_and_the_plain_snakemake_command(tmp_path, capsys):
    """`tifactory run DATA --model FILE --publish DIR --out DIR`: the roster in OUT, Snakemake run on this
    checkout's Snakefile in OUT (no config.yaml copied), and the end names each file and the prompt to type."""
    from tifactory.cli import CHECKOUT, build_parser, main, run_snakemake_command, ui_lines

    assert main(["run", str(tmp_path / "data"), "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors: not found" in capsys.readouterr().err
    model = tmp_path / "v1-5-pruned-emaonly.safetensors"
    model.write_bytes(b"x")
    args = build_parser().parse_args(["run", "data", "--model", str(model), "--publish", str(tmp_path / "ui"),
                                      "--out", str(tmp_path / "project")])
    args.snakemake_args = ["-n"]  # main() passes what follows `--`
    command = run_snakemake_command(args, tmp_path / "project" / "roster.tsv", tmp_path / "project")
    assert command[1:7] == ["-m", "snakemake", "-s", str(CHECKOUT / "Snakefile"), "--directory",
                            str(tmp_path / "project")]
    assert command[-4:] == [f"roster={tmp_path / 'project' / 'roster.tsv'}", f"base_model={model}",
                            f"publish_dir={tmp_path / 'ui'}", "-n"]
    assert (CHECKOUT / "Snakefile").is_file() and (CHECKOUT / "config.yaml").is_file()

    results = tmp_path / "project" / "results"
    (results / "eva-green").mkdir(parents=True)
    (results / "eva-green" / "eva-green-ti.safetensors").write_bytes(b"x")
    (results / "eva-green" / "eva-green-ti-best.safetensors").write_bytes(b"x")
    lines = ui_lines(tmp_path / "project", ["eva-green", "zoe"], str(tmp_path / "ui"))
    assert lines[0] == (f"  eva-green: {tmp_path / 'ui' / 'eva-green-ti.safetensors'}, "
                        f"{tmp_path / 'ui' / 'eva-green-ti-best.safetensors'}")
    assert "A1111/Forge: photo of eva-green-ti " in lines[1] and "ComfyUI: photo of embedding:eva-green-ti" in lines[1]
    assert "photo of eva-green-ti-best" in lines[2] and lines[3].startswith("  zoe: no embedding")
