"""The demo roster's work folder for the end-to-end tests (workflow/test_workflow.py, test_slurm.py,
training/test_sd15_single_file.py)."""

from __future__ import annotations

import yaml

from tifactory.demo.photos import make_demo_photos

SUBJECTS = {"eva": ("woman", "astronaut"), "tom": ("person", "t1person")}


def make_workdir(root, repo_config, tiny_overrides):
    root.mkdir(parents=True, exist_ok=True)
    rows = ["subject\tclass_word\tsources"]
    for subject, (class_word, demo_subject) in SUBJECTS.items():
        make_demo_photos(demo_subject, root / "photos" / subject)
        rows.append(f"{subject}\t{class_word}\tphotos/{subject}")
    (root / "roster.tsv").write_text("\n".join(rows) + "\n")
    config = dict(repo_config, roster="roster.tsv", demo_overrides=tiny_overrides)
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root

