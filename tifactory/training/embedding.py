"""The embedding file contract: safetensors with one tensor `emb_params` [num_vectors, dim] + metadata.

Loads in A1111/ComfyUI (single-key layout) and in diffusers' `load_textual_inversion(path, token=...)`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import subprocess
from pathlib import Path

from tifactory.fileio import atomic_path
from tifactory import REPO_ROOT

EMBEDDING_KEY = "emb_params"
SAVE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "float": "float32"}
VERSIONED_PACKAGES = ("tifactory", "torch", "diffusers", "transformers", "safetensors")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "tifactory":
                from tifactory import __version__
                versions[name] = __version__
    return versions


def git_commit() -> str:
    """The workflow's git commit (with '+dirty' when the tree has changes), or '' outside git."""
    repo = REPO_ROOT
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def reproducible_date() -> str:
    """SOURCE_DATE_EPOCH (reproducible-builds convention) if set, else today's UTC date."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch
              else datetime.datetime.now(datetime.timezone.utc))
    return moment.date().isoformat()


def build_metadata(*, subject: str, step: int, resolution: int, date: str, recipe: dict,
                   base_model: str, base_model_hash: str, dataset_hash: str,
                   tokens: list[str] | None = None) -> dict[str, str]:
    """modelspec-style keys + provenance; safetensors metadata values must be strings.
    `tokens`: the token strings the vectors trained under (the subject's name, or one derived from it)."""
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/textual-inversion",
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"{subject}-ti",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": date,
        "modelspec.prediction_type": "epsilon",
        "tifactory.subject": subject,
        "tifactory.step": str(step),
        "tifactory.seed": str(recipe["seed"]),
        "tifactory.recipe": json.dumps(recipe, sort_keys=True),
        "tifactory.base_model": os.path.basename(str(base_model).rstrip("/")),
        "tifactory.base_model_sha256": base_model_hash,
        "tifactory.dataset_sha256": dataset_hash,
        "tifactory.package_versions": json.dumps(package_versions(), sort_keys=True),
        "tifactory.git_commit": git_commit(),
    }
    if tokens is not None:
        metadata["tifactory.training_tokens"] = json.dumps(list(tokens))
    return metadata


SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def safetensors_bytes(name: str, tensor, metadata: dict[str, str]) -> bytes:
    """One tensor in the safetensors format with a deterministic header (sorted keys).

    safetensors' own writer orders metadata keys differently from run to run; reproducible embeddings
    need the same bytes for the same inputs, so the (simple) format is written here: an 8-byte
    little-endian header length, a JSON header padded to 8 bytes, then the raw little-endian data.
    """
    import torch

    data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    header = {
        "__metadata__": dict(sorted(metadata.items())),
        name: {"dtype": SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")],
               "shape": list(tensor.shape), "data_offsets": [0, len(data)]},
    }
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    return len(header_bytes).to_bytes(8, "little") + header_bytes + data


def save_embedding(path: str | os.PathLike, vectors, metadata: dict[str, str], save_precision: str) -> Path:
    """Write `vectors` ([num_vectors, dim]) atomically as `emb_params` in the save precision."""
    import torch

    dtype = getattr(torch, SAVE_DTYPES[save_precision])
    tensor = vectors.detach().to(device="cpu", dtype=dtype).contiguous()
    with atomic_path(path) as tmp_path:
        tmp_path.write_bytes(safetensors_bytes(EMBEDDING_KEY, tensor, metadata))
    return Path(path)


def load_embedding(path: str | os.PathLike):
    """Return (tensor [num_vectors, dim], metadata dict)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        if keys != [EMBEDDING_KEY]:
            raise ValueError(f"{path}: expected one tensor {EMBEDDING_KEY!r}, found {keys}")
        return handle.get_tensor(EMBEDDING_KEY), dict(handle.metadata() or {})
