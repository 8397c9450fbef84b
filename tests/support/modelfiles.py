"""Model-like files of header only (what the DAG-time checks read): an SD1.5-shaped checkpoint, a tifactory
embedding as far as its ownership metadata goes, any raw header. No torch."""

from __future__ import annotations

import json
import struct
from pathlib import Path

UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer.text_model."
SD15_SHAPES = {UNET + "input_blocks.0.0.weight": [320, 4, 3, 3],
               UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
               TEXT + "embeddings.token_embedding.weight": [49408, 768],
               "first_stage_model.encoder.conv_out.weight": [8, 512, 3, 3],
               "first_stage_model.decoder.conv_in.weight": [512, 4, 3, 3]}


def safetensors_header_file(path: Path, shapes: dict, metadata: dict | None = None) -> Path:
    """A safetensors file of header only (what the DAG-time checks read): shapes and metadata, no data."""
    header = {name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]} for name, shape in shapes.items()}
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def raw_header_file(path: Path, raw: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def tifactory_embedding(path: Path, subject: str) -> Path:
    """An embedding as tifactory writes it, as far as ownership goes: its metadata names the subject."""
    return safetensors_header_file(path, {"emb_params": [5, 768]}, {"tifactory.subject": subject})
