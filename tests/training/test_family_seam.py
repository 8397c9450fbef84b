"""The model-family seam (docs/model-families.md) must not change SD1.5's results.

A fixed tiny CPU run (the tiny random SD1.5 model of the test fixtures, two crops of the astronaut photo in two
buckets, 4 steps x 3 samples, seed fixed) writes the same embedding as it did before the seam was built: the
same tensor bytes, and the same metadata apart from what names the machine's software (package versions, git
commit) and the base model's file hash (which also covers diffusers' version string in the model's configs).
The hashes below were recorded on main's code before the move (commit fe13cd7), torch 2.x on x86-64 CPU, with
two intra-op threads: the run pins that count, because a sum split over another number of threads rounds
differently (under pytest-xdist each worker is otherwise given cores/workers threads).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from support.datasets import astronaut_dataset

# sha256 of the final embedding's raw tensor bytes (bf16, little-endian) and of its stable metadata
FINAL_TENSOR_SHA256 = "7afea20505ec7fe1771a2ba3998ef64ca081c497d5c6f0d5a08e0de398e61930"
CHECKPOINT_TENSOR_SHA256 = "dbae44950987f76fb786af1887f00f96702eb5f047a7dc04082b6fa83d7530aa"
STABLE_METADATA_SHA256 = "6122ab0e3f5f4c4a01fff035fb6a80e62e09017a829410d16ca4f9f687121b01"
RECORDED_THREADS = 2
VOLATILE_METADATA = ("tifactory.package_versions", "tifactory.git_commit", "tifactory.base_model_sha256")

RECIPE = {
    "num_vectors": 5, "init_word": "woman", "template": "object", "optimizer": "AdamW", "learning_rate": 0.005,
    "lr_scheduler": "constant", "lr_warmup_steps": 0, "adam_beta1": 0.9, "adam_beta2": 0.999,
    "adam_epsilon": 1.0e-08, "weight_decay": 0.01, "max_grad_norm": 0.0, "train_batch_size": 1,
    "gradient_accumulation_steps": 3, "micro_batch_size": 3, "max_train_steps": 4, "mixed_precision": "bf16",
    "autocast": False, "save_precision": "bf16", "seed": 1234, "cache_latents": True, "flip_aug": False,
    "resolution": 128, "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 2048,
    "bucket_reso_steps": 64, "bucket_no_upscale": True, "noise_offset": 0.0, "min_snr_gamma": 0.0,
    "attention": "sdpa", "compile": "auto", "compile_scope": "model", "save_every_n_steps": 2, "device": "cpu",
    "gradient_checkpointing": False,  # not recorded in the metadata (TrainSettings.NOT_RECORDED)
}


@pytest.fixture(scope="module")
def seam_dataset(tmp_path_factory):
    """Two crops of the astronaut photo, one square and one portrait: two buckets."""
    bucket = {key: RECIPE[key] for key in ("enable_bucket", "min_bucket_reso", "max_bucket_reso",
                                           "bucket_reso_steps", "bucket_no_upscale")}
    return astronaut_dataset(tmp_path_factory.mktemp("seam"), [((100, 0, 356, 256), (128, 128)),
                                                               ((120, 10, 312, 266), (96, 128))],
                             resolution=RECIPE["resolution"], bucket=bucket)


def tensor_sha256(path) -> str:
    """sha256 of the file's tensors: each name, dtype, shape and raw bytes, in name order."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as handle:
        for key in sorted(handle.keys()):
            tensor = handle.get_tensor(key).contiguous()
            digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)}\n".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stable_metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    return {key: value for key, value in sorted(metadata.items()) if key not in VOLATILE_METADATA}


def run_fixed(tmp_path, seam_dataset, tiny_model_dir, monkeypatch):
    import torch

    from tifactory.families import ModelSpec
    from tifactory.training.settings import TrainSettings
    from tifactory.training.train import train_embedding

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")  # 2026-01-01
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(RECORDED_THREADS)
    try:
        train_embedding(dataset_toml=seam_dataset, model=ModelSpec(path=tiny_model_dir, family="sd15"),
                        subject="eva",
                        settings=TrainSettings.from_config(RECIPE),
                        final_path=out / "eva-ti.safetensors", checkpoint_dir=out / "checkpoints",
                        loss_tsv=out / "loss.tsv", state_dir=out / "state", log=lambda message: None)
    finally:
        torch.set_num_threads(threads)
    return out


def test_sd15_embedding_unchanged_by_the_seam(tmp_path, seam_dataset, tiny_model_dir, monkeypatch):
    from tifactory.families.loading import model_fingerprint

    out = run_fixed(tmp_path, seam_dataset, tiny_model_dir, monkeypatch)
    final = out / "eva-ti.safetensors"
    metadata = stable_metadata(final)
    assert tensor_sha256(final) == FINAL_TENSOR_SHA256
    assert tensor_sha256(out / "checkpoints" / "eva-ti-step00000002.safetensors") == CHECKPOINT_TENSOR_SHA256
    assert hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest() == STABLE_METADATA_SHA256
    from safetensors import safe_open

    with safe_open(str(final), framework="pt") as handle:
        assert handle.metadata()["tifactory.base_model_sha256"] == model_fingerprint(tiny_model_dir)


# --------------------------------------------------------------------------------------------- the seam's API

def test_model_spec_travels_as_params_and_names_its_family(tiny_model_dir):
    from tifactory.families import FamilyError, ModelSpec, family_named

    spec = ModelSpec(path=tiny_model_dir, family="sd15")  # a Path is kept as its string
    assert spec.path == str(tiny_model_dir) and spec.name == tiny_model_dir.name
    assert spec.as_params() == {"path": str(tiny_model_dir), "family": "sd15", "config_dir": "", "vae": ""}
    assert ModelSpec.from_params(spec.as_params()) == spec and hash(ModelSpec.from_params(spec.as_params()))
    with pytest.raises(FamilyError, match="unknown model family 'sd3'"):
        ModelSpec(path="m.safetensors", family="sd3")
    with pytest.raises(FamilyError, match="unknown field"):
        ModelSpec.from_params({"path": "m", "family": "sd15", "base_model": "m"})
    with pytest.raises(FamilyError, match="unknown model family"):
        family_named("sd3")
    family = family_named("sd15")
    assert (family.name, family.native_resolution, family.latent_scale) == ("sd15", 512, 0.18215)
    assert family.architecture == "stable-diffusion-v1/textual-inversion"


def test_model_check_answers_each_models_family(tiny_model_dir, tmp_path):
    from tifactory.demo.tinymodel import save_single_file
    from tifactory.families import ModelSpec
    from tifactory.training.model_check import model_specs

    single = save_single_file(tiny_model_dir, tmp_path / "tiny.safetensors")
    config = {"base_model": str(single), "base_model_config": str(tiny_model_dir), "vae": "",
              "eval_models": [{"name": "folder", "path": str(tiny_model_dir)}]}
    specs, problems = model_specs(config, demo_model_dir="resources/models/demo-tiny")
    assert problems == []
    assert specs == {"base": ModelSpec(path=str(single), family="sd15", config_dir=str(tiny_model_dir)),
                     "folder": ModelSpec(path=str(tiny_model_dir), family="sd15")}
    demo, _ = model_specs(dict(config, base_model="demo-tiny", eval_models=[]), demo_model_dir="models/demo")
    assert demo == {"base": ModelSpec(path="models/demo", family="sd15")}
    missing, problems = model_specs(dict(config, base_model=str(tmp_path / "nope.safetensors")),
                                    demo_model_dir="models/demo")
    assert "base" not in missing and problems == [f"base_model: {tmp_path / 'nope.safetensors'} does not exist"]


def test_sd15_family_file_tensors_and_text_side(tiny_model_dir):
    import torch

    from support.models import load_sd15
    from tifactory.families import family_named
    from tifactory.training.embedding import EMBEDDING_KEY

    family = family_named("sd15")
    components = load_sd15(tiny_model_dir)
    assert len(components.tokenizers) == len(components.text_encoders) == 1
    vectors = family.add_placeholders(components, ["zqx", "zqx1"], "woman", lambda message: None)
    assert len(vectors) == 1 and vectors[0].shape == (2, 768) and vectors[0].requires_grad
    assert family.placeholder_vectors(components)[0] is vectors[0]
    assert list(family.embedding_tensors(vectors)) == [EMBEDDING_KEY]
    ids = family.tokenize(components, ["a photo of zqx zqx1"])
    conditioning = family.extra_conditioning(family.encode_text(components, ids), None)
    assert conditioning.hidden_states.shape == (1, 77, 768) and conditioning.pooled is None
    latents = torch.zeros(1, 4, 8, 8)
    with torch.no_grad():
        assert family.predict_noise(components.unet, latents, torch.tensor([10]), conditioning).shape == latents.shape
