"""The embedding format's owner (tifactory.training.embedding): file names, the checkpoint listing, and the
one lenient reader across the layouts other trainers write."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tifactory.training.embedding import (EMBEDDING_KEY, EmbeddingError, checkpoint_name, checkpoint_step,
                                          embedding_name, list_checkpoints, load_embedding, looks_like_embedding,
                                          read_embedding, save_embedding)


def test_names_round_trip_and_listing_orders_by_step(tmp_path):
    assert embedding_name("eva") == "eva-ti.safetensors"
    assert checkpoint_name("eva", 200) == "eva-ti-step00000200.safetensors"
    assert checkpoint_step(checkpoint_name("eva", 200)) == 200
    assert checkpoint_step(embedding_name("eva")) is None
    for step in (1000, 200, 40):
        (tmp_path / checkpoint_name("eva", step)).write_bytes(b"x")
    (tmp_path / embedding_name("eva")).write_bytes(b"x")  # not a checkpoint
    (tmp_path / f".{checkpoint_name('eva', 60)}").write_bytes(b"x")  # a temporary name: not listed
    (tmp_path / "notes-step00000300.txt").write_bytes(b"x")
    assert list_checkpoints(tmp_path) == [(step, tmp_path / checkpoint_name("eva", step)) for step in (40, 200, 1000)]
    assert list_checkpoints(tmp_path / "missing") == []


def _vectors(rows: int, width: int = 768, seed: int = 0):
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


def test_reads_what_tifactory_writes_in_its_stored_dtype(tmp_path):
    vectors = _vectors(5)
    path = save_embedding(tmp_path / embedding_name("eva"), vectors, {"tifactory.step": "7"}, "bf16")
    embedding = read_embedding(path)
    assert embedding.key == EMBEDDING_KEY and embedding.keys == (EMBEDDING_KEY,)
    assert embedding.vectors.dtype == torch.bfloat16 and tuple(embedding.vectors.shape) == (5, 768)
    assert torch.equal(embedding.vectors, vectors.to(torch.bfloat16))
    assert embedding.metadata["tifactory.step"] == "7"
    loaded, metadata = load_embedding(path)
    assert torch.equal(loaded, embedding.vectors) and metadata == embedding.metadata


@pytest.mark.parametrize("layout, key, rows, named", [
    ({"emb_params": _vectors(3).half()}, "emb_params", 3, True),  # A1111 (safetensors) and kohya
    ({"string_to_param.*": _vectors(2)}, "string_to_param.*", 2, True),  # A1111's dict, flattened
    ({"<eva>": _vectors(1)[0]}, "<eva>", 1, False),  # diffusers learned_embeds, one token: a [768] vector
    ({"eva-token": _vectors(4)}, "eva-token", 4, False),  # diffusers, several vectors under one token
    ({"clip_g": _vectors(2, 1280), "clip_l": _vectors(2)}, "clip_l", 2, True),  # SDXL: the SD1-sized half
])
def test_lenient_reader_layouts(tmp_path, layout, key, rows, named):
    """`named`: the tensor names alone mark the file as an embedding (a diffusers token name does not)."""
    path = tmp_path / "other.safetensors"
    save_file(layout, str(path))
    embedding = read_embedding(path)
    assert embedding.key == key and tuple(embedding.vectors.shape) == (rows, 768)
    expected = layout[key] if layout[key].ndim == 2 else layout[key][None]
    assert torch.equal(embedding.vectors, expected)
    assert looks_like_embedding(layout) == named
    if key != EMBEDDING_KEY:  # our own files are checked strictly: one tensor under emb_params
        with pytest.raises(EmbeddingError, match="expected one tensor 'emb_params'"):
            load_embedding(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: save_file({"a": _vectors(1), "b": _vectors(1)}, str(p)), r"cannot tell which tensor.*\['a', 'b'\]"),
    (lambda p: save_file({"emb_params": torch.zeros(1, 2, 768)}, str(p)), r"shape \(1, 2, 768\)"),
    (lambda p: p.write_bytes(b"\x08" + b"\x00" * 7 + b"{broken"), "not a readable safetensors embedding"),
    (lambda p: None, "embedding file not found"),
])
def test_unreadable_embeddings_are_named(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(EmbeddingError, match=message) as info:
        read_embedding(path)
    assert str(path) in str(info.value)


def test_pickles_are_not_read(tmp_path):
    path = tmp_path / "a1111.pt"
    torch.save({"string_to_param": {"*": _vectors(2)}}, path)
    with pytest.raises(EmbeddingError, match="only .safetensors"):
        read_embedding(path)


def test_looks_like_embedding_tells_embeddings_from_models():
    assert looks_like_embedding(["emb_params"]) and looks_like_embedding(["string_to_param.*"])
    assert looks_like_embedding(["clip_l", "clip_g"])
    assert not looks_like_embedding(["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.x"])
