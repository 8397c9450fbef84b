"""The SDXL embedding file: exactly clip_l [n, 768] + clip_g [n, 1280] in bf16, kohya's modelspec metadata,
read back, refused when malformed, and loaded by diffusers with two load_textual_inversion calls."""

from __future__ import annotations

import inspect

import pytest
import torch

from tifactory.families import sdxl_embedding as sdxl
from tifactory.training import embedding


def vectors(n=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 768, generator=generator), torch.randn(n, 1280, generator=generator)]


def metadata():
    # the family seam adds build_metadata(architecture=...); both signatures are served during the merge
    extra = {"architecture": sdxl.ARCHITECTURE} if "architecture" in inspect.signature(
        embedding.build_metadata).parameters else {}
    shared = embedding.build_metadata(subject="ada", step=1000, resolution=1024, date="2026-12-05",
                                      recipe={"seed": 1234}, base_model="sd_xl_base_1.0.safetensors",
                                      base_model_hash="0" * 64, dataset_hash="1" * 64, tokens=["ada"], **extra)
    return sdxl.sdxl_metadata(shared, 1024)


def test_written_file_holds_exactly_clip_l_and_clip_g_in_bf16(tmp_path):
    from safetensors import safe_open

    path = sdxl.save_sdxl_embedding(tmp_path / "ada-ti.safetensors", vectors(), metadata(), "bf16")
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["clip_g", "clip_l"]
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
        stored_metadata = handle.metadata()
    assert stored["clip_l"].dtype == stored["clip_g"].dtype == torch.bfloat16
    assert list(stored["clip_l"].shape) == [5, 768] and list(stored["clip_g"].shape) == [5, 1280]
    assert stored_metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    assert stored_metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert stored_metadata["modelspec.resolution"] == "1024x1024"
    assert stored_metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert stored_metadata["modelspec.prediction_type"] == "epsilon"


def test_read_back_equals_what_was_written_and_bytes_are_reproducible(tmp_path):
    first = sdxl.save_sdxl_embedding(tmp_path / "a.safetensors", vectors(), metadata(), "bf16")
    second = sdxl.save_sdxl_embedding(tmp_path / "b.safetensors", vectors(), metadata(), "bf16")
    assert first.read_bytes() == second.read_bytes()
    read, read_metadata = sdxl.read_sdxl_embedding(first)
    for got, want in zip(read, vectors()):
        assert torch.equal(got, want.to(torch.bfloat16))
    assert read_metadata == metadata()
    assert embedding.read_embedding(first).key == "clip_l"  # the lenient reader still takes the SD1-sized half


@pytest.mark.parametrize("bad", [
    [torch.zeros(5, 1280), torch.zeros(5, 1280)],
    [torch.zeros(5, 768), torch.zeros(4, 1280)],
    [torch.zeros(5, 768)],
])
def test_wrong_vectors_are_refused(bad, tmp_path):
    with pytest.raises(ValueError):
        sdxl.save_sdxl_embedding(tmp_path / "x.safetensors", bad, {}, "bf16")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("tensors", [
    {"clip_l": torch.zeros(5, 768)},
    {"clip_l": torch.zeros(5, 768), "clip_g": torch.zeros(5, 1280), "extra": torch.zeros(1)},
    {"clip_l": torch.zeros(5, 1280), "clip_g": torch.zeros(5, 768)},
])
def test_malformed_files_are_named(tensors, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(embedding.EmbeddingError, match="bad.safetensors"):
        sdxl.read_sdxl_embedding(path)


def test_diffusers_loads_it_with_two_calls(tmp_path):
    """clip_l into text_encoder/tokenizer, clip_g into text_encoder_2/tokenizer_2, under the same token."""
    from diffusers import StableDiffusionXLPipeline

    from tifactory.demo.tinymodel_sdxl import build_tiny_sdxl_model

    pipe = StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl_model(tmp_path / "tiny"), local_files_only=True)
    path = sdxl.save_sdxl_embedding(tmp_path / "zq-ti.safetensors", vectors(n=3), metadata(), "bf16")
    stored, _ = sdxl.read_sdxl_embedding(path)
    clip_l, clip_g = stored
    pipe.load_textual_inversion(clip_l, token="zq", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token="zq", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    tokens = ["zq", "zq_1", "zq_2"]
    ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    assert pipe.tokenizer_2.convert_tokens_to_ids(tokens) == ids
    rows = [encoder.get_input_embeddings().weight[ids] for encoder in (pipe.text_encoder, pipe.text_encoder_2)]
    assert torch.equal(rows[0], clip_l.float()) and torch.equal(rows[1], clip_g.float())
