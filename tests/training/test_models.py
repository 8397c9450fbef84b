"""Loading base models: diffusers folder, original single files (offline), VAE overrides, safety, fingerprints."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import types

import pytest
import torch

from tifactory.families.sd15 import SD15
from tifactory.fileio import sha256_file
from support.models import load_sd15
from tifactory.families.base import Components
from tifactory.families.loading import ModelLoadError, model_fingerprint
from tifactory.demo.tinymodel import save_single_file, vae_diffusers_to_ldm
from support.pickles import Exploit


@pytest.fixture(scope="module")
def folder_components(tiny_model_dir) -> Components:
    return load_sd15(tiny_model_dir)


@pytest.fixture(scope="module")
def single_files(tiny_model_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("single")
    return {
        suffix: save_single_file(tiny_model_dir, root / f"tiny{suffix}") for suffix in (".safetensors", ".ckpt")
    }


def assert_same_weights(module, reference):
    ours, theirs = module.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def assert_float32_cpu(module):
    for tensor in module.state_dict().values():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"


# ----------------------------------------------------------------------------- folder

def test_folder_components(folder_components):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    c = folder_components
    assert isinstance(c.tokenizer, CLIPTokenizer)
    assert isinstance(c.text_encoder, CLIPTextModel)
    assert isinstance(c.vae, AutoencoderKL)
    assert isinstance(c.unet, UNet2DConditionModel)
    assert isinstance(c.noise_scheduler, DDPMScheduler)
    for module in (c.text_encoder, c.vae, c.unet):
        assert_float32_cpu(module)
    assert c.text_encoder.get_input_embeddings().weight.shape == (len(c.tokenizer), 768)
    config = c.noise_scheduler.config
    assert config.beta_schedule == "scaled_linear"
    assert (config.beta_start, config.beta_end, config.num_train_timesteps) == (0.00085, 0.012, 1000)
    assert config.prediction_type == "epsilon" and config.clip_sample is False
    assert c.noise_scheduler.alphas_cumprod.shape == (1000,)


def test_folder_missing_parts_and_bad_paths(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_sd15(tmp_path / "nope")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(ModelLoadError, match=r"missing sub-folder\(s\) \['unet'\]"):
        load_sd15(partial)
    weird = tmp_path / "model.bin"
    weird.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unsupported extension '.bin'"):
        load_sd15(weird)


# ----------------------------------------------------------------------------- single files

@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_equals_folder(single_files, tiny_model_dir, folder_components, suffix):
    c = load_sd15(single_files[suffix], config_dir=tiny_model_dir)
    for name in ("text_encoder", "vae", "unet"):
        assert_same_weights(getattr(c, name), getattr(folder_components, name))
        assert_float32_cpu(getattr(c, name))
        assert not getattr(c, name).training
    assert c.tokenizer.get_vocab() == folder_components.tokenizer.get_vocab()
    assert dict(c.noise_scheduler.config) == dict(folder_components.noise_scheduler.config)
    with torch.no_grad():  # the assigned (not meta) modules run
        ids = c.tokenizer("a photo of a woman", return_tensors="pt").input_ids
        assert torch.equal(c.text_encoder(ids)[0], folder_components.text_encoder(ids)[0])


def test_fp16_single_file_loads_as_float32(tiny_model_dir, tmp_path, folder_components):
    path = save_single_file(tiny_model_dir, tmp_path / "half.safetensors", dtype=torch.float16)
    c = load_sd15(path, config_dir=tiny_model_dir)
    assert_float32_cpu(c.unet)
    reference = folder_components.unet.state_dict()
    for key, tensor in c.unet.state_dict().items():
        assert torch.equal(tensor, reference[key].half().float()), key


def test_full_checkpoint_with_ema_weights_loads_the_trained_ones(tiny_model_dir, tmp_path, folder_components):
    """A 'full' (non-pruned) checkpoint also carries model_ema.* copies (A1111 spells them without dots) and
    training metadata; like A1111 and kohya, the model.diffusion_model.* weights are the ones loaded."""
    plain = save_single_file(tiny_model_dir, tmp_path / "plain.ckpt")
    state = torch.load(plain, weights_only=True)["state_dict"]
    ema = {"model_ema." + key.removeprefix("model.").replace(".", ""): tensor + 1.0
           for key, tensor in state.items() if key.startswith("model.diffusion_model.")}
    full = tmp_path / "v1-5-pruned.ckpt"
    torch.save({"state_dict": {**state, **ema, "model_ema.decay": torch.tensor(0.9999),
                               "model_ema.num_updates": torch.tensor(840000)}, "global_step": 840000}, full)
    from tifactory.training.model_check import check_base_model

    assert check_base_model(str(full)) == []
    c = load_sd15(full, config_dir=tiny_model_dir)
    assert_same_weights(c.unet, folder_components.unet)


def test_single_file_without_config_is_described_by_the_shipped_sd15_configs(single_files, tmp_path, monkeypatch):
    """No config_dir: the shipped SD1.5 configs describe the file (the tiny model is not SD1.5-sized, so its
    weights are named as not matching them), and no Hugging Face cache is consulted."""
    from tifactory.training import sd15

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="do not match the architecture described by the configs in") as info:
        load_sd15(single_files[".safetensors"])
    assert str(sd15.SD15_DIR) in str(info.value)
    assert SD15().resolve_config_dir("", single_files[".ckpt"]) == sd15.SD15_DIR
    monkeypatch.setattr(sd15, "SD15_DIR", tmp_path / "nowhere")  # an install without resources/
    with pytest.raises(ModelLoadError, match="shipped SD1.5 configs are incomplete"):
        load_sd15(single_files[".safetensors"])


def test_incomplete_or_mismatched_config_dir(single_files, tiny_model_dir, tmp_path):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_model_dir, incomplete, ignore=shutil.ignore_patterns("tokenizer", "*.safetensors"))
    with pytest.raises(ModelLoadError, match=r"config_dir .* missing \['tokenizer'\]"):
        load_sd15(single_files[".safetensors"], config_dir=incomplete)

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other, ignore=shutil.ignore_patterns("*.safetensors"))
    unet_config = json.loads((other / "unet/config.json").read_text())
    unet_config["layers_per_block"] = 2
    (other / "unet/config.json").write_text(json.dumps(unet_config))
    with pytest.raises(ModelLoadError, match="UNet weights .* do not match the architecture"):
        load_sd15(single_files[".safetensors"], config_dir=other)


def test_config_dir_needs_only_configs(single_files, tiny_model_dir, tmp_path, folder_components):
    configs_only = tmp_path / "configs"
    shutil.copytree(tiny_model_dir, configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
    c = load_sd15(single_files[".ckpt"], config_dir=configs_only)
    assert_same_weights(c.unet, folder_components.unet)


def test_not_an_sd1_checkpoint(tmp_path, tiny_model_dir):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(path))
    with pytest.raises(ModelLoadError, match="is a LoRA/LyCORIS network, not a full model"):
        load_sd15(path, config_dir=tiny_model_dir)
    sd2 = tmp_path / "sd2.safetensors"
    save_file({"model.diffusion_model.x": torch.ones(1), "cond_stage_model.model.token_embedding.weight": torch.ones(1)},
              str(sd2))
    with pytest.raises(ModelLoadError, match="2.x"):
        load_sd15(sd2, config_dir=tiny_model_dir)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read safetensors"):
        load_sd15(broken, config_dir=tiny_model_dir)


# ----------------------------------------------------------------------------- pickle safety

@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_code_executing_pickle_is_refused(tmp_path, tiny_model_dir, writer, suffix):
    marker = tmp_path / "pwned"
    payload = {"evil": Exploit(f"touch {marker}"), "state_dict": {"model.diffusion_model.x": torch.ones(1)}}
    path = tmp_path / f"evil{suffix}"
    if writer == "torch.save":
        torch.save(payload, path)
    else:  # a bare pickle (no torch zip container), protocol 2 like torch's own
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    with pytest.raises(ModelLoadError, match="refusing to load .*posix.system"):
        load_sd15(path, config_dir=tiny_model_dir)
    with pytest.raises(ModelLoadError, match="refusing to load"):
        load_sd15(tiny_model_dir, vae=path)
    assert not marker.exists()
    if writer == "pickle.dump" and suffix == ".ckpt":  # control: the payload is live when unpickled freely
        with open(path, "rb") as handle:
            pickle.load(handle)
        assert marker.exists()


def test_corrupt_ckpt_is_a_load_error(tmp_path, single_files, tiny_model_dir):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(single_files[".ckpt"].read_bytes()[:100_000])
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_sd15(truncated, config_dir=tiny_model_dir)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ModelLoadError, match="truncated|refusing to load|cannot read"):
        load_sd15(garbage, config_dir=tiny_model_dir)


def test_lightning_callback_metadata_is_tolerated(monkeypatch, tmp_path, single_files, tiny_model_dir,
                                                  folder_components):
    """Old SD1.x .ckpt files key ckpt["callbacks"] by Lightning's ModelCheckpoint class."""
    module_name = "pytorch_lightning.callbacks.model_checkpoint"
    fake = types.ModuleType(module_name)

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = module_name
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    for name in ["pytorch_lightning", "pytorch_lightning.callbacks", module_name]:
        monkeypatch.setitem(sys.modules, name, fake if name == module_name else types.ModuleType(name))
    state = torch.load(single_files[".ckpt"], weights_only=True)["state_dict"]
    path = tmp_path / "lightning.ckpt"
    torch.save({"epoch": 6, "global_step": 840000, "state_dict": state,
                "callbacks": {ModelCheckpoint: {"best_model_score": None, "dirpath": "/logs"}}}, path)
    for name in ["pytorch_lightning", "pytorch_lightning.callbacks", module_name]:
        monkeypatch.delitem(sys.modules, name)  # loading must not need (or import) Lightning

    c = load_sd15(path, config_dir=tiny_model_dir)
    assert_same_weights(c.unet, folder_components.unet)
    assert module_name not in sys.modules


# ----------------------------------------------------------------------------- VAE override

def shifted_vae_state(folder_components) -> dict:
    """The tiny VAE's weights + 1, as an original-layout state dict with bare encoder./decoder. keys."""
    vae = folder_components.vae
    state = {key: tensor + 1.0 for key, tensor in vae.state_dict().items()}
    ldm = vae_diffusers_to_ldm(state, vae.config)
    return {key.removeprefix("first_stage_model."): tensor.contiguous() for key, tensor in ldm.items()}


@pytest.mark.parametrize("layout", ["bare.ckpt", "bare.safetensors", "first_stage_model.ckpt"])
def test_vae_override_from_single_file(tmp_path, tiny_model_dir, folder_components, layout):
    from safetensors.torch import save_file

    bare = shifted_vae_state(folder_components)
    extras = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2, 2),
              "model_ema.decay": torch.tensor(0.9999)}
    if layout.startswith("first_stage_model"):
        state = {f"first_stage_model.{key}": tensor for key, tensor in bare.items()}
        state["model.diffusion_model.whatever"] = torch.ones(1)  # as in a full checkpoint
    else:
        state = dict(bare)
    state.update(extras)
    path = tmp_path / f"vae-{layout}"
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)

    c = load_sd15(tiny_model_dir, vae=path)
    expected = {key: tensor + 1.0 for key, tensor in folder_components.vae.state_dict().items()}
    ours = c.vae.state_dict()
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[key], expected[key]) for key in expected)
    assert_float32_cpu(c.vae)
    assert_same_weights(c.unet, folder_components.unet)  # the rest is untouched


def test_vae_override_on_single_file_base(tmp_path, single_files, tiny_model_dir, folder_components):
    path = tmp_path / "vae.safetensors"
    from safetensors.torch import save_file

    save_file(shifted_vae_state(folder_components), str(path))
    c = load_sd15(single_files[".safetensors"], vae=path, config_dir=tiny_model_dir)
    reference = folder_components.vae.state_dict()
    assert all(torch.equal(t, reference[k] + 1.0) for k, t in c.vae.state_dict().items())


def test_vae_override_from_folders(tiny_model_dir, folder_components, tmp_path):
    for vae in (tiny_model_dir / "vae", tiny_model_dir):
        c = load_sd15(tiny_model_dir, vae=vae)
        assert_same_weights(c.vae, folder_components.vae)
    with pytest.raises(ModelLoadError, match="VAE not found"):
        load_sd15(tiny_model_dir, vae=tmp_path / "missing.ckpt")
    not_vae = tmp_path / "not_vae.safetensors"
    from safetensors.torch import save_file

    save_file({"something.else": torch.ones(1)}, str(not_vae))
    with pytest.raises(ModelLoadError, match="no VAE weights"):
        load_sd15(tiny_model_dir, vae=not_vae)


# ----------------------------------------------------------------------------- fingerprint

def test_fingerprint(tiny_model_dir, single_files, tmp_path):
    assert model_fingerprint(single_files[".ckpt"]) == sha256_file(single_files[".ckpt"])
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    first = model_fingerprint(copy)
    assert first == model_fingerprint(tiny_model_dir) == model_fingerprint(str(copy))
    assert len(first) == 64 and int(first, 16) >= 0

    (copy / ".cache").mkdir()
    (copy / ".cache" / "download.json").write_text("{}")
    (copy / "README.md").write_text("notes")
    assert model_fingerprint(copy) == first  # hidden entries and non-model files do not count

    config = json.loads((copy / "scheduler/scheduler_config.json").read_text())
    config["steps_offset"] = 0
    (copy / "scheduler/scheduler_config.json").write_text(json.dumps(config))
    second = model_fingerprint(copy)
    assert second != first

    shutil.move(copy / "vae", copy / "vae2")  # renames count, contents unchanged
    assert model_fingerprint(copy) != second

    with pytest.raises(ModelLoadError, match="no such file"):
        model_fingerprint(tmp_path / "missing")
