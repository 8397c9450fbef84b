"""The tiny SD1.5-shaped model: layout, offline pipeline, tokenizer, original-layout single files."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from tifactory.families.loading import model_fingerprint
from tifactory.training.templates import TEMPLATES
from tifactory.demo.tinymodel import TOKENIZER_WORDS, build_tiny_model, save_single_file

SAMPLE_PROMPT_WORDS = "a woman smiling on the beach, studio lighting, wearing a red dress in the city street, oil painting"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer", local_files_only=True)


# ----------------------------------------------------------------------------- folder

def test_folder_layout_and_size(tiny_model_dir):
    for name in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "scheduler/scheduler_config.json",
    ]:
        assert (tiny_model_dir / name).is_file(), name
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    size = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert size < 40 * 2**20
    assert not list(tiny_model_dir.parent.glob(".*.tmp"))  # no leftover work folder


def test_build_is_deterministic_per_seed(tiny_model_dir, tmp_path):
    same = build_tiny_model(tmp_path / "same", seed=0)
    assert model_fingerprint(same) == model_fingerprint(tiny_model_dir)
    other = build_tiny_model(tmp_path / "same", seed=1)  # also: rebuilding over a folder replaces it
    assert model_fingerprint(other) != model_fingerprint(tiny_model_dir)
    assert (other / "tokenizer/vocab.json").read_bytes() == (tiny_model_dir / "tokenizer/vocab.json").read_bytes()


def test_pipeline_loads_offline_and_renders(pipe):
    assert pipe.text_encoder.config.hidden_size == 768
    assert pipe.text_encoder.get_input_embeddings().weight.shape == (len(pipe.tokenizer), 768)
    assert pipe.unet.config.cross_attention_dim == 768
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 4
    assert pipe.unet.config.sample_size == 64
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    config = pipe.scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (config.num_train_timesteps, config.prediction_type) == (1000, "epsilon")

    generator = torch.Generator().manual_seed(0)
    image = pipe("a photo of a woman", height=64, width=64, num_inference_steps=2, generator=generator).images[0]
    assert image.size == (64, 64)
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        hidden = pipe.text_encoder(pipe.tokenizer("a photo", return_tensors="pt").input_ids)[0]
    assert latents.shape == (1, 4, 8, 8)
    assert hidden.shape[-1] == 768


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_basics(tokenizer):
    assert tokenizer("woman", add_special_tokens=False).input_ids == [tokenizer.convert_tokens_to_ids("woman</w>")]
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer("a photo of a woman", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # the full byte-level alphabet: any text encodes without unknown tokens
    vocab = tokenizer.get_vocab()
    assert sum(1 for token in vocab if len(token) == 1) == 256
    assert sum(1 for token in vocab if len(token) == 5 and token.endswith("</w>")) == 256
    odd = tokenizer("Zürich 2024 ☃ émoji", add_special_tokens=False).input_ids
    assert odd and tokenizer.unk_token_id not in odd


def test_prompt_words_are_single_tokens(tokenizer):
    words = set(TOKENIZER_WORDS)
    for templates in TEMPLATES.values():
        for template in templates:
            words |= set(re.findall(r"[a-z]+", template.format("")))
    words |= set(re.findall(r"[a-z]+", SAMPLE_PROMPT_WORDS))
    for required in ["woman", "man", "person", "photo", "portrait", "picture", "rendition", "cropped", "close"]:
        assert required in words
    split = [w for w in sorted(words) if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    assert split == []
    # "close-up" is three tokens, as with the real CLIP tokenizer: close / - / up
    assert len(tokenizer("close-up", add_special_tokens=False).input_ids) == 3


def test_add_tokens_gives_new_single_ids(tiny_model_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer", local_files_only=True)
    before = len(tokenizer)
    assert tokenizer.add_tokens(["eva", "eva1"]) == 2
    ids = tokenizer("a photo of eva eva1", add_special_tokens=False).input_ids
    assert ids[-2:] == [before, before + 1]
    assert len(tokenizer) == before + 2


# ----------------------------------------------------------------------------- single file

@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_has_ldm_layout_and_round_trips(tiny_model_dir, tmp_path, pipe, suffix):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    path = save_single_file(tiny_model_dir, tmp_path / f"tiny{suffix}")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True)["state_dict"]

    prefixes = {key.split(".")[0] for key in state}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in state
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in state
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # LDM: 1x1 conv
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in state

    # back through diffusers' own LDM -> diffusers converters: identical weights
    unet = convert_ldm_unet_checkpoint(state, dict(pipe.unet.config))
    vae = convert_ldm_vae_checkpoint(state, dict(pipe.vae.config))
    for converted, module in [(unet, pipe.unet), (vae, pipe.vae)]:
        reference = module.state_dict()
        assert converted.keys() == reference.keys()
        assert all(torch.equal(converted[key], reference[key]) for key in reference)
    text = {
        key.removeprefix("cond_stage_model.transformer.text_model."): value
        for key, value in state.items()
        if key.startswith("cond_stage_model.") and not key.endswith("position_ids")
    }
    reference = pipe.text_encoder.state_dict()
    assert text.keys() == reference.keys()
    assert all(torch.equal(text[key], reference[key]) for key in reference)


def test_diffusers_from_single_file_accepts_it(tiny_model_dir, tmp_path, pipe):
    """Independent check of the layout: diffusers' own single-file loader (local configs) reads it."""
    from diffusers import StableDiffusionPipeline

    path = save_single_file(tiny_model_dir, tmp_path / "tiny.safetensors")
    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(tiny_model_dir), local_files_only=True, safety_checker=None,
        requires_safety_checker=False,
    )
    for name in ["unet", "vae", "text_encoder"]:
        ours, reference = getattr(loaded, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(ours[key], reference[key]) for key in reference), name


def test_ldm_mapping_covers_the_full_size_sd15_architecture():
    """The reverse key mapping on SD1.5's real shapes (meta tensors, no weights): diffusers'
    forward converters give back every key, and diffusers recognises the result as SD v1."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    from tifactory.demo.tinymodel import unet_diffusers_to_ldm, vae_diffusers_to_ldm

    with init_empty_weights():
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # SD1.5's config
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        )
    ldm = unet_diffusers_to_ldm(unet.state_dict(), unet.config)
    ldm.update(vae_diffusers_to_ldm(vae.state_dict(), vae.config))
    assert len(ldm) == len(unet.state_dict()) + len(vae.state_dict())
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in ldm
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm  # upsampler after a plain block
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm  # ... after an attention block
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm
    assert infer_diffusers_model_type(ldm) == "v1"
    assert convert_ldm_unet_checkpoint(ldm, dict(unet.config)).keys() == unet.state_dict().keys()
    assert convert_ldm_vae_checkpoint(ldm, dict(vae.config)).keys() == vae.state_dict().keys()


def test_single_file_fp16_and_bad_extension(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    path = save_single_file(tiny_model_dir, tmp_path / "half.safetensors", dtype=torch.float16)
    dtypes = {tensor.dtype for tensor in load_file(str(path)).values()}
    assert dtypes == {torch.float16, torch.int64}  # int64: position_ids
    with pytest.raises(ValueError, match="extension"):
        save_single_file(tiny_model_dir, tmp_path / "model.bin")
    assert not (tmp_path / "model.bin").exists()


@pytest.mark.slow
def test_package_import_stays_cheap():
    code = "import sys, tifactory.families.sd15, tifactory.families.loading, tifactory.demo.tinymodel; print(sorted({'torch','diffusers','transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
