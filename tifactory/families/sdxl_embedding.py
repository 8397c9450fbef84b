"""The SDXL textual-inversion file: exactly `clip_l` [n, 768] and `clip_g` [n, 1280], with kohya's metadata.

kohya's `sdxl_train_textual_inversion.py` writes this layout (the vectors for CLIP ViT-L under `clip_l`,
those for OpenCLIP bigG under `clip_g`) with the modelspec (SAI model spec 1.0) fields, architecture
`stable-diffusion-xl-v1-base/textual-inversion` and implementation
`https://github.com/Stability-AI/generative-models`. tifactory.training.embedding owns the format (names,
the shared metadata, SD1.5's one-tensor file); this module adds SDXL's two tensors to it.

How the tools load it (`<name>` is the file name, the trigger word):
* A1111 / Forge: an SDXL embedding is a file with both `clip_l` and `clip_g`; each half goes to its
  encoder. A file with only one of them is not an SDXL embedding there.
* ComfyUI: `embedding:<name>` in a prompt; each CLIP of the model reads its own key (`clip_l`, `clip_g`).
* InvokeAI: picks the tensor for each encoder by width (768 / 1280).
* diffusers: two calls, one per encoder, with the same token:
  `pipe.load_textual_inversion(tensors["clip_l"], token=name, text_encoder=pipe.text_encoder,
  tokenizer=pipe.tokenizer)` and `pipe.load_textual_inversion(tensors["clip_g"], token=name,
  text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)`; an [n, dim] tensor becomes the tokens
  name, name_1, ..., name_{n-1} in both tokenizers (tests/training/test_sdxl_embedding.py does this).

Parse-time cheap: torch and safetensors are imported inside the functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tifactory.fileio import atomic_path
from tifactory.training.embedding import SAFETENSORS_DTYPES, SAVE_DTYPES, SDXL_KEYS, EmbeddingError

ARCHITECTURE = "stable-diffusion-xl-v1-base/textual-inversion"
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
WIDTHS = dict(zip(SDXL_KEYS, (768, 1280)))  # clip_l: CLIP ViT-L/14, clip_g: OpenCLIP ViT-bigG/14


def sdxl_metadata(metadata: dict[str, str], resolution: int) -> dict[str, str]:
    """The shared metadata (tifactory.training.embedding.build_metadata) with SDXL's modelspec fields."""
    return {**metadata, "modelspec.architecture": ARCHITECTURE, "modelspec.implementation": IMPLEMENTATION,
            "modelspec.resolution": f"{resolution}x{resolution}"}


def embedding_tensors(vectors) -> dict:
    """[clip_l [n, 768], clip_g [n, 1280]] (one per encoder, in encoder order) -> {"clip_l": ..., "clip_g": ...};
    a wrong count, width or a different n per encoder is a ValueError."""
    vectors = list(vectors)
    if len(vectors) != len(SDXL_KEYS):
        raise ValueError(f"an SDXL embedding has {len(SDXL_KEYS)} tensors (one per text encoder), got {len(vectors)}")
    tensors = dict(zip(SDXL_KEYS, vectors))
    for key, tensor in tensors.items():
        if tensor.ndim != 2 or tensor.shape[1] != WIDTHS[key]:
            raise ValueError(f"{key} must be [num_vectors, {WIDTHS[key]}], got {list(tensor.shape)}")
    if len({tensor.shape[0] for tensor in tensors.values()}) != 1:
        raise ValueError(f"clip_l and clip_g must hold as many vectors: {[list(t.shape) for t in tensors.values()]}")
    return tensors


def vectors_from_tensors(tensors: dict) -> list:
    """{"clip_l", "clip_g"} -> [clip_l, clip_g] (checked as embedding_tensors checks them)."""
    missing = [key for key in SDXL_KEYS if key not in tensors]
    if missing:
        raise ValueError(f"not an SDXL embedding: no {missing} tensor(s) (found {sorted(tensors)})")
    return list(embedding_tensors([tensors[key] for key in SDXL_KEYS]).values())


def tensors_bytes(tensors: dict, metadata: dict[str, str]) -> bytes:
    """Several tensors in the safetensors format with a deterministic header (sorted keys, data in key
    order), as tifactory.training.embedding.safetensors_bytes writes one."""
    import torch

    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        data = tensor.view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")],
                        "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    return len(header_bytes).to_bytes(8, "little") + header_bytes + b"".join(blobs)


def save_sdxl_embedding(path: str | os.PathLike, vectors, metadata: dict[str, str], save_precision: str) -> Path:
    """Write [clip_l, clip_g] atomically as exactly `clip_l` + `clip_g` in the save precision (bf16/fp16/float)."""
    import torch

    dtype = getattr(torch, SAVE_DTYPES[save_precision])
    tensors = {key: tensor.detach().to(device="cpu", dtype=dtype)
               for key, tensor in embedding_tensors(vectors).items()}
    with atomic_path(path) as tmp_path:
        tmp_path.write_bytes(tensors_bytes(tensors, metadata))
    return Path(path)


def read_sdxl_embedding(path: str | os.PathLike) -> tuple[list, dict[str, str]]:
    """([clip_l, clip_g] in the stored dtype, metadata) of an SDXL embedding file; anything else (a missing
    key, an extra tensor, a wrong width, a pickle, a corrupt file) is an EmbeddingError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"embedding file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise EmbeddingError(f"{path}: only .safetensors embeddings are read (no pickles)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = sorted(handle.keys())
            if keys != sorted(SDXL_KEYS):
                raise EmbeddingError(f"{path}: an SDXL embedding holds exactly {list(SDXL_KEYS)}, found {keys}")
            tensors = {key: handle.get_tensor(key) for key in keys}
            metadata = dict(handle.metadata() or {})
    except EmbeddingError:
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt or truncated file is bad input
        raise EmbeddingError(f"{path}: not a readable safetensors embedding ({type(error).__name__}: {error})") \
            from None
    try:
        return vectors_from_tensors(tensors), metadata
    except ValueError as error:
        raise EmbeddingError(f"{path}: {error}") from None
