"""DAG-time model checks (tifactory.training.model_check): one clear message per wrong base model, VAE or eval model."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tifactory.training import model_check
from tifactory.training.model_check import check_base_model, check_config_dir, check_models, check_vae
from support.pickles import Exploit

UNET = "model.diffusion_model."
ONLY = ("tifactory trains textual inversions for SD1.5 and SDXL (base and finetunes such as Pony or Illustrious), "
        "epsilon prediction")
TEXT = "cond_stage_model.transformer.text_model."


def sd15_keys(**changes) -> dict:
    """The keys (and decisive shapes) of an original-layout SD1.5 checkpoint, tensors kept small."""
    state = {
        UNET + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
        UNET + "out.2.weight": torch.zeros(4, 320, 3, 3),
        TEXT + "embeddings.token_embedding.weight": torch.zeros(4, 768),
        TEXT + "final_layer_norm.weight": torch.zeros(768),
        "first_stage_model.encoder.conv_out.weight": torch.zeros(8, 4, 3, 3),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
    }
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    return state


def write(path, state, metadata=None):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    else:
        torch.save({"state_dict": state, "global_step": 840000}, path)
    return str(path)


@pytest.fixture(params=[".safetensors", ".ckpt"])
def suffix(request):
    return request.param


def only(problems: list[str]) -> str:
    assert len(problems) == 1, problems
    return problems[0]


# ----------------------------------------------------------------------------- base model, single files

def test_sd15_checkpoint_passes(tmp_path, suffix):
    path = write(tmp_path / f"v1-5{suffix}", sd15_keys())
    assert check_base_model(path) == []
    shapes = model_check.inspect_file(path).shapes
    assert shapes[UNET + "input_blocks.0.0.weight"] == (320, 4, 3, 3) and len(shapes) == 7


def test_missing_path(tmp_path):
    assert only(check_base_model(str(tmp_path / "nope.safetensors"))) == (
        f"base_model: {tmp_path / 'nope.safetensors'} does not exist")


def test_embedding_is_not_a_model(tmp_path, suffix):
    path = write(tmp_path / f"evagreen-ti{suffix}", {"emb_params": torch.zeros(5, 768)})
    message = only(check_base_model(path))
    assert message.startswith(f"base_model: {path} is a textual-inversion embedding, not a full model")
    assert "emb_params" in message and "v1-5-pruned-emaonly.safetensors" in message


def test_a1111_pt_embedding_is_not_a_model(tmp_path):
    path = tmp_path / "old-embedding.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 768)}, "name": "x",
                "step": 100}, path)
    assert "is a textual-inversion embedding, not a full model" in only(check_base_model(str(path)))


def test_lora_is_not_a_model(tmp_path, suffix):
    path = write(tmp_path / f"style{suffix}", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.ones(())})
    message = only(check_base_model(path))
    assert message.startswith(f"base_model: {path} is a LoRA/LyCORIS network, not a full model")


def test_vae_as_base_model_points_to_the_vae_key(tmp_path):
    path = write(tmp_path / "vae.safetensors", {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
                                                 "decoder.conv_out.weight": torch.zeros(3, 4, 3, 3)})
    assert only(check_base_model(path)).endswith("a VAE goes in the config key vae")


def test_sd2_openclip_checkpoint(tmp_path, suffix):
    state = sd15_keys(**{f"{TEXT}embeddings.token_embedding.weight": None})
    state = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    state[UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(320, 1024)
    state["cond_stage_model.model.token_embedding.weight"] = torch.zeros(4, 1024)
    path = write(tmp_path / f"v2-1_512-ema-pruned{suffix}", state)
    assert only(check_base_model(path)) == (
        f"base_model: {path} is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder cond_stage_model.model.*, "
        "1024 wide); " + ONLY)


def test_1024_wide_cross_attention_alone_is_named(tmp_path):
    state = sd15_keys(**{UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)})
    message = only(check_base_model(write(tmp_path / "odd.safetensors", state)))
    assert "an SD 2.x checkpoint (UNet cross-attention 1024 wide, SD1.5's is 768); " + ONLY in message


def test_sdxl_checkpoint(tmp_path, suffix):
    state = {UNET + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
             UNET + "label_emb.0.0.weight": torch.zeros(8, 2816),
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
             "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1280)}
    path = write(tmp_path / f"sd_xl_base_1.0{suffix}", state)  # SDXL is accepted (tests/training/test_model_family.py)
    assert only(check_base_model(path)) == (
        f"base_model: {path} has no VAE weights (first_stage_model.*); set vae to a VAE file or folder")
    assert check_base_model(path, has_vae_override=True) == []


def test_inpainting_checkpoint(tmp_path, suffix):
    path = write(tmp_path / f"sd-v1-5-inpainting{suffix}",
                 sd15_keys(**{UNET + "input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}))
    assert only(check_base_model(path)) == (
        f"base_model: {path} is an inpainting checkpoint (UNet with 9 input channels, SD1.5's has 4); "
        + ONLY)


def test_v_prediction_checkpoint(tmp_path, suffix):
    marked = write(tmp_path / f"vpred{suffix}", sd15_keys(v_pred=torch.zeros(())))
    assert "is a v-prediction checkpoint (it has a v_pred key); " + ONLY in only(check_base_model(marked))

    plain = write(tmp_path / f"with-yaml{suffix}", sd15_keys())
    (tmp_path / "with-yaml.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n    linear_start: 0.00085\n")
    assert "(with-yaml.yaml beside it says parameterization: v); " + ONLY in only(check_base_model(plain))
    (tmp_path / "with-yaml.yaml").write_text("model:\n  params:\n    parameterization: \"eps\"\n")
    assert check_base_model(plain) == []


def test_v_prediction_metadata(tmp_path):
    path = write(tmp_path / "meta.safetensors", sd15_keys(), metadata={"modelspec.prediction_type": "v"})
    assert "v-prediction checkpoint (metadata modelspec.prediction_type = v)" in only(check_base_model(path))


def test_base_without_vae_needs_the_vae_key(tmp_path, suffix):
    state = {k: v for k, v in sd15_keys().items() if not k.startswith("first_stage_model.")}
    path = write(tmp_path / f"novae{suffix}", state)
    assert "has no VAE weights (first_stage_model.*); set vae" in only(check_base_model(path))
    assert check_base_model(path, has_vae_override=True) == []


def test_unreadable_files(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert "is not a safetensors file" in only(check_base_model(str(broken)))
    truncated = tmp_path / "truncated.ckpt"
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": sd15_keys()}, full)
    truncated.write_bytes(full.read_bytes()[:300])
    assert only(check_base_model(str(truncated))).startswith("base_model: ")
    weird = tmp_path / "model.bin"
    weird.write_bytes(b"x")
    assert "unsupported extension '.bin'" in only(check_base_model(str(weird)))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_in_a_pickle_is_named_and_never_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"evil": Exploit(f"touch {marker}"), "state_dict": sd15_keys()}
    path = tmp_path / "evil.ckpt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump({"evil": Exploit(f"touch {marker}")}, handle, protocol=2)
    message = only(check_base_model(str(path)))
    assert not marker.exists()
    assert message == (f"base_model: {path} is a pickle that names code beyond tensors (posix.system); it is not "
                       "loaded (it could run code). Convert it to .safetensors in an environment you trust")
    assert "posix.system" in only(check_vae(str(path)))


def test_lightning_metadata_in_a_ckpt_is_fine(tmp_path, monkeypatch):
    """The Lightning callback class old SD checkpoints reference is inert metadata (as in the loader)."""
    import types

    module_name = "pytorch_lightning.callbacks.model_checkpoint"
    fake = types.ModuleType(module_name)

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module_name, "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module_name]
    for name in names:
        monkeypatch.setitem(sys.modules, name, fake if name == module_name else types.ModuleType(name))
    torch.save({"state_dict": sd15_keys(), "callbacks": {ModelCheckpoint: {"dirpath": "/logs"}}},
               tmp_path / "lightning.ckpt")
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    assert check_base_model(str(tmp_path / "lightning.ckpt")) == []


# ----------------------------------------------------------------------------- folders, config dir, VAE

def test_diffusers_folders(tiny_model_dir, tmp_path):
    assert check_base_model(str(tiny_model_dir)) == []
    inpaint = tmp_path / "inpaint"
    shutil.copytree(tiny_model_dir, inpaint, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((inpaint / "unet/config.json").read_text())
    (inpaint / "unet/config.json").write_text(json.dumps(dict(config, in_channels=9)))
    assert "is an inpainting model (unet in_channels = 9, SD1.5's is 4); " + ONLY in only(
        check_base_model(str(inpaint)))
    vpred = tmp_path / "vpred"
    shutil.copytree(tiny_model_dir, vpred, ignore=shutil.ignore_patterns("*.safetensors"))
    scheduler = json.loads((vpred / "scheduler/scheduler_config.json").read_text())
    (vpred / "scheduler/scheduler_config.json").write_text(json.dumps(dict(scheduler, prediction_type="v_prediction")))
    assert "is a v_prediction model" in only(check_base_model(str(vpred)))
    (vpred / "text_encoder_2").mkdir()
    assert "is an incomplete SDXL diffusers folder (missing ['tokenizer_2'])" in only(check_base_model(str(vpred)))
    assert "not a diffusers Stable Diffusion folder (missing ['unet', 'text_encoder', 'tokenizer', 'vae']" in only(
        check_base_model(str(tmp_path / "inpaint" / "scheduler")))


def test_config_dir_override(tiny_model_dir, tmp_path):
    from tifactory.training import sd15

    assert check_config_dir(str(sd15.SD15_DIR)) == []
    assert check_config_dir(str(tiny_model_dir)) == []
    assert only(check_config_dir(str(tmp_path))) == (
        f"base_model_config: {tmp_path} is not a usable diffusers SD1.5 config folder: missing "
        "['unet/config.json', 'vae/config.json', 'text_encoder/config.json', 'tokenizer']")
    sd2 = tmp_path / "sd2"
    shutil.copytree(sd15.SD15_DIR, sd2)
    config = json.loads((sd2 / "unet/config.json").read_text())
    (sd2 / "unet/config.json").write_text(json.dumps(dict(config, cross_attention_dim=1024)))
    assert "describes an SD 2.x model (unet cross_attention_dim = 1024); the base model is SD1.5" in only(
        check_config_dir(str(sd2)))


def test_vae_files_and_folders(tmp_path, tiny_model_dir):
    bare = {"encoder.conv_out.weight": torch.zeros(8, 4, 3, 3), "decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
            "loss.logvar": torch.zeros(())}
    assert check_vae(write(tmp_path / "vae-ft-mse-840000-ema-pruned.ckpt", bare)) == []
    assert check_vae(write(tmp_path / "vae.safetensors", bare)) == []
    assert check_vae(write(tmp_path / "full.safetensors", sd15_keys())) == []  # first_stage_model.* inside
    assert check_vae(str(tiny_model_dir / "vae")) == [] and check_vae(str(tiny_model_dir)) == []
    assert only(check_vae(str(tmp_path / "missing.ckpt"))) == f"vae: {tmp_path / 'missing.ckpt'} does not exist"
    lora = write(tmp_path / "lora.safetensors", {"lora_te_text_model_encoder.lora_up.weight": torch.zeros(4, 4)})
    assert only(check_vae(lora)).startswith(f"vae: {lora} is a LoRA/LyCORIS network, not a VAE")
    flux = write(tmp_path / "ae.safetensors", dict(bare, **{"encoder.conv_out.weight": torch.zeros(32, 4, 3, 3)}))
    assert only(check_vae(flux)) == f"vae: {flux} is a VAE with 16 latent channels; SD1.5's has 4"
    assert "not a diffusers AutoencoderKL folder" in only(check_vae(str(tmp_path)))


def test_check_models_names_every_key(tmp_path, tiny_model_dir):
    good = write(tmp_path / "good.safetensors", sd15_keys())
    xl = write(tmp_path / "xl.safetensors", {"conditioner.embedders.0.x": torch.zeros(1), UNET + "x": torch.zeros(1)})
    config = {"base_model": good, "base_model_config": "", "vae": str(tmp_path / "nope.ckpt"),
              "eval_models": [{"name": "ok", "path": str(tiny_model_dir)},
                              {"name": "dreamshaper", "path": xl, "config": str(tmp_path / "cfg")}]}
    problems = check_models(config)
    assert problems == [
        f"vae: {tmp_path / 'nope.ckpt'} does not exist",
        f"eval_models[1] (dreamshaper).path: {xl} is an SDXL checkpoint without its CLIP-L text encoder "
        "(conditioner.embedders.0.transformer.* keys)",
        f"eval_models[1] (dreamshaper).config: {tmp_path / 'cfg'} is not a folder",
    ]
    assert check_models({"base_model": "demo-tiny", "base_model_config": "", "vae": ""}) == []


def test_subject_tokens_at_dag_time(tmp_path):
    from tifactory.training import sd15

    notes, problems = model_check.check_subject_tokens({"astro": 5, "madonna": 3, "qzxv": 5}, sd15.SD15_DIR / "tokenizer")
    assert problems == [] and notes == ["astro -> astro-ti", "madonna -> madonna-ti"]
    assert model_check.check_subject_tokens({"a": 1}, None) == ([], [])
    notes, problems = model_check.check_subject_tokens({"a": 1}, tmp_path)
    assert notes == [] and "cannot read the tokenizer vocabulary" in only(problems)


@pytest.mark.slow
def test_no_torch_at_import():
    code = ("import sys, tifactory.training.model_check, tifactory.training.sd15, tifactory.configuration; "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'safetensors') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_tokenizer_folder_follows_the_model(tmp_path, tiny_model_dir):
    from tifactory.training import sd15

    single = {"base_model": "/m/v1-5.safetensors", "base_model_config": ""}
    assert model_check.tokenizer_folder(single) == sd15.SD15_DIR / "tokenizer"
    assert model_check.tokenizer_folder(dict(single, base_model_config=str(tmp_path))) == tmp_path / "tokenizer"
    assert model_check.tokenizer_folder({"base_model": str(tiny_model_dir)}) == tiny_model_dir / "tokenizer"
    demo = {"base_model": "demo-tiny", "base_model_config": ""}
    assert model_check.tokenizer_folder(demo, demo_model_dir=str(tmp_path / "not-built")) is None
    assert model_check.tokenizer_folder(demo, demo_model_dir=str(tiny_model_dir)) == tiny_model_dir / "tokenizer"
