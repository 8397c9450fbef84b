"""The embedding file format, owned here: names, the tensor key, writing, listing and reading.

What tifactory writes: safetensors with the model family's tensors (tifactory.families: SD1.5 one tensor
`emb_params` [num_vectors, dim]; the keys are spelled here, the family says which it uses) + metadata, named
`<subject>-ti.safetensors` (the name is the trigger people type) and, every save_every_n_steps,
`<subject>-ti-step<8 digits>.safetensors` in the checkpoint folder. Loads in A1111/ComfyUI (single-key
layout) and in diffusers' `load_textual_inversion(path, token=...)`.

What tifactory reads (`read_embedding`, leniently, for extra embeddings such as a negative one): the
layouts other trainers write into safetensors files -- A1111 and kohya `emb_params`, A1111's
`string_to_param` (flattened to `string_to_param.*`), diffusers' `{token: vector(s)}`, and the SD1-sized
`clip_l` half of an SDXL embedding. Pickles (.pt/.bin) are never read.

Parse-time cheap: torch and safetensors are imported inside the functions that need them.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tifactory import REPO_ROOT
from tifactory.errors import TifactoryError
from tifactory.fileio import atomic_path

EMBEDDING_KEY = "emb_params"  # the one tensor of the files tifactory writes (A1111/kohya's key)
TRIGGER_SUFFIX = "-ti"  # <subject>-ti.safetensors: the file name is the trigger word
CHECKPOINT_STEP = re.compile(r"-step(\d+)\.safetensors$")
STRING_TO_PARAM = "string_to_param."  # A1111's {"string_to_param": {"*": tensor}}, flattened
SDXL_KEYS = ("clip_l", "clip_g")  # an SDXL embedding: clip_l is the SD1-sized (768-wide) half
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


def build_metadata(*, subject: str, step: int, resolution: int, date: str, recipe: dict, architecture: str,
                   base_model: str, base_model_hash: str, dataset_hash: str,
                   tokens: list[str] | None = None) -> dict[str, str]:
    """modelspec-style keys + provenance; safetensors metadata values must be strings.
    `architecture`: the model family's modelspec architecture; `base_model`: the model's file or folder name;
    `tokens`: the token strings the vectors trained under (the subject's name, or one derived from it)."""
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"{subject}-ti",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": date,
        "modelspec.prediction_type": "epsilon",
        "tifactory.subject": subject,
        "tifactory.step": str(step),
        "tifactory.seed": str(recipe["seed"]),
        "tifactory.recipe": json.dumps(recipe, sort_keys=True),
        "tifactory.base_model": base_model,
        "tifactory.base_model_sha256": base_model_hash,
        "tifactory.dataset_sha256": dataset_hash,
        "tifactory.package_versions": json.dumps(package_versions(), sort_keys=True),
        "tifactory.git_commit": git_commit(),
    }
    if tokens is not None:
        metadata["tifactory.training_tokens"] = json.dumps(list(tokens))
    return metadata


SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def safetensors_bytes(tensors: dict, metadata: dict[str, str]) -> bytes:
    """Tensors in the safetensors format with a deterministic header (sorted keys, data in key order).

    safetensors' own writer orders metadata keys differently from run to run; reproducible embeddings
    need the same bytes for the same inputs, so the (simple) format is written here: an 8-byte
    little-endian header length, a JSON header padded to 8 bytes, then the raw little-endian data.
    """
    import torch

    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name]
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")],
                        "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    return len(header_bytes).to_bytes(8, "little") + header_bytes + b"".join(chunks)


def save_embedding(path: str | os.PathLike, tensors, metadata: dict[str, str], save_precision: str) -> Path:
    """Write `tensors` ({key: [num_vectors, dim]}, as the model family's `embedding_tensors` names them; a
    single tensor is SD1.5's `emb_params`) atomically in the save precision."""
    import torch

    if isinstance(tensors, torch.Tensor):
        tensors = {EMBEDDING_KEY: tensors}
    dtype = getattr(torch, SAVE_DTYPES[save_precision])
    stored = {key: value.detach().to(device="cpu", dtype=dtype).contiguous() for key, value in tensors.items()}
    with atomic_path(path) as tmp_path:
        tmp_path.write_bytes(safetensors_bytes(stored, metadata))
    return Path(path)


class EmbeddingError(TifactoryError, ValueError):
    """An embedding file that cannot be read (missing, not safetensors, corrupt, unknown layout)."""


def embedding_name(subject: str) -> str:
    """The final embedding's file name: `<subject>-ti.safetensors`."""
    return f"{subject}{TRIGGER_SUFFIX}.safetensors"


def checkpoint_name(subject: str, step: int) -> str:
    """A checkpoint's file name: `<subject>-ti-step00000200.safetensors`."""
    return f"{subject}{TRIGGER_SUFFIX}-step{step:08d}.safetensors"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint file name (None for any other name)."""
    match = CHECKPOINT_STEP.search(name)
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(step, path)] of the checkpoints in a folder, by step; other files are ignored."""
    found = []
    for path in Path(checkpoint_dir).glob("*.safetensors"):
        step = checkpoint_step(path.name)
        if step is not None and not path.name.startswith("."):  # "." = a temporary file (fileio.atomic_path)
            found.append((step, path))
    return sorted(found)


def looks_like_embedding(keys) -> bool:
    """Whether tensor names are those of a textual-inversion file (for telling one from a model file)."""
    return any(key == EMBEDDING_KEY or key in SDXL_KEYS or key.startswith(STRING_TO_PARAM) for key in keys)


def vector_key(keys: list[str]) -> str | None:
    """Which tensor holds the vectors, in the layouts read here; None when that cannot be told."""
    if EMBEDDING_KEY in keys:
        return EMBEDDING_KEY  # tifactory, A1111 (safetensors), kohya
    string_to_param = [key for key in keys if key.startswith(STRING_TO_PARAM)]
    if len(string_to_param) == 1:
        return string_to_param[0]  # A1111's dict, flattened: string_to_param.*
    if "clip_l" in keys:
        return "clip_l"  # SDXL pair: the half that fits SD1's text encoder
    if len(keys) == 1 and not string_to_param:
        return keys[0]  # diffusers' learned_embeds: {token: vector(s)}
    return None


@dataclass(frozen=True)
class Embedding:
    """One embedding file read: `vectors` [num_vectors, dim] in the stored dtype, the tensor's `key`, every
    tensor name in the file (`keys`), the file's safetensors `metadata`."""

    vectors: object
    key: str
    keys: tuple[str, ...]
    metadata: dict[str, str]


def read_embedding(path: str | os.PathLike) -> Embedding:
    """Read any of the layouts in the module docstring; a problem is an EmbeddingError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"embedding file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise EmbeddingError(f"{path}: only .safetensors embeddings are read (no pickles)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            key = vector_key(keys)
            if key is None:
                raise EmbeddingError(f"{path}: cannot tell which tensor is the embedding (keys {keys})")
            vectors = handle.get_tensor(key)
            metadata = dict(handle.metadata() or {})
    except EmbeddingError:
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt or truncated file is bad input
        raise EmbeddingError(f"{path}: not a readable safetensors embedding ({type(error).__name__}: {error})") \
            from None
    if vectors.ndim == 1:  # diffusers stores a one-vector token as [dim]
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise EmbeddingError(f"{path}: tensor {key!r} has shape {tuple(vectors.shape)}, not [num_vectors, dim]")
    return Embedding(vectors=vectors, key=key, keys=tuple(keys), metadata=metadata)


def load_embedding(path: str | os.PathLike):
    """(vectors [num_vectors, dim], metadata) of a file tifactory wrote: `read_embedding`, then the contract
    checked -- exactly one tensor, under `emb_params`."""
    embedding = read_embedding(path)
    if embedding.keys != (EMBEDDING_KEY,):
        raise EmbeddingError(f"{path}: expected one tensor {EMBEDDING_KEY!r}, found {list(embedding.keys)}")
    return embedding.vectors, embedding.metadata
