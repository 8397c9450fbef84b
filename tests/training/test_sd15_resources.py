"""The shipped SD1.5 configs and the exact CLIP ViT-L/14 tokenizer (resources/sd15/)."""

from __future__ import annotations

import hashlib
import json

import pytest

from tifactory.training import sd15

TOKENIZER_DIR = sd15.SD15_DIR / "tokenizer"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)


def test_merges_file_is_the_pinned_one():
    data = (TOKENIZER_DIR / "merges.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == sd15.MERGES_SHA256
    assert hashlib.sha256(data).hexdigest() == "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"
    lines = data.decode("utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894


def test_vocab_is_what_clip_builds_from_the_merges():
    merges = sd15.parse_merges((TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8"))
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == sd15.clip_vocab(merges)
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a"] == 64 and vocab["a</w>"] == 256 + 64
    assert vocab["i" + "n"] == 512  # the first merge


def test_token_ids_are_clip_vit_l14s(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a woman").input_ids == [49406, 320, 1125, 539, 320, 2308, 49407]
    assert tokenizer("man", add_special_tokens=False).input_ids == [786]
    assert tokenizer("person", add_special_tokens=False).input_ids == [2533]
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    ids = tokenizer("Close-up PHOTO, naïve", add_special_tokens=False).input_ids  # lower-cased, bytes for ï
    assert tokenizer.decode(ids) == "close - up photo , naïve"


def test_byte_table_is_a_bijection_in_clip_order():
    table = sd15.clip_byte_table()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert list(table)[:3] == [ord("!"), ord('"'), ord("#")]
    assert table[ord(" ")] == chr(256 + 32) and table[0] == chr(256)
    assert all(not symbol.isspace() for symbol in table.values())


def test_read_vocab_without_transformers():
    vocab = sd15.read_vocab()
    assert len(vocab) == 49408 and "astro" in vocab and "madonna</w>" in vocab and "madonna-ti" not in vocab


def test_configs_describe_sd15():
    folder = sd15.config_dir()
    unet = json.loads((folder / "unet/config.json").read_text())
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert unet["in_channels"] == 4 and unet["attention_head_dim"] == 8 and unet["layers_per_block"] == 2
    text = json.loads((folder / "text_encoder/config.json").read_text())
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]) == (768, 12, 49408)
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon" and scheduler["beta_schedule"] == "scaled_linear"


def test_sd15_parameter_counts():
    """The configs build SD1.5's known module sizes (meta tensors: no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = sd15.config_dir()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    counts = [sum(p.numel() for p in module.parameters()) for module in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]


def test_missing_resources_are_named(monkeypatch, tmp_path):
    monkeypatch.setattr(sd15, "SD15_DIR", tmp_path)
    with pytest.raises(sd15.SD15ResourceError, match="base_model_config"):
        sd15.config_dir()


def test_read_vocab_of_a_fast_tokenizer_folder(tokenizer, tmp_path):
    """transformers 5 saves a tokenizer as tokenizer.json only; a base_model_config folder like that is read too."""
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "vocab.json").unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    assert sd15.read_vocab(tmp_path) == sd15.read_vocab()
