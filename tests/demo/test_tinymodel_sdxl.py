"""The tiny SDXL-shaped model: a diffusers SDXL folder that loads offline and has SDXL's interface widths."""

from __future__ import annotations

import hashlib

import pytest

from tifactory.demo.tinymodel_sdxl import build_tiny_sdxl_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_sdxl_model(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", seed=0)


def test_loads_offline_as_an_sdxl_pipeline_and_generates(tiny, monkeypatch):
    import torch
    from diffusers import StableDiffusionXLPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny, local_files_only=True)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.text_encoder.config.hidden_size == 768 and pipe.text_encoder_2.config.hidden_size == 1280
    assert pipe.text_encoder_2.config.projection_dim == 1280
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.unet.config.cross_attention_dim == 2048
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert pipe.tokenizer.get_vocab() == pipe.tokenizer_2.get_vocab()
    image = pipe("a photo of a woman", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_unet_takes_sdxl_conditioning(tiny):
    """encoder_hidden_states 2048 wide, text_embeds 1280 wide, six time ids: the added-embedding input
    layer's width is exactly pooled + 6 x addition_time_embed_dim."""
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet", local_files_only=True)
    assert unet.config.addition_embed_type == "text_time"
    assert unet.add_embedding.linear_1.in_features == 1280 + 6 * unet.config.addition_time_embed_dim
    out = unet(torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 2048),
               added_cond_kwargs={"text_embeds": torch.randn(2, 1280),
                                  "time_ids": torch.tensor([[128, 128, 0, 0, 128, 128]] * 2)}).sample
    assert out.shape == (2, 4, 16, 16)
    with pytest.raises(Exception):
        unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, 768),
             added_cond_kwargs={"text_embeds": torch.randn(1, 1280), "time_ids": torch.zeros(1, 6)})


def test_same_seed_same_weights(tiny, tmp_path):
    again = build_tiny_sdxl_model(tmp_path / "again", seed=0)
    other = build_tiny_sdxl_model(tmp_path / "other", seed=1)

    def digest(folder, part):
        return hashlib.sha256(next((folder / part).glob("*.safetensors")).read_bytes()).hexdigest()

    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert digest(again, part) == digest(tiny, part)
        assert digest(other, part) != digest(tiny, part)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
