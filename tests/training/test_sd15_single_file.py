"""A trainer's own A1111 files, offline: a single-file SD1.5 checkpoint + a VAE .ckpt with no config folder and an
empty Hugging Face cache; wrong models named before any job runs; nested --config values typed by the schema."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from support import REPO_ROOT
from support.harness import run_snakemake
from support.sd15_checkpoint import write_sd15_checkpoint, write_vae_ckpt
from support.workdirs import make_workdir
from test_model_check import sd15_keys, write
from tifactory.demo.photos import make_demo_photos
from tifactory.training.embedding import load_embedding



@pytest.fixture(scope="module")
def dry_workdir(tmp_path_factory, repo_config, tiny_overrides):
    return make_workdir(tmp_path_factory.mktemp("dag"), repo_config, tiny_overrides)


# ----------------------------------------------------------------------------- item 9: --config types

@pytest.mark.slow
def test_nested_command_line_values_get_the_schemas_types(dry_workdir):
    """Snakemake hands `train={max_train_steps: 5}` over as the string '5'; the schema saw "'5' is not of type
    'integer'". Now it is 5 (and merged into train: the other required keys are still there)."""
    result = run_snakemake(dry_workdir, "-n", "--config", "train={max_train_steps: 5, flip_aug: true, "
                       "learning_rate: 1e-3, compile: false}", "samples={seeds: [3, 4]}")
    assert "is not of type" not in result.stdout + result.stderr
    # the value really is typed: 0 now fails the schema's minimum (as a number), not its type
    failed = run_snakemake(dry_workdir, "-n", "--config", "train={max_train_steps: 0}", check=False)
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert "0 is less than the minimum of 1" in output and "is not of type" not in output
    # text that is no number still gets the schema's type message
    worse = run_snakemake(dry_workdir, "-n", "--config", "train={max_train_steps: many}", check=False)
    assert worse.returncode != 0 and "'many' is not of type 'integer'" in worse.stdout + worse.stderr


def test_coerce_to_schema_unit():
    from tifactory.configuration import coerce_to_schema

    with open(REPO_ROOT / "config.yaml", encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    expected = {key: value for key, value in config["train"].items()}
    config["train"].update(max_train_steps="5", learning_rate="1e-3", flip_aug="true", compile="false",
                           init_word="5", seed="x", lr_scheduler="cosine")
    config["samples"]["seeds"] = ["1", "2"]
    config["demo_overrides"]["train"]["max_train_steps"] = "7"
    config["collect"]["near_duplicate_distance"] = "-1"
    coerce_to_schema(config)
    train = config["train"]
    assert (train["max_train_steps"], train["learning_rate"], train["flip_aug"], train["compile"]) == (5, 0.001, True,
                                                                                                       False)
    assert train["init_word"] == "5" and train["seed"] == "x" and train["lr_scheduler"] == "cosine"
    assert config["samples"]["seeds"] == [1, 2] and config["demo_overrides"]["train"]["max_train_steps"] == 7
    assert config["collect"]["near_duplicate_distance"] == -1
    assert train["weight_decay"] == expected["weight_decay"]  # typed values untouched


# ----------------------------------------------------------------------------- item 3: wrong models at DAG time

@pytest.mark.slow
def test_wrong_base_model_is_named_before_any_job(dry_workdir, tmp_path):
    xl = write(tmp_path / "sd_xl_base_1.0.safetensors",
               {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
                "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)})
    result = run_snakemake(dry_workdir, "-n", "--config", f"base_model={xl}", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert (f"model settings in the config are not usable:\n  base_model: {xl} is an SDXL checkpoint without its "
            "OpenCLIP bigG text encoder (conditioner.embedders.1.model.* keys)") in output

    missing = tmp_path / "v1-5-pruned-emaonly.safetensors"
    good = write(tmp_path / "good.safetensors", sd15_keys())
    result = run_snakemake(dry_workdir, "-n", "--config", f"base_model={good}", f"vae={missing}", check=False)
    assert result.returncode != 0 and f"vae: {missing} does not exist" in result.stdout + result.stderr
    planned = run_snakemake(dry_workdir, "-n", "--config", f"base_model={good}")
    assert "rule train:" in planned.stdout


# ----------------------------------------------------------------------------- items 1, 2, 5 end to end

@pytest.mark.slow
def test_a1111_checkpoint_and_vae_ckpt_train_offline(tmp_path, repo_config):
    """SD1.5's full architecture (random weights) as an fp16 single file in the original key layout, plus a VAE
    .ckpt and an eval model, trained 2 steps through Snakemake with HF_HUB_OFFLINE=1 and an empty HF_HOME, no
    base_model_config. The subject `astro` is a CLIP word: it trains under `astro-ti…`, said at DAG time."""
    models = tmp_path / "models"
    checkpoint = write_sd15_checkpoint(models / "Stable-diffusion" / "v1-5-pruned-emaonly.safetensors",
                                       dtype=torch.float16)
    vae = write_vae_ckpt(models / "VAE" / "vae-ft-mse-840000-ema-pruned.ckpt")
    keys = json.loads(checkpoint.read_bytes()[8:8 + int.from_bytes(checkpoint.read_bytes()[:8], "little")])
    assert {entry["dtype"] for name, entry in keys.items() if name != "__metadata__"} <= {"F16", "I64"}
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)

    work = tmp_path / "work"
    photos = make_demo_photos("astronaut", tmp_path / "all_photos")
    (work / "photos").mkdir(parents=True)
    for photo in photos[:2]:
        (work / "photos" / photo.name).write_bytes(photo.read_bytes())
    (work / "roster.tsv").write_text("subject\tclass_word\tsources\nastro\twoman\tphotos\n")
    (work / "prompts.txt").write_text("a photo of {token}\n")
    config = json.loads(json.dumps(repo_config))
    config.update(roster="roster.tsv", base_model=str(checkpoint), base_model_config="", vae=str(vae),
                  eval_models=[{"name": "same", "path": str(checkpoint), "vae": str(vae)}])
    config["dataset"]["repeats"] = 1
    config["train"].update(max_train_steps=2, save_every_n_steps=1, gradient_accumulation_steps=1,
                           micro_batch_size=1, resolution=256, device="cpu", compile=False)
    config["samples"].update(prompts="prompts.txt", seeds=[1], steps=1, width=64, height=64, device="cpu")
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    hf_home = tmp_path / "empty-hf-home"
    hf_home.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), TRANSFORMERS_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    planned = run_snakemake(work, "-n", env=env)
    assert "note: 1 subject name(s) are words of the tokenizer" in planned.stderr and "astro -> astro-ti" in planned.stderr

    run_snakemake(work, "results/astro/astro-ti.safetensors", "results/astro/samples/grid.png",
                  "results/astro/samples/eval/same/grid.png", env=env, timeout=3000)
    vectors, metadata = load_embedding(work / "results" / "astro" / "astro-ti.safetensors")
    assert tuple(vectors.shape) == (5, 768) and torch.isfinite(vectors.float()).all()
    assert json.loads(metadata["tifactory.training_tokens"]) == ["astro-ti"] + [f"astro-ti{i}" for i in range(1, 5)]
    assert metadata["tifactory.base_model"] == "v1-5-pruned-emaonly.safetensors"
    log = (work / "logs" / "train" / "astro.log").read_text()
    assert "'astro' is already a word of the tokenizer" in log and "Traceback" not in log
    loss = (work / "results" / "astro" / "train" / "loss.tsv").read_text().splitlines()
    assert len(loss) == 3
    for grid in ("samples/grid.png", "samples/eval/same/grid.png"):
        assert (work / "results" / "astro" / grid).stat().st_size > 0
    assert not any(hf_home.rglob("*")), "nothing may be written to (or fetched into) the Hugging Face cache"
