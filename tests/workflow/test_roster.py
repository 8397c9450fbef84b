import copy

import pytest

from tifactory.roster import RosterError, list_source_files, read_roster, train_params



def write_roster(tmp_path, text):
    path = tmp_path / "roster.tsv"
    path.write_text(text)
    return path


def test_demo_roster_is_valid(repo_root):
    rows = read_roster(repo_root / "resources" / "roster.tsv")
    assert [row["subject"] for row in rows] == ["astronaut", "t1person", "sun"]
    assert {row["class_word"] for row in rows} <= {"woman", "man", "person"}
    by_subject = {row["subject"]: row for row in rows}
    assert by_subject["sun"]["prepared"] == "yes" and by_subject["astronaut"]["prepared"] == "no"


@pytest.mark.parametrize("row, expected", [
    ("../x\twoman\tphotos", "row 2 (subject '../x'), column 'subject'"),
    ("a/b\twoman\tphotos", "row 2 (subject 'a/b'), column 'subject'"),
    ("eva\tdog\tphotos", "row 2 (subject 'eva'), column 'class_word': 'dog' is not one of"),
    ("eva\twoman\t", "row 2 (subject 'eva'): 'sources' is a required property"),
    ("Eva\twoman\tphotos", "column 'subject'"),
])
def test_bad_row_names_row_and_column(tmp_path, row, expected):
    path = write_roster(tmp_path, f"subject\tclass_word\tsources\n{row}\n")
    with pytest.raises(RosterError) as error:
        read_roster(path)
    assert expected in str(error.value)
    assert str(path) in str(error.value)


def test_duplicate_subject_and_unknown_column(tmp_path):
    path = write_roster(tmp_path, "subject\tclass_word\tsources\tcolour\neva\twoman\tp\tred\neva\twoman\tq\t\n")
    with pytest.raises(RosterError) as error:
        read_roster(path)
    message = str(error.value)
    assert "row 3 (subject 'eva'), column 'subject': duplicate of row 2" in message
    assert "unknown column(s) ['colour']" in message


def test_override_types_are_checked_and_applied(tmp_path, repo_config):
    path = write_roster(tmp_path, "subject\tclass_word\tsources\tmax_train_steps\tinit_word\n"
                                  "eva\twoman\tp\t50\t\nbob\tman\tq\t\tface\n")
    eva, bob = read_roster(path)
    config = copy.deepcopy(repo_config)
    config["base_model"] = "/models/sd15"  # not the demo: the published recipe applies
    assert train_params(config, eva)["max_train_steps"] == 50
    assert train_params(config, eva)["init_word"] == "woman"
    assert train_params(config, bob)["max_train_steps"] == config["train"]["max_train_steps"] == 1000
    assert train_params(config, bob)["init_word"] == "face"
    bad = write_roster(tmp_path, "subject\tclass_word\tsources\tmax_train_steps\neva\twoman\tp\tmany\n")
    with pytest.raises(RosterError, match="column 'max_train_steps': 'many' is not of type 'integer'"):
        read_roster(bad)


def test_demo_overrides_apply_only_to_demo_model(repo_config):
    row = {"subject": "eva", "class_word": "woman", "sources": "x"}
    demo = train_params(repo_config, row)
    assert demo["max_train_steps"] == repo_config["demo_overrides"]["train"]["max_train_steps"]
    real = dict(repo_config, base_model="/models/sd15.safetensors")
    assert train_params(real, row)["max_train_steps"] == 1000


def test_published_recipe_defaults(repo_config):
    recipe = repo_config["train"]
    assert (recipe["num_vectors"], recipe["learning_rate"], recipe["lr_scheduler"]) == (5, 0.005, "constant")
    assert (recipe["train_batch_size"], recipe["gradient_accumulation_steps"]) == (1, 15)
    assert (recipe["max_train_steps"], recipe["save_every_n_steps"], recipe["seed"]) == (1000, 200, 1234)
    assert (recipe["mixed_precision"], recipe["save_precision"]) == ("bf16", "bf16")
    assert recipe["cache_latents"] and recipe["template"] == "object" and recipe["noise_offset"] == 0
    assert (recipe["min_bucket_reso"], recipe["max_bucket_reso"], recipe["bucket_reso_steps"]) == (256, 2048, 64)
    assert recipe["bucket_no_upscale"] and recipe["init_word"] == ""


def test_list_source_files_folders_globs_and_missing(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "1.jpg").write_bytes(b"x")
    (tmp_path / "a" / "sub" / "2.png").write_bytes(b"x")
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"x")
    found = list_source_files(f"{tmp_path}/a;{tmp_path}/*.jpg;{tmp_path}/missing")
    assert found == sorted([f"{tmp_path}/a/1.jpg", f"{tmp_path}/a/sub/2.png", f"{tmp_path}/b.jpg"])


def test_optional_reference_column_for_the_identity_filter(tmp_path, repo_config):
    path = write_roster(tmp_path, "subject\tclass_word\tsources\treference\n"
                                  "eva\twoman\tphotos/eva\trefs/eva;refs/eva_*.jpg\nbob\tman\tphotos/bob\t\n")
    eva, bob = read_roster(path)
    assert eva["reference"] == "refs/eva;refs/eva_*.jpg" and "reference" not in bob
    assert "reference" not in train_params(repo_config, eva)  # a crop-stage input, not a recipe key


def test_list_source_files_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    assert list_source_files("~/photos") == [str(tmp_path / "photos" / "a.jpg")]
