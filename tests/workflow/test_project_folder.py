"""Results outside the checkout: `snakemake -s <checkout>/Snakefile --directory <project>` works with no
config.yaml in the project (the Snakefile reads the one beside it), and a partial one there overrides it."""

from __future__ import annotations

import re

import pytest
from PIL import Image


@pytest.mark.slow
def test_a_project_folder_needs_no_config_yaml(tmp_path, run_snakemake):
    project = tmp_path / "project"
    (project / "photos" / "eva").mkdir(parents=True)
    Image.new("RGB", (300, 300), (200, 120, 90)).save(project / "photos" / "eva" / "a.png")
    (project / "roster.tsv").write_text("subject\tclass_word\tsources\neva-green\twoman\tphotos/eva\n")
    plan = run_snakemake(project, "-n", "--config", "roster=roster.tsv", cores=1)
    assert re.search(r"rule train:\n(?:    .*\n)*?    output: results/eva-green/eva-green-ti\.safetensors", plan.stdout)
    assert "WARNING: DEMO MODEL" in plan.stderr and "eva-green" in plan.stderr  # no base_model: the toy, said
    assert not (project / "config.yaml").exists()
    (project / "config.yaml").write_text("roster: roster.tsv\n")  # only what it changes
    plan = run_snakemake(project, "-n", cores=1)
    assert "results/eva-green/eva-green-ti.safetensors" in plan.stdout
