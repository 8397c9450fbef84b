"""Issue 7, bad input end to end through Snakemake: nothing lost, nothing silent.

One Snakemake run (`--keep-going`) over a roster of three subjects:
  eva      a folder of every kind of awkward file (tests/support/badcorpus.py: MESSY_EXPECTED says what each is)
  gone     a source folder that does not exist
  rejects  a folder whose photos are all rejected
eva must train; the other two must fail alone with one clear message each. Roster and config errors
fail at the start, before any job runs, with a message naming the row or the schema's words.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from support.badcorpus import (
    MESSY_EXPECTED,
    NON_ASCII_NAME,
    astronaut,
    install_demo_model,
    make_demo_like_folder,
    make_messy_folder,
    write_workdir,
)
from support.harness import run_snakemake

TARGETS = ["results/eva/eva-ti.safetensors", "results/gone/gone-ti.safetensors",
           "results/rejects/rejects-ti.safetensors", "results/summary/crops.tsv", "results/summary/roster_check.txt"]
# bad roster rows (rows 5-8 of the messy roster): left out with one message each, the good subjects still run
BAD_ROSTER_ROWS = ["eva\tman\tphotos/eva", "../x\twoman\tphotos/eva", "a/b\twoman\tphotos/eva", "bob\tdog\tphotos/eva"]
BAD_ROSTER_MESSAGES = ["row 5 (subject 'eva'), column 'subject': duplicate of row 2",
                       "row 6 (subject '../x'), column 'subject': '../x' does not match",
                       "row 7 (subject 'a/b'), column 'subject': 'a/b' does not match",
                       "row 8 (subject 'bob'), column 'class_word': 'dog' is not one of"]
REJECTS_EXPECTED = {"notes.jpg": "undecodable", "tiny.png": "too small", "wall.jpg": "no face",
                    "group.jpg": "ambiguous"}


def _manifest(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory, repo_config, tiny_overrides, tiny_model_dir):
    root = write_workdir(tmp_path_factory.mktemp("messy"), repo_config, tiny_overrides,
                         ["eva\twoman\tphotos/eva", "gone\tman\tphotos/gone", "rejects\tperson\tphotos/rejects"]
                         + BAD_ROSTER_ROWS,
                         train=dict(repo_config["train"], resolution=256))
    make_messy_folder(root / "photos" / "eva")
    rejects = root / "photos" / "rejects"
    rejects.mkdir(parents=True)
    (rejects / "notes.jpg").write_text("not a photo", encoding="utf-8")
    astronaut().resize((50, 50)).save(rejects / "tiny.png")
    Image.new("RGB", (300, 300), (120, 90, 60)).save(rejects / "wall.jpg")
    (rejects / "group.jpg").write_bytes((root / "photos" / "eva" / "group.jpg").read_bytes())
    install_demo_model(root, tiny_model_dir)
    result = run_snakemake(root, "--keep-going", *TARGETS, check=False, timeout=300)  # a hang fails, not blocks
    return root, result


@pytest.mark.slow
def test_the_run_finishes_the_good_subject_and_fails_the_bad_ones_alone(messy_run):
    root, result = messy_run
    output = result.stdout + result.stderr
    assert result.returncode != 0  # two subjects failed ...
    from tifactory.training.embedding import load_embedding

    vectors, metadata = load_embedding(root / "results" / "eva" / "eva-ti.safetensors")  # ... eva trained
    assert tuple(vectors.shape) == (5, 768) and metadata["tifactory.subject"] == "eva"
    assert (root / "results" / "summary" / "crops.tsv").is_file()
    # one clear line per failed subject, naming it, with the rejection summary
    assert ("ERROR in dataset {'subject': 'gone'}: subject 'gone': no usable photos "
            "(1 rejected: source not found x1)") in output
    assert ("ERROR in dataset {'subject': 'rejects'}: subject 'rejects': no usable photos "
            "(4 rejected: ambiguous x1; no face x1; too small x1; undecodable x1)") in output
    assert "unexpected" not in output  # every failure is an expected, explained one
    # the bad roster rows: one job fails with one line per row; nothing of theirs is made anywhere
    assert "ERROR in roster_check {}: roster roster.tsv: 4 bad row(s) left out of the run:" in output
    for message in BAD_ROSTER_MESSAGES:
        assert output.count(message) >= 1
    assert not (root / "results" / "summary" / "roster_check.txt").exists()
    assert not (root / "x").exists() and not (root.parent / "x").exists() and not (root / "results" / "a").exists()
    assert not (root / "results" / "bob").exists()
    for log in (root / "logs").rglob("*.log"):
        assert "Traceback" not in log.read_text(encoding="utf-8"), log
    for subject in ("gone", "rejects"):
        assert not (root / "results" / subject / "dataset").exists()
        assert not (root / "results" / subject / f"{subject}-ti.safetensors").exists()
    assert "rejected " + str(root / "photos" / "gone") + ": source not found" in \
        (root / "logs" / "collect" / "gone.log").read_text()


@pytest.mark.slow
def test_every_entry_is_one_row_with_its_outcome(messy_run):
    root, _ = messy_run
    folder = root / "photos" / "eva"
    entries = {path.name for path in folder.iterdir()}
    assert entries == set(MESSY_EXPECTED)  # the corpus is what the table says (symlinks included)
    assert (folder / "deep16.png").read_bytes()[24] == 16  # IHDR bit depth: 16 bits per channel
    with Image.open(folder / "palette_transparent.png") as palette:
        assert palette.mode == "P" and "transparency" in palette.info
    with Image.open(folder / "cmyk.jpg") as cmyk, Image.open(folder / "rgba.png") as rgba:
        assert (cmyk.mode, rgba.mode) == ("CMYK", "RGBA")
    raw = _manifest(root / "results" / "eva" / "raw" / "manifest.tsv")
    crops = _manifest(root / "results" / "eva" / "crops" / "manifest.tsv")
    for manifest in (raw, crops):
        names = [Path(source).name for source in manifest["source"]]
        assert sorted(names) == sorted(entries), "every entry exactly once: nothing lost, nothing doubled"
        assert set(manifest["status"]) == {"kept", "rejected"}
        assert (manifest.loc[manifest["status"] == "rejected", "reason"].str.len() > 0).all()
    outcome = {Path(row.source).name: row for row in crops.itertuples()}
    for name, expected in MESSY_EXPECTED.items():
        row = outcome[name]
        if expected == "kept":
            assert row.status == "kept", (name, row.reason)
        else:
            assert row.status == "rejected" and row.reason.startswith(expected), (name, row.reason)
    assert outcome["zz_exact_copy.jpg"].reason == f"duplicate of {folder / 'regular.jpg'}"
    assert outcome["zz_near_copy.jpg"].reason.startswith(f"near-duplicate of {folder / 'regular.jpg'}")
    colour = dict(zip((Path(s).name for s in raw["source"]), raw["colour"]))
    assert "CMYK->RGB" in colour["cmyk.jpg"] and "L->RGB" in colour["grey.png"]
    assert "alpha-flattened" in colour["rgba.png"] and "alpha-flattened" in colour["palette_transparent.png"]
    assert "first-of-2-frames" in colour["animated.gif"]
    formats = dict(zip((Path(s).name for s in raw["source"]), raw["format"]))
    assert formats["jpeg_named.png"] == "JPEG" and formats["photo.webp"] == "WEBP"
    orientation = dict(zip((Path(s).name for s in raw["source"]), raw["exif_orientation"]))
    assert orientation["rotated_exif.jpg"] == "6"


@pytest.mark.slow
def test_every_good_photo_reaches_the_dataset(messy_run):
    root, _ = messy_run
    crops_dir = root / "results" / "eva" / "crops"
    crops = _manifest(crops_dir / "manifest.tsv")
    kept = crops[crops["status"] == "kept"]
    assert len(kept) == sum(outcome == "kept" for outcome in MESSY_EXPECTED.values()) == 11
    dataset = root / "results" / "eva" / "dataset" / "100_eva woman"
    assert sorted(p.name for p in dataset.iterdir()) == sorted(kept["output"])
    for name in kept["output"]:
        assert re.fullmatch(r"\d{3}_[A-Za-z0-9._-]+\.png", name), name  # ASCII-safe, inside the folder
        with Image.open(crops_dir / name) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (256, 256))  # at train.resolution
        assert (dataset / name).read_bytes() == (crops_dir / name).read_bytes()
    non_ascii = kept[kept["source"].str.endswith(NON_ASCII_NAME)]
    assert len(non_ascii) == 1 and non_ascii.iloc[0]["output"].isascii()


@pytest.mark.slow
def test_all_rejected_and_missing_subjects_are_counted_in_the_summary(messy_run):
    root, _ = messy_run
    summary = _manifest(root / "results" / "summary" / "crops.tsv").set_index("subject")
    assert summary.loc["gone", "photos"] == "1" and summary.loc["gone", "source not found"] == "1"
    assert summary.loc["rejects", "kept"] == "0" and summary.loc["rejects", "rejected"] == "4"
    assert summary.loc["eva", "kept"] == "11" and summary.loc["eva", "rejected"] == str(len(MESSY_EXPECTED) - 11)
    rejects = _manifest(root / "results" / "rejects" / "crops" / "manifest.tsv")
    assert {Path(s).name: r.split(":")[0].split(" (")[0] for s, r in zip(rejects["source"], rejects["reason"])} \
        == REJECTS_EXPECTED


# ----------------------------------------------------------------------------- errors at the start

@pytest.fixture()
def small_workdir(tmp_path, repo_config, tiny_overrides):
    root = write_workdir(tmp_path / "wd", repo_config, tiny_overrides, ["eva\twoman\tphotos/eva"])
    make_demo_like_folder(root / "photos" / "eva", "ab")
    return root


def _assert_failed_before_any_job(root: Path, result) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "Traceback" not in output
    assert not (root / "results").exists() and not (root / "logs").exists(), "nothing may run"
    return output


@pytest.mark.parametrize("bad_row, expected", [
    ("eva\tman\tphotos/eva", "row 3 (subject 'eva'), column 'subject': duplicate of row 2"),
    ("../x\twoman\tphotos/eva", "row 3 (subject '../x'), column 'subject': '../x' does not match"),
    ("a/b\twoman\tphotos/eva", "row 3 (subject 'a/b'), column 'subject': 'a/b' does not match"),
])
@pytest.mark.slow
def test_bad_roster_row_is_named_at_once_and_left_out(small_workdir, bad_row, expected):
    # (the full --keep-going run with bad rows is the messy run above)
    roster = small_workdir / "roster.tsv"
    roster.write_text(roster.read_text() + bad_row + "\n", encoding="utf-8")
    result = run_snakemake(small_workdir, "-n", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output
    assert output.count(expected) == 1  # one message for the one bad row, before anything runs
    assert "roster_check" in result.stdout and "wildcards: subject=eva" in result.stdout
    assert not (small_workdir / "results").exists() and not (small_workdir / "x").exists()


@pytest.mark.slow
def test_roster_of_only_bad_rows_stops_at_start(small_workdir):
    (small_workdir / "roster.tsv").write_text("subject\tclass_word\tsources\n../x\twoman\tphotos/eva\n")
    output = _assert_failed_before_any_job(small_workdir, run_snakemake(small_workdir, check=False))
    assert "no usable subjects" in output and "row 2 (subject '../x'), column 'subject'" in output


@pytest.mark.parametrize("change, expected", [
    (lambda c: c["train"].update(max_train_steps="many"), "'many' is not of type 'integer'"),
    (lambda c: c["crop"].update(colour="red"),
     "Additional properties are not allowed ('colour' was unexpected)"),
    (lambda c: c["train"].update(max_train_steps=-5), "-5 is less than the minimum of 1"),
    (lambda c: c["demo_overrides"]["train"].update(save_every_n_steps=0), "0 is less than the minimum of 1"),
], ids=["wrong-type", "unknown-key", "negative-steps", "zero-interval-in-demo-overrides"])
@pytest.mark.slow
def test_bad_config_fails_at_start_with_the_schema_message(small_workdir, change, expected):
    import yaml

    path = small_workdir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    output = _assert_failed_before_any_job(small_workdir, run_snakemake(small_workdir, check=False))
    assert "Error validating config file" in output and expected in output


@pytest.mark.parametrize("faces, expected", [
    ({"recogniser": "arcface"}, "faces.recogniser: arcface needs a pack with a recognition model"),
    ({"detector": "insightface"}, "faces.detector: insightface needs a pack with a detection model"),
], ids=["arcface-without-pack", "scrfd-without-pack"])
@pytest.mark.slow
def test_face_model_that_cannot_work_here_is_named_at_start(small_workdir, faces, expected):
    """An explicit insightface model without its local pack fails before any job runs, naming the setting."""
    import yaml

    path = small_workdir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["faces"].update(faces, insightface_pack=str(small_workdir / "no-pack"))
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    output = _assert_failed_before_any_job(small_workdir, run_snakemake(small_workdir, check=False))
    assert expected in output and "never downloaded" in output
