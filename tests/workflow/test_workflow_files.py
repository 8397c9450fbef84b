"""The workflow's own files: the conda env agrees with requirements.txt, every rule says what it makes, and
Snakefile and rules/*.smk are formatted as snakefmt leaves them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def requirement_lines(text: str) -> list[str]:
    """requirements.txt's requirements in order: comments, blank lines and the editable `-e .` left out."""
    lines = [line.split(" #")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#") and line != "-e ."]


def env_pip_lines(env: dict) -> list[str]:
    """The pip section of a conda environment file."""
    sections = [item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item]
    assert len(sections) == 1, f"expected one pip section, found {len(sections)}"
    return [str(line).strip() for line in sections[0]]


def test_conda_env_pins_what_requirements_pin():
    """Snakemake builds envs/tifactory.yaml from a copy under .snakemake/conda/: the pip section must name the
    packages itself (no `-r` of a relative file) and pin exactly requirements.txt's versions."""
    env = yaml.safe_load((REPO_ROOT / "envs" / "tifactory.yaml").read_text(encoding="utf-8"))
    pip = env_pip_lines(env)
    assert not [line for line in pip if line.startswith("-")], "options (-r, -e) do not resolve from Snakemake's copy"
    requirements = requirement_lines((REPO_ROOT / "requirements.txt").read_text(encoding="utf-8"))
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+", line) for line in requirements), requirements
    assert pip == requirements


def test_env_check_sees_a_drift(tmp_path):
    """The comparison above fails on an env that lost a pin or names requirements.txt."""
    requirements = requirement_lines("torch==2.13.0\n# c\n-e .\npandas==3.1.1  # why\n")
    assert requirements == ["torch==2.13.0", "pandas==3.1.1"]
    env = {"dependencies": ["python=3.11", "pip", {"pip": ["torch==2.13.0", "pandas==3.1.0"]}]}
    assert env_pip_lines(env) != requirements
    assert env_pip_lines({"dependencies": [{"pip": ["-r ../requirements.txt"]}]})[0].startswith("-")


@pytest.mark.slow
def test_every_rule_has_a_docstring(tmp_path, repo_root, run_snakemake):
    """`snakemake --list-rules` shows each rule's one-line docstring (publish only exists with publish_dir)."""
    listed = run_snakemake(repo_root, "--list-rules", "--config", f"publish_dir={tmp_path}", cores=None, resources=None,
                           timeout=300).stdout
    rules = [line for line in listed.splitlines() if re.match(r"^[a-z_]+( |$)", line)]
    assert "publish" in {line.split()[0] for line in rules} and len(rules) > 10
    assert not [line for line in rules if not re.fullmatch(r"[a-z_]+ \(.+\)", line)]


@pytest.mark.slow
def test_snakefiles_are_snakefmt_formatted():
    checked = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "."], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr
