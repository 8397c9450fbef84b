"""Issue 21, a careless or unlucky user: nothing of his overwritten or read, nothing hangs, no roster row lost.

publish_dir (someone else's files, the folder itself, the demo model, output_name), model files (FIFOs,
devices, malformed headers, pickle bombs, code globals), roster folders and rows (symlinks, periodic
names, quotes, encodings), and bounds (step and checkpoint counts, NaN, explicit --config settings).
Each test fails when its check is removed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from support.modelfiles import SD15_SHAPES, UNET, raw_header_file, safetensors_header_file, tifactory_embedding
from tifactory.cli import main as cli_main
from tifactory.configuration import non_finite_numbers
from tifactory.photos.sources import expand_source
from tifactory.publish import PublishError, check_publish_dir, foreign_file, publish_embedding
from tifactory.roster import (
    RosterError,
    keep_explicit_settings,
    periodic_tail,
    read_roster_rows,
    recipe_problems,
    train_params,
)
from tifactory.roster_folders import roster_from_folders, subject_name
from tifactory.training.model_check import (
    ModelCheckError,
    check_models,
    read_pickle_checkpoint,
    read_safetensors_header,
)

def run_isolated(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Python code in a fresh process (a hang is a failed test, not a stuck suite; memory measured alone)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2])]
                                                      + [p for p in sys.path if p]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


# ----------------------------------------------------------------------------------------- publish_dir

def test_publish_dir_must_be_a_writable_folder_without_braces(tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert check_publish_dir(str(tmp_path / "new" / "embeddings")) == []  # can be created
    assert check_publish_dir(str(tmp_path)) == []
    for bad, words in [(str(afile), "is not a folder"), (str(afile / "sub"), "is not a folder"),
                       ("/proc/x", "cannot be created"), (str(tmp_path / "{subject}"), "wildcard"),
                       ("results/emb", "inside results/")]:
        problems = check_publish_dir(bad)
        assert len(problems) == 1 and problems[0].startswith("publish_dir: ") and words in problems[0], (bad, problems)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root writes anywhere
            assert "not writable" in check_publish_dir(str(readonly))[0]
    finally:
        readonly.chmod(0o700)


def test_only_tifactorys_own_copy_is_replaced(tmp_path):
    source = tifactory_embedding(tmp_path / "eva-ti.safetensors", "eva")
    published = tmp_path / "emb"
    published.mkdir()
    own = tifactory_embedding(published / "eva-ti.safetensors", "eva")
    assert foreign_file(own, "eva") is None
    publish_embedding(source, own, "eva", replace_others=False)  # an earlier copy of ours: replaced

    theirs = published / "tom-ti.safetensors"
    theirs.write_bytes(b"an embedding someone else trained")
    other_subject = tifactory_embedding(published / "ann-ti.safetensors", "someone-else")
    plain = safetensors_header_file(published / "bob-ti.safetensors", {"emb_params": [1, 768]}, {"x": "y"})
    for path, subject in [(theirs, "tom"), (other_subject, "ann"), (plain, "bob")]:
        before = path.read_bytes()
        with pytest.raises(PublishError, match=re.escape(str(path))):
            publish_embedding(source, path, subject, replace_others=False)
        assert path.read_bytes() == before
    publish_embedding(source, theirs, "tom", replace_others=True)  # the user opted in
    assert theirs.read_bytes() == source.read_bytes()


def fake_sd15_workdir(root: Path, repo_config: dict, roster: str, **config) -> Path:
    root.mkdir(parents=True)
    for subject in ("eva", "tom"):
        (root / "photos" / subject).mkdir(parents=True)
    safetensors_header_file(root / "sd15.safetensors", SD15_SHAPES)
    (root / "roster.tsv").write_text(roster, encoding="utf-8")
    (root / "config.yaml").write_text(yaml.safe_dump(dict(repo_config, roster="roster.tsv",
                                                          base_model="sd15.safetensors", **config)))
    return root


def planned_outputs(plan: str, rule: str) -> list[str]:
    return sorted(re.findall(rf"rule {rule}:\n(?:    .*\n)*?    output: (\S+)", plan))


@pytest.mark.slow
def test_files_of_others_in_publish_dir_are_named_before_any_job_and_left_alone(tmp_path, repo_config, run_snakemake):
    publish = tmp_path / "webui" / "embeddings"
    publish.mkdir(parents=True)
    roster = ("subject\tclass_word\tsources\toutput_name\n"
              "eva\twoman\tphotos/eva\teva-green\n"
              "tom\tman\tphotos/tom\t\n"
              "ann\twoman\tphotos/eva\t\n"
              f"{'x' * 21}\twoman\tphotos/tom\t\n")  # periodic: refused alone, naming its row
    workdir = fake_sd15_workdir(tmp_path / "w", repo_config, roster, publish_dir=str(publish))
    theirs = publish / "tom-ti.safetensors"
    theirs.write_bytes(b"his own tom")
    os.utime(theirs, (4e9, 4e9))  # newer than anything a run makes: Snakemake alone would call it up to date
    ann_best = publish / "ann-ti-best.safetensors"
    ann_best.write_bytes(b"his own ann")
    os.utime(ann_best, (1e9, 1e9))  # older: Snakemake alone would overwrite it
    result = run_snakemake(workdir, "-n", cores=1)
    output = result.stdout + result.stderr
    for path in (theirs, ann_best):
        assert f"publish_dir: {path} exists and is not tifactory's copy" in output
    # the final copy is planned; the -best one only once likeness (a checkpoint) has chosen a step
    assert planned_outputs(result.stdout, "publish") == [str(publish / "eva-green.safetensors")]
    assert "row 5 (subject 'xxxxxxxxxxxxxxxxxxxxx'), column 'subject': it ends in 'x' repeated 20" in output
    assert "Traceback" not in output and "is periodically repeated" not in output
    # asked for by name, the copy still stops at the DAG, naming the file, which stays as it was
    named = run_snakemake(workdir, str(theirs), "-n", cores=1, check=False)
    assert named.returncode != 0 and f"publish_dir: {theirs} exists" in named.stdout + named.stderr
    assert theirs.read_bytes() == b"his own tom" and ann_best.read_bytes() == b"his own ann"


@pytest.mark.slow
def test_publish_copies_under_the_output_name(tmp_path, repo_config, run_snakemake):
    publish = tmp_path / "ComfyUI" / "models" / "embeddings"
    roster = "subject\tclass_word\tsources\toutput_name\neva\twoman\tphotos/eva\teva-green\n"
    workdir = fake_sd15_workdir(tmp_path / "w", repo_config, roster, publish_dir=str(publish))
    (workdir / "results" / "eva").mkdir(parents=True)
    final = tifactory_embedding(workdir / "results" / "eva" / "eva-ti.safetensors", "eva")
    run_snakemake(workdir, str(publish / "eva-green.safetensors"), "--allowed-rules", "publish", cores=1)
    assert (publish / "eva-green.safetensors").read_bytes() == final.read_bytes()


@pytest.mark.slow
def test_publish_dir_problems_stop_the_dag_with_a_message(tmp_path, repo_config, run_snakemake):
    afile = tmp_path / "embeddings.txt"
    afile.write_text("not a folder")
    roster = "subject\tclass_word\tsources\neva\twoman\tphotos/eva\n"
    workdir = fake_sd15_workdir(tmp_path / "w", repo_config, roster, publish_dir=str(afile))
    result = run_snakemake(workdir, "-n", cores=1, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"publish_dir: {afile} exists and is not a folder" in output
    assert "Traceback" not in output and "NotADirectoryError" not in output


@pytest.mark.slow
def test_demo_model_never_publishes_and_explicit_settings_win(tmp_path, repo_config, tiny_overrides, run_snakemake):
    publish = tmp_path / "embeddings"
    workdir = tmp_path / "w"
    (workdir / "photos" / "eva").mkdir(parents=True)
    (workdir / "roster.tsv").write_text("subject\tclass_word\tsources\neva\twoman\tphotos/eva\n")
    (workdir / "config.yaml").write_text(yaml.safe_dump(dict(repo_config, roster="roster.tsv",
                                                             publish_dir=str(publish))))
    result = run_snakemake(workdir, "-n", "-p", "--config", "train={max_train_steps: 7}", cores=1)
    output = result.stdout + result.stderr
    assert "base_model is demo-tiny: nothing is published" in output
    assert planned_outputs(result.stdout, "publish") == [] and not publish.exists()
    named = run_snakemake(workdir, str(publish / "eva-ti.safetensors"), "-n", cores=1, check=False)
    assert named.returncode != 0 and "publish_dir: nothing built on the demo model" in named.stdout + named.stderr
    assert ("train.max_train_steps: 7 from the command line wins over demo_overrides.train.max_train_steps "
            f"({repo_config['demo_overrides']['train']['max_train_steps']})") in output


@pytest.mark.slow
def test_non_finite_numbers_are_named_before_any_job(tmp_path, repo_config, run_snakemake):
    roster = "subject\tclass_word\tsources\neva\twoman\tphotos/eva\n"
    workdir = fake_sd15_workdir(tmp_path / "w", repo_config, roster)
    result = run_snakemake(workdir, "-n", "--config", "train={learning_rate: .nan}", cores=1, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "train.learning_rate: nan is not a finite number" in output
    assert "Traceback" not in output


# ----------------------------------------------------------------------------------------- output_name

def test_output_name_is_validated_like_the_subject(tmp_path, repo_config):
    (tmp_path / "p").mkdir()
    roster = tmp_path / "roster.tsv"
    roster.write_text("subject\tclass_word\tsources\toutput_name\n"
                      "eva\twoman\tp\teva-green\n"
                      "tom\tman\tp\tTom Cruise\n"        # pattern
                      "ann\twoman\tp\teva-green\n"       # taken by row 2
                      "bob\tman\tp\teva\n"               # another subject's name
                      "kim\twoman\tp\teva-green-best\n"  # eva-green's -best file
                      "lea\twoman\tp\t\n", encoding="utf-8")
    rows, problems = read_roster_rows(roster)
    assert [row["subject"] for row in rows] == ["eva", "lea"]
    assert len(problems) == 4
    assert problems[0].startswith("row 3 (subject 'tom'), column 'output_name': 'Tom Cruise' does not match")
    assert "row 4 (subject 'ann'), column 'output_name': 'eva-green' gives the file name eva-green.safetensors, " \
           "which row 2 already gives" in problems[1]
    assert "row 5 (subject 'bob'), column 'output_name': 'eva' is the name of the subject on row 2" in problems[2]
    assert "row 6 (subject 'kim')" in problems[3]
    from tifactory.publish import output_name as trigger_of

    assert [trigger_of(row) for row in rows] == ["eva-green", "lea-ti"]
    assert "output_name" not in train_params(repo_config, rows[0])  # the trigger is not part of the recipe
    from tifactory.training.embedding import build_metadata

    common = dict(step=1, resolution=512, date="2026-01-01", architecture="stable-diffusion-v1/textual-inversion", base_model="m", base_model_hash="", dataset_hash="")
    assert build_metadata(subject="eva", title=trigger_of(rows[0]), recipe=train_params(repo_config, rows[0]), **common)[
        "modelspec.title"] == "eva-green"
    assert build_metadata(subject="lea", title=trigger_of(rows[1]), recipe=train_params(repo_config, rows[1]), **common)[
        "modelspec.title"] == "lea-ti"


# ----------------------------------------------------------------------------------------- model headers

@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_fifo_and_device_model_files_are_refused_at_once(tmp_path, suffix):
    fifo = tmp_path / f"fifo{suffix}"
    os.mkfifo(fifo)
    zero = tmp_path / f"zero{suffix}"
    zero.symlink_to("/dev/zero")
    result = run_isolated(
        "from tifactory.training.model_check import check_base_model, check_vae\n"
        f"print(check_base_model({str(fifo)!r}))\nprint(check_vae({str(zero)!r}))\n", timeout=30)
    assert f"base_model: {fifo} is a FIFO (named pipe), not a regular file" in result.stdout, result.stderr
    assert f"vae: {zero} is a device, not a regular file" in result.stdout, result.stderr


def test_malformed_headers_give_their_first_true_reason(tmp_path):
    reasons = {
        "short": "is too short to be a safetensors file (3 bytes)",  # a ValueError, not re-wrapped as "not JSON"
        "deep": "its header nests too deeply",
        "list_metadata": "its __metadata__ is a JSON list, not an object of strings",
        "bad_shape": "entry 'w' has no shape of sizes",
    }
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    raw_header_file(tmp_path / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    raw_header_file(tmp_path / "list_metadata.safetensors", json.dumps({"__metadata__": [1, 2]}).encode())
    raw_header_file(tmp_path / "bad_shape.safetensors", json.dumps({"w": {"shape": ["a"]}}).encode())
    for name, reason in reasons.items():
        with pytest.raises(ModelCheckError) as caught:
            read_safetensors_header(tmp_path / f"{name}.safetensors")
        assert reason in str(caught.value), str(caught.value)
        assert "not JSON" not in str(caught.value)
    # a (deep) diffusers config.json is named, not a RecursionError
    folder = tmp_path / "diffusers"
    for part in ("unet", "text_encoder", "tokenizer", "vae"):
        (folder / part).mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    problems = check_models({"base_model": str(folder), "base_model_config": "", "vae": "", "eval_models": []})
    assert len(problems) == 1 and "nests too deeply" in problems[0]


def _zip_checkpoint(path: Path, pickle_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
    return path


def test_a_small_pickle_bomb_is_refused_quickly_in_little_memory(tmp_path):
    bomb = _zip_checkpoint(tmp_path / "bomb.ckpt", b"\x80\x02" + pickle.EMPTY_SET * 20_000_000 + pickle.STOP)
    assert bomb.stat().st_size < 64 * 1024
    result = run_isolated(
        "import resource, time\n"
        "from tifactory.training.model_check import check_base_model\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "started = time.perf_counter()\n"
        f"print(check_base_model({str(bomb)!r}))\n"
        "print('seconds', time.perf_counter() - started)\n"
        "print('grew_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n", timeout=60)
    assert "its pickle is refused" in result.stdout, result.stdout + result.stderr
    seconds = float(re.search(r"seconds (\S+)", result.stdout)[1])
    grew_mb = int(re.search(r"grew_kb (\d+)", result.stdout)[1]) / 1024
    assert seconds < 10 and grew_mb < 100, (seconds, grew_mb)


def test_pickle_nesting_and_memo_are_bounded(tmp_path):
    marks = _zip_checkpoint(tmp_path / "marks.ckpt", b"\x80\x02" + pickle.MARK * 100_000 + pickle.STOP)
    with pytest.raises(ModelCheckError, match="nests over"):
        read_pickle_checkpoint(marks)
    # {'k': {'k': ... 5000 deep}}: EMPTY_DICT and a key 5000 times, a last EMPTY_DICT, then 5000 SETITEMs;
    # the result is walked for tensor names only a few levels deep (no RecursionError)
    key = pickle.BINUNICODE + struct.pack("<I", 1) + b"k"
    nested = _zip_checkpoint(tmp_path / "nested.ckpt", b"\x80\x02" + (pickle.EMPTY_DICT + key) * 5_000
                             + pickle.EMPTY_DICT + pickle.SETITEM * 5_000 + pickle.STOP)
    assert read_pickle_checkpoint(nested).shapes == {}
    # a 100 000-item list copied by builtins.list 10 000 times (a few bytes each): charged by what it copies
    copies = (b"\x80\x02" + pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + pickle.MARK + (pickle.BININT1 + b"\x01")
              * 100_000 + pickle.APPENDS + pickle.POP + pickle.GLOBAL + b"builtins\nlist\n" + pickle.BINPUT + b"\x01"
              + pickle.MARK + (pickle.BINGET + b"\x01" + pickle.BINGET + b"\x00" + pickle.TUPLE1 + pickle.REDUCE)
              * 10_000 + pickle.LIST + pickle.STOP)
    with pytest.raises(ModelCheckError, match="builds more than a checkpoint"):
        read_pickle_checkpoint(_zip_checkpoint(tmp_path / "copies.ckpt", copies))


def test_torch_and_numpy_code_globals_the_loader_refuses_are_refused_at_dag_time(tmp_path):
    torch = pytest.importorskip("torch")
    import numpy

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {UNET + "w": torch.zeros(2, 3), "p": torch.nn.Parameter(torch.zeros(2))}}, good)
    assert read_pickle_checkpoint(good).unsafe_globals == []
    # a module's state_dict() is an OrderedDict with a pickled `_metadata` attribute (as Lightning checkpoints hold)
    module_state = tmp_path / "module_state.ckpt"
    torch.save({"state_dict": torch.nn.Sequential(torch.nn.Linear(2, 3)).state_dict()}, module_state)
    inspection = read_pickle_checkpoint(module_state)
    assert inspection.shapes == {"0.weight": (3, 2), "0.bias": (3,)} and inspection.unsafe_globals == []
    with_numpy = tmp_path / "numpy.ckpt"
    torch.save({"state_dict": {"a": numpy.zeros(2)}}, with_numpy)
    with_module = tmp_path / "module.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "net": torch.nn.Identity()}, with_module)
    for path, name in [(with_numpy, "numpy."), (with_module, "torch.nn.modules.")]:
        unsafe = read_pickle_checkpoint(path).unsafe_globals
        assert any(found.startswith(name) for found in unsafe), unsafe
        with pytest.raises(Exception):  # the loader refuses them too
            torch.load(path, weights_only=True)


def test_vae_is_checked_with_the_demo_model(tmp_path):
    not_a_vae = safetensors_header_file(tmp_path / "lora.safetensors", {"lora_unet_down.weight": [4, 4]})
    problems = check_models({"base_model": "demo-tiny", "base_model_config": "", "vae": str(not_a_vae),
                             "eval_models": []})
    assert len(problems) == 1 and problems[0].startswith(f"vae: {not_a_vae} is a LoRA")


# ----------------------------------------------------------------------------------------- roster folders

def test_periodic_names_are_renamed_by_tifactory_roster(tmp_path):
    assert periodic_tail("x" * 21) == "x" and periodic_tail("ab" * 20) == "ab" and periodic_tail("x" * 19) is None
    assert periodic_tail(subject_name("a" * 250, 64)) is None
    data = tmp_path / "data"
    for name in ("a" * 250, "x" * 25, "eva"):
        (data / name).mkdir(parents=True)
        (data / name / "1.jpg").write_bytes(b"x")
    result = roster_from_folders(data, "woman")
    assert sorted(row["subject"] for row in result.rows) == ["a" * 19, "eva", "x" * 19]


def test_tifactory_roster_follows_no_symlinks_out_of_or_back_into_data_dir(tmp_path):
    data = tmp_path / "data"
    (data / "eva").mkdir(parents=True)
    (data / "eva" / "1.jpg").write_bytes(b"x")
    (data / "root").symlink_to("/")
    (data / "loop").symlink_to(".")
    (data / "alias").symlink_to("eva")
    result = roster_from_folders(data, "woman")
    assert [row["subject"] for row in result.rows] == ["eva"]
    skipped = dict(result.skipped)
    assert "leaving" in skipped["root"] and "back into" in skipped["loop"] and "back into" in skipped["alias"]
    # a roster row naming such a link itself reads nothing through it
    for link in ("root", "loop"):
        listing = expand_source(str(data / link))
        assert listing.files == [] and listing.problem.startswith("symlink loop"), listing


def test_awkward_folder_names_are_skipped_with_a_reason_and_o_is_checked(tmp_path, capsys):
    data = tmp_path / "data"
    names = ["eva", "tom ", os.fsdecode(b"zo\xeb")]
    for name in names:
        (data / name).mkdir(parents=True)
        (data / name / "1.jpg").write_bytes(b"x")
    out = tmp_path / "roster.tsv"
    assert cli_main(["roster", str(data), "--class", "woman", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped: 'tom ' (its name starts or ends in a blank" in err
    assert "is not valid UTF-8" in err
    rows, problems = read_roster_rows(out)
    assert [row["subject"] for row in rows] == ["eva"] and problems == []
    assert cli_main(["roster", str(data), "--class", "woman", "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- roster rows

def test_an_unbalanced_quote_loses_only_its_own_row(tmp_path):
    (tmp_path / "p").mkdir()
    roster = tmp_path / "roster.tsv"
    roster.write_text('subject\tclass_word\tsources\neva\twoman\tp\n"tom\tman\tp\nann\twoman\tp\nbob\tman\tp\n',
                      encoding="utf-8")
    rows, problems = read_roster_rows(roster)
    assert [row["subject"] for row in rows] == ["eva", "ann", "bob"]
    assert len(problems) == 1 and problems[0].startswith("row 3: a cell's quotes do not balance")


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_bom_and_utf16_rosters_are_read(tmp_path, encoding):
    (tmp_path / "Zoë").mkdir()
    roster = tmp_path / "roster.tsv"
    roster.write_text(f"subject\tclass_word\tsources\nzoe\twoman\t{tmp_path / 'Zoë'}\n", encoding=encoding)
    rows, problems = read_roster_rows(roster)
    assert problems == [] and rows[0]["sources"] == str(tmp_path / "Zoë")


def test_a_latin1_roster_is_named(tmp_path):
    roster = tmp_path / "roster.tsv"
    roster.write_text("subject\tclass_word\tsources\nzoe\twoman\tphotos/Zoë\n", encoding="latin-1")
    with pytest.raises(RosterError, match=r"line 2 is not UTF-8 \(byte 0xeb"):
        read_roster_rows(roster)


# ----------------------------------------------------------------------------------------- bounds

def test_step_and_checkpoint_counts_are_bounded(repo_config):
    import jsonschema

    from tifactory.configuration import load_schema

    validator = jsonschema.Draft202012Validator(load_schema())
    config = json.loads(json.dumps(repo_config))
    config["train"]["max_train_steps"] = 10_000_000_000_000
    assert any("max_train_steps" in str(list(error.path)) for error in validator.iter_errors(config))
    params = dict(repo_config["train"], max_train_steps=100_000, save_every_n_steps=10)
    assert "writes 10000 checkpoints (at most 1000)" in recipe_problems("eva", params)[0]
    params = dict(repo_config["train"], max_train_steps=100_000, save_every_n_steps=1000,
                  train_batch_size=1024, gradient_accumulation_steps=1000)
    assert "samples (at most" in recipe_problems("eva", params)[-1]
    assert recipe_problems("eva", repo_config["train"]) == []


def test_nan_and_infinity_are_named(tmp_path):
    config = {"train": {"learning_rate": float("nan"), "noise_offset": 0.1}, "x": [1, float("inf")]}
    assert non_finite_numbers(config) == ["train.learning_rate: nan is not a finite number",
                                          "x[1]: inf is not a finite number"]
    (tmp_path / "p").mkdir()
    roster = tmp_path / "roster.tsv"
    roster.write_text("subject\tclass_word\tsources\tlearning_rate\neva\twoman\tp\tnan\ntom\tman\tp\t1e400\n")
    rows, problems = read_roster_rows(roster)
    assert rows == [] and len(problems) == 2 and "column 'learning_rate'" in problems[0]


def test_explicit_settings_win_over_demo_overrides(repo_config):
    config = json.loads(json.dumps(repo_config))
    config["train"]["max_train_steps"] = 7
    notes = keep_explicit_settings(config, {"train": {"max_train_steps": "7"}})
    assert len(notes) == 1 and "wins over demo_overrides.train.max_train_steps" in notes[0]
    assert train_params(config, {"subject": "eva", "class_word": "woman"})["max_train_steps"] == 7
    real = dict(json.loads(json.dumps(repo_config)), base_model="/models/sd15.safetensors")
    assert keep_explicit_settings(real, {"train": {"max_train_steps": "7"}}) == []
