"""Integration tests through Snakemake on a tiny config in a temp dir (demo-tiny model, real photos)."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest
import yaml
from PIL import Image

from tifactory.training.embedding import load_embedding

from support import REPO_ROOT
from support.harness import run_snakemake
from support.workdirs import SUBJECTS, make_workdir  # noqa: F401 (test_slurm reads them here)


def snakemake(workdir, *args, check=True):
    return run_snakemake(workdir, *args, check=check, timeout=1200)


def planned_jobs(workdir, *args) -> list[tuple[str, str]]:
    """(rule, subject) for every job a dry run would run."""
    output = snakemake(workdir, "-n", *args).stdout
    jobs = []
    for block in re.split(r"\n(?=(?:rule|checkpoint) \w+:)", output):  # likeness is a checkpoint
        rule = re.match(r"(?:rule|checkpoint) (\w+):", block)
        if rule and rule.group(1) != "all":
            subject = re.search(r"wildcards: .*?subject=([\w-]+)", block)
            jobs.append((rule.group(1), subject.group(1) if subject else ""))
    # rules with a one-line `message:` (the Snakefile's form: "<rule> <subject>|(roster): ... -> outputs (log: ...)")
    for rule, subject in re.findall(r"^Job \d+: (\w+) (\(roster\)|[a-z0-9][\w-]*):", output, flags=re.M):
        if rule != "all":
            jobs.append((rule, "" if subject == "(roster)" else subject))
    return jobs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, repo_config, tiny_overrides):
    root = make_workdir(tmp_path_factory.mktemp("wf"), repo_config, tiny_overrides)
    snakemake(root)
    return root


@pytest.mark.slow
def test_full_run_produces_every_contract_path(workdir, repo_config, tiny_overrides):
    steps = tiny_overrides["train"]["max_train_steps"]
    every = tiny_overrides["train"]["save_every_n_steps"]
    for subject, (class_word, _) in SUBJECTS.items():
        results = workdir / "results" / subject
        assert (results / "raw" / "manifest.tsv").is_file()
        manifest = pd.read_csv(results / "crops" / "manifest.tsv", sep="\t", keep_default_na=False)
        crops = [results / "crops" / name for name in manifest.loc[manifest["status"] == "kept", "output"]]
        assert crops and all(Image.open(p).size == (512, 512) for p in crops)
        assert Image.open(results / "crops" / "contact_sheet.png").format == "PNG"
        header = list(manifest.columns)
        for column in ["source", "status", "reason", "face_x", "face_y", "face_w", "face_h", "crop_x", "crop_y",
                       "crop_size", "det_score", "output"]:
            assert column in header
        repeats = repo_config["dataset"]["repeats"]
        assert len(list((results / "dataset" / f"{repeats}_{subject} {class_word}").glob("*.png"))) == len(crops)
        assert (results / "dataset" / "dataset.toml").is_file()
        checkpoints = sorted(p.name for p in (results / "checkpoints").glob("*.safetensors"))
        assert checkpoints == [f"{subject}-ti-step{s:08d}.safetensors" for s in range(every, steps + 1, every)]
        vectors, metadata = load_embedding(results / f"{subject}-ti.safetensors")
        assert tuple(vectors.shape) == (repo_config["train"]["num_vectors"], 768)
        assert str(vectors.dtype) == "torch.bfloat16"
        assert metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
        assert metadata["tifactory.step"] == str(steps)
        loss = (results / "train" / "loss.tsv").read_text().splitlines()
        assert loss[0] == "step\tloss\tlr\tseconds" and len(loss) == steps + 1
        grid = Image.open(results / "samples" / "grid.png")
        samples = tiny_overrides["samples"]
        rows = 1 + steps // every
        assert grid.height > rows * samples["height"] and grid.width > samples["width"]
        assert (workdir / "logs" / "train" / f"{subject}.log").is_file()
        assert (workdir / "benchmarks" / "train" / f"{subject}.tsv").is_file()
        assert not (results / "train_state" / "state.pt").exists()
    demo_log = (workdir / "logs" / "demo_model" / "demo_model.log").read_text()
    assert "taught demo model" in demo_log


@pytest.mark.slow
def test_samples_likeness_loss_and_report(workdir):
    for subject in SUBJECTS:
        samples = workdir / "results" / subject / "samples"
        assert Image.open(samples / "grid_preview.jpg").format == "JPEG"
        assert len((samples / "images.tsv").read_text().splitlines()) == 1 + len(list(samples.glob("step*.png")))
        # likeness is on by default (dlib, no download): every step measured, the model and metric named; with no
        # face in any checkpoint's samples (the tiny model draws none) it is "not scored" and there is no best step
        likeness = json.loads((samples / "likeness.json").read_text())
        has_best = likeness["scored"] and likeness["best_step"] is not None
        scores = [line.split("\t") for line in (samples / "scores.tsv").read_text().splitlines()]
        assert scores[0][-2:] == ["model", "metric"]
        status = "scored" if has_best else "no face"
        assert all(row[8] == status and row[9:] == ["dlib", "distance"] for row in scores[1:]), scores
        said = "likeness scored with dlib (euclidean distance" if has_best else "likeness NOT scored (dlib (euclidean"
        assert said in (workdir / "logs" / "likeness" / f"{subject}.log").read_text()
        assert (workdir / "results" / subject / f"{subject}-ti-best.safetensors").is_file() == has_best
        assert Image.open(workdir / "results" / subject / "train" / "loss.png").size == (900, 500)
        summary = (workdir / "results" / subject / "report" / "summary.html").read_text()
        assert ("best step: " in summary) == has_best and "data:image/jpeg;base64," in summary
        assert "verdict: " in summary and ("likeness NOT scored" in summary) == (not has_best)
        assert "identity filter: dlib distance" in summary
    assert all(s in (workdir / "results" / "report" / "roster.html").read_text() for s in SUBJECTS)
    snakemake(workdir, "--report", "report.html")
    report = (workdir / "report.html").read_text()
    assert "Roster overview" in report and all(s in report for s in SUBJECTS)


@pytest.mark.slow
def test_second_run_has_nothing_to_do(workdir):
    assert planned_jobs(workdir) == []


@pytest.mark.slow
def test_changed_photo_reruns_only_that_subject(workdir):
    photo = sorted((workdir / "photos" / "eva").glob("*.png"))[0]
    image = Image.open(photo)
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photo)
    jobs = planned_jobs(workdir)
    assert {subject for _, subject in jobs} == {"eva", ""}
    assert "roster_overview" in {rule for rule, subject in jobs if subject == ""}  # roster-wide pages only
    # best_embedding is not planned: likeness is a checkpoint, which decides after its job whether there is one
    assert {rule for rule, _ in jobs} == {"collect", "crop", "dataset", "train", "samples", "loss_plot", "likeness",
                                          "subject_summary", "crop_summary", "roster_overview"}
    snakemake(workdir)
    assert planned_jobs(workdir) == []


@pytest.mark.slow
def test_changed_training_parameter_reruns_training_and_samples_only(workdir):
    config_path = workdir / "config.yaml"
    original = config_path.read_text()
    config = yaml.safe_load(original)
    config["train"]["learning_rate"] = 0.001
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        jobs = planned_jobs(workdir)
    finally:
        config_path.write_text(original)
    per_subject = ("train", "samples", "loss_plot", "likeness", "subject_summary")  # best_embedding: after likeness
    assert sorted(jobs) == sorted([(rule, subject) for rule in per_subject for subject in SUBJECTS]
                                  + [("roster_overview", "")])


@pytest.mark.slow
def test_single_target_builds_one_subject(tmp_path, repo_config, tiny_overrides):
    fresh = make_workdir(tmp_path / "fresh", repo_config, tiny_overrides)
    jobs = planned_jobs(fresh, "results/eva/eva-ti.safetensors")
    assert {subject for _, subject in jobs} == {"eva", ""}
    assert {rule for rule, subject in jobs if subject == ""} == {"demo_model"}
    assert ("train", "eva") in jobs and not any(rule == "samples" for rule, _ in jobs)


def readme_paths(subject: str, eval_model: str) -> list[str]:
    """Every results/ path README names for one subject (`S`, `<name>` filled in), with the file names its
    outputs table lists beside a row's first path; folders (`.../`) and globs (`*.png`) are orientation."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"`(results/(?:S|summary|report)/[^`]*)`", readme))
    for row in re.findall(r"^\| (`results/S/[^|]*)\|", readme, flags=re.M):
        first, *others = re.findall(r"`([^`]+)`", row)
        paths.update(f"{first.rsplit('/', 1)[0]}/{name}" for name in others if "/" not in name)
    paths = {p for p in paths if not p.endswith("/") and "*" not in p}
    return sorted(p.replace("<name>", eval_model).replace("/S/", f"/{subject}/").replace("/S-", f"/{subject}-")
                  for p in paths)


@pytest.mark.slow
def test_every_readme_path_is_a_target(tmp_path, repo_config, tiny_overrides, tiny_model_dir):
    """README's outputs can each be asked for by name: one dry run for them all plans a job making each."""
    fresh = make_workdir(tmp_path / "fresh", repo_config, tiny_overrides)
    config = yaml.safe_load((fresh / "config.yaml").read_text())
    config["eval_models"] = [{"name": "same", "path": str(tiny_model_dir)}]
    (fresh / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    targets = readme_paths("eva", "same")
    assert {"results/eva/crops/manifest.tsv", "results/eva/dataset/dataset.toml", "results/eva/checkpoints",
            "results/eva/train/loss.tsv", "results/eva/samples/scores.tsv",
            "results/eva/samples/eval/same/grid.png"} <= set(targets)
    plan = snakemake(fresh, "-n", *targets).stdout
    planned = {path for line in re.findall(r"^    output: (.*)$", plan, flags=re.M) for path in line.split(", ")}
    planned |= {path for line in re.findall(r"^Job \d+: \w+ \S+: .* -> (.*) \(log: ", plan, flags=re.M)
                for path in line.split(" ")}  # one-line `message:` jobs
    assert not set(targets) - planned


@pytest.mark.slow
def test_bad_roster_row_fails_alone_with_row_and_column(tmp_path, repo_config, tiny_overrides):
    fresh = make_workdir(tmp_path / "bad", repo_config, tiny_overrides)
    (fresh / "roster.tsv").write_text("subject\tclass_word\tsources\neva\twoman\tphotos/eva\nbob\tdog\tphotos/eva\n")
    message = "row 3 (subject 'bob'), column 'class_word'"
    planned = snakemake(fresh, "-n")  # the good subject still plans; the warning names the bad row at once
    assert message in planned.stderr and "Traceback" not in planned.stdout + planned.stderr
    jobs = planned_jobs(fresh)
    assert ("train", "eva") in jobs and ("roster_check", "") in jobs and not any(s == "bob" for _, s in jobs)
    result = snakemake(fresh, "--keep-going", "results/summary/roster_check.txt", check=False)  # the job that fails with it
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"ERROR in roster_check {{}}: roster roster.tsv: 1 bad row(s) left out of the run:\n  {message}" in output
    assert "Traceback" not in output and not (fresh / "results" / "summary" / "roster_check.txt").exists()


@pytest.mark.slow
def test_bad_config_fails_with_schema_message(tmp_path, repo_config, tiny_overrides):
    fresh = make_workdir(tmp_path / "badconfig", repo_config, tiny_overrides)
    result = snakemake(fresh, "-n", "--config", "roster=roster.tsv", "colour=red", check=False)
    assert result.returncode != 0
    assert "colour" in result.stdout + result.stderr


@pytest.mark.slow
def test_subject_with_no_usable_photo_fails_alone(tmp_path, repo_config, tiny_overrides):
    fresh = make_workdir(tmp_path / "keepgoing", repo_config, tiny_overrides)
    (fresh / "nofaces").mkdir()
    Image.new("RGB", (300, 300), (120, 90, 60)).save(fresh / "nofaces" / "wall.png")
    (fresh / "roster.tsv").write_text("subject\tclass_word\tsources\neva\twoman\tphotos/eva\n"
                                      "wall\tman\tnofaces\n")
    result = snakemake(fresh, "--keep-going", check=False)
    assert result.returncode != 0
    assert (fresh / "results" / "eva" / "samples" / "grid.png").is_file()
    dataset_log = (fresh / "logs" / "dataset" / "wall.log").read_text()
    assert "subject 'wall': no usable photos (1 rejected: no face x1)" in dataset_log
    assert "Traceback" not in dataset_log
    # the run ends with the roster summary (Snakefile onerror -> tifactory.run_summary)
    # (the done subject's verdict counts in brackets: on the tiny model its samples hold no face, "weak")
    assert re.search(r"tifactory: 1 of 2 subject\(s\) have their embedding \(1 (ok|weak)\), 1 failed", result.stderr)
    assert "WARNING: DEMO MODEL" in result.stderr  # a roster other than the demo's on the toy model
    assert ("FAILED wall: dataset: subject 'wall': no usable photos (1 rejected: no face x1) "
            "(logs/dataset/wall.log)") in result.stderr
    shutil.rmtree(fresh)


@pytest.mark.slow
def test_a_successful_run_ends_with_the_roster_summary(tmp_path, repo_config, tiny_overrides):
    fresh = make_workdir(tmp_path / "summary", repo_config, tiny_overrides)
    result = snakemake(fresh, "--keep-going", "results/summary/roster_check.txt")
    assert "tifactory: 0 of 2 subject(s) have their embedding" in result.stderr
    assert "not built in this run (no embedding, no failed job): eva, tom" in result.stderr
