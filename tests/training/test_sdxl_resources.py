"""The shipped SDXL configs and its two CLIP tokenizers (resources/sdxl/)."""

from __future__ import annotations

import json

import pytest

from tifactory.families import sdxl_resources
from tifactory.training import sd15

FOLDER = sdxl_resources.SDXL_DIR


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import CLIPTokenizer

    return [CLIPTokenizer.from_pretrained(FOLDER / name, local_files_only=True) for name in ("tokenizer", "tokenizer_2")]


def test_folder_is_what_make_resources_writes():
    """Every generated file equals what sdxl_resources builds (the tokenizers from the sd15 merges, whose
    source sha256 test_sd15_resources pins): a hand edit of a config or a tokenizer fails here."""
    merges = sd15.parse_merges((FOLDER / "tokenizer/merges.txt").read_text(encoding="utf-8"))
    for name, data in sdxl_resources.CONFIG_FILES.items():
        assert (FOLDER / name).read_text(encoding="utf-8") == sdxl_resources.json_text(data), name
    for folder in ("tokenizer", "tokenizer_2"):
        assert (FOLDER / folder / "merges.txt").read_text(encoding="utf-8") == sd15.merges_text(merges)
        assert json.loads((FOLDER / folder / "vocab.json").read_text(encoding="utf-8")) == sd15.clip_vocab(merges)
    for name, text in sdxl_resources.tokenizer_2_settings_files().items():
        assert (FOLDER / "tokenizer_2" / name).read_text(encoding="utf-8") == text
    for name, text in sd15.tokenizer_settings_files().items():
        assert (FOLDER / "tokenizer" / name).read_text(encoding="utf-8") == text
    assert sd15.read_vocab(FOLDER / "tokenizer_2") == sd15.read_vocab(FOLDER / "tokenizer") == sd15.read_vocab()


def test_both_tokenizers_have_clips_ids_and_their_own_padding(tokenizers):
    clip_l, clip_g = tokenizers
    for tokenizer in tokenizers:
        assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
        assert tokenizer("a photo of a woman").input_ids == [49406, 320, 1125, 539, 320, 2308, 49407]
    padded = [t("a photo", padding="max_length", max_length=6).input_ids for t in tokenizers]
    assert padded == [[49406, 320, 1125, 49407, 49407, 49407], [49406, 320, 1125, 49407, 0, 0]]
    assert (clip_l.pad_token, clip_g.pad_token) == ("<|endoftext|>", "!")


def test_configs_describe_sdxl_base():
    unet = json.loads((FOLDER / "unet/config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["cross_attention_dim"] == 768 + 1280
    assert unet["projection_class_embeddings_input_dim"] == 1280 + 6 * unet["addition_time_embed_dim"] == 2816
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["in_channels"] == 4
    vae = json.loads((FOLDER / "vae/config.json").read_text())
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] is True
    text = json.loads((FOLDER / "text_encoder/config.json").read_text())
    assert (text["hidden_size"], text["num_hidden_layers"], text["hidden_act"]) == (768, 12, "quick_gelu")
    text_2 = json.loads((FOLDER / "text_encoder_2/config.json").read_text())
    assert text_2["architectures"] == ["CLIPTextModelWithProjection"]
    assert (text_2["hidden_size"], text_2["num_hidden_layers"], text_2["num_attention_heads"]) == (1280, 32, 20)
    assert (text_2["hidden_act"], text_2["projection_dim"], text_2["intermediate_size"]) == ("gelu", 1280, 5120)
    for config in (text, text_2):  # the real ids: transformers then pools at the first end-of-text token
        assert (config["bos_token_id"], config["eos_token_id"]) == (49406, 49407)
    scheduler = json.loads((FOLDER / "scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon" and scheduler["beta_schedule"] == "scaled_linear"
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]


def test_sdxl_parameter_counts():
    """The configs build SDXL base's known module sizes (meta tensors: no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = sdxl_resources.config_dir()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    counts = [sum(p.numel() for p in module.parameters()) for module in (unet, vae, text, text_2)]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]


def test_missing_resources_are_named(monkeypatch, tmp_path):
    monkeypatch.setattr(sdxl_resources, "SDXL_DIR", tmp_path)
    with pytest.raises(sdxl_resources.SDXLResourceError, match="base_model_config"):
        sdxl_resources.config_dir()
