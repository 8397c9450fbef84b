"""Reading model weights offline, for every family: single files, diffusers folders, VAE overrides.

A family's `load` (tifactory.families.sd15 and its subclasses) decides which parts a model has and how a
single file's keys map onto them; the pieces it builds with live here:

* `read_checkpoint`: one `.safetensors` file, or a `.ckpt`/`.pt`/`.pth` read with
  `torch.load(weights_only=True)` so a pickle that would run code is refused;
* `instantiate`: a model built with empty (meta) weights from its config, then given the file's weights on
  the target device in the target dtype (never initialised at random, never copied twice), keys and shapes
  checked first;
* `load_vae_override`: the config key `vae` (a diffusers folder, or a single original-layout file);
* `Placement`: where weights go (device, the UNet's dtype);
* `model_fingerprint`: the sha256 of a model file or folder.

Nothing is ever fetched from the network. Import cost: no torch/diffusers/transformers at import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tifactory.fileio import sha256_file
from tifactory.errors import TifactoryError

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = frozenset({".safetensors"})
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth"})
SINGLE_FILE_SUFFIXES = SAFETENSORS_SUFFIXES | PICKLE_SUFFIXES

# Files that define a model: weights, configs, tokenizer files. Used by `model_fingerprint`.
FINGERPRINT_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json", ".txt", ".model", ".yaml", ".yml"}
)

# Globals that old PyTorch-Lightning SD1.x checkpoints reference as plain metadata (the class is a
# dict key in ckpt["callbacks"]); they are mapped to an inert stand-in, never imported.
_INERT_PICKLE_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)



class ModelLoadError(TifactoryError):
    """The base model, VAE or config folder is missing, unreadable, unsafe or of the wrong shape."""


def model_fingerprint(path: str | Path) -> str:
    """sha256 hex of a model: of the file itself, or for a folder of its sorted
    (relative path, sha256) pairs over weight/config/tokenizer files (hidden entries skipped).
    Files are streamed, so multi-GB checkpoints cost no memory."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"cannot fingerprint {path}: no such file or folder")
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    entries = []
    for file in path.rglob("*"):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if file.is_file() and file.suffix.lower() in FINGERPRINT_SUFFIXES:
            entries.append((rel.as_posix(), file))
    if not entries:
        raise ModelLoadError(f"cannot fingerprint {path}: no weight or config files in it")
    for rel, file in sorted(entries):
        digest.update(f"{rel}\t{sha256_file(file)}\n".encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class Placement:
    """Where loaded weights go: `device` (None = the CPU, the libraries' default path) and the UNet's dtype."""

    device: Any
    unet_dtype: Any

    @classmethod
    def of(cls, device, unet_dtype) -> "Placement":
        import torch

        device = None if device is None else torch.device(device)
        if device is not None and device.type == "cpu":
            device = None
        return cls(device=device, unet_dtype=unet_dtype or torch.float32)

    def device_map(self):
        """from_pretrained's device_map: every weight is materialised on the device as it is read."""
        return None if self.device is None else {"": self.device}

    @property
    def map_location(self):
        return "cpu" if self.device is None else self.device


def load_vae_folder(folder: Path, place: Placement):
    import torch
    from diffusers import AutoencoderKL

    vae = guarded(
        "VAE",
        folder,
        lambda: AutoencoderKL.from_pretrained(
            folder,
            local_files_only=True,
            torch_dtype=torch.float32,
            variant=variant(folder, "diffusion_pytorch_model"),
            device_map=place.device_map(),
        ),
    )
    return vae.eval()


def variant(folder: Path, stem: str) -> str | None:
    """'fp16' when a folder only has fp16-variant weights (e.g. `model.fp16.safetensors`)."""
    standard = [f"{stem}.safetensors", f"{stem}.bin", f"{stem}.safetensors.index.json", f"{stem}.bin.index.json"]
    if any((folder / name).exists() for name in standard):
        return None
    fp16 = [f"{stem}.fp16.safetensors", f"{stem}.fp16.bin", f"{stem}.safetensors.index.fp16.json"]
    if any((folder / name).exists() for name in fp16):
        return "fp16"
    return None


def guarded(what: str, where: Path, load):
    try:
        return load()
    except ModelLoadError:
        raise
    except Exception as error:  # the libraries raise OSError, ValueError, EnvironmentError, ...
        raise ModelLoadError(f"could not load the {what} from {where}: {type(error).__name__}: {error}") from error


# ---------------------------------------------------------------------------------------------
# Original-layout single file
# ---------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, device: Any = "cpu") -> dict:
    """Read a single-file checkpoint into a flat {key: tensor} dict on `device` (default the CPU).

    `.safetensors` is read with safetensors; `.ckpt`/`.pt`/`.pth` with `torch.load(weights_only=True)`
    (a pickle asking for anything beyond tensors and plain containers is refused). A nested
    "state_dict" entry is unwrapped; non-tensor entries (epoch, global_step, ...) are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            data = load_file(str(path), device=str(device))
        except Exception as error:
            raise ModelLoadError(f"cannot read safetensors file {path}: {error}") from error
    elif suffix in PICKLE_SUFFIXES:
        data = _torch_load_weights_only(path, device)
    else:
        raise ModelLoadError(unknown_extension_message(path, "checkpoint"))

    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not contain a state dict (got {type(data).__name__})")
    import torch

    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelLoadError(f"{path} contains no tensors")
    return tensors


def _torch_load_weights_only(path: Path, device: Any = "cpu"):
    import pickle

    import torch

    class _InertPickleGlobal:
        """Stand-in for harmless metadata classes referenced by old Lightning checkpoints."""

        def __init__(self, *args, **kwargs):
            pass

    allowed = [(_InertPickleGlobal, name) for name in _INERT_PICKLE_GLOBALS]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelLoadError(
            f"refusing to load {path}: it cannot be unpickled as weights only ({_unpickling_reason(error)}). "
            "A pickle that needs more than tensors could run arbitrary code, so it is not loaded; "
            "if you trust the file, convert it to .safetensors in a separate environment."
        ) from error
    except Exception as error:
        raise ModelLoadError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from error


def _unpickling_reason(error: Exception) -> str:
    """The specific part of torch's weights-only failure message (drops its generic advice)."""
    specific = []
    for line in str(error).splitlines():
        line = line.strip()
        if "WeightsUnpickler error: " in line:
            line = line.split("WeightsUnpickler error: ", 1)[1]
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
        if line and not line.startswith(boilerplate):
            specific.append(line)
    return (" ".join(specific) or type(error).__name__)[:400]


def convert(conversion, what: str, path: Path) -> dict:
    """`conversion()` (a key-map from the original layout); its failure is a ModelLoadError naming the file."""
    try:
        return conversion()
    except Exception as error:
        raise ModelLoadError(
            f"could not convert the {what} weights of {path} from the original layout: "
            f"{type(error).__name__}: {error}"
        ) from error


def instantiate(build, weights, what: str, source: Path, described_by: str, device=None, dtype=None):
    """Build a model with empty (meta) parameters from its config, then assign the file's weights,
    cast to `dtype` (default float32) on `device` (default: where the weights are), so the model
    is never initialised at random nor copied twice.

    `weights` is a {key: tensor} dict in the model's own key spelling, or a callable that makes
    one from the built model. Keys and shapes are checked first so a mismatch is a clear error.
    """
    import torch
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            model = build()
    except Exception as error:
        raise ModelLoadError(f"could not build the {what} from {described_by}: {error}") from error
    state_dict = weights(model) if callable(weights) else weights

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = [
        f"{k}: file {tuple(state_dict[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or reshaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if reshaped:
            problems.append(f"{len(reshaped)} of another shape (e.g. {reshaped[:3]})")
        raise ModelLoadError(
            f"the {what} weights in {source} do not match the architecture described by {described_by}: "
            + "; ".join(problems)
            + ". Pass a config_dir whose configs belong to this checkpoint's architecture."
        )
    dtype = dtype or torch.float32
    tensors = {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device)).contiguous()
        for k, v in state_dict.items()
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ModelLoadError(f"the {what} from {source} has uninitialised parameters: {leftover[:3]}")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# VAE override
# ---------------------------------------------------------------------------------------------

_VAE_TOP_LEVEL = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def load_vae_override(vae_path: Path, base_vae_config: dict | None, place: Placement):
    import torch

    if not vae_path.exists():
        raise ModelLoadError(f"VAE not found: {vae_path}")
    if vae_path.is_dir():
        if (vae_path / "config.json").is_file():
            return load_vae_folder(vae_path, place)
        if (vae_path / "vae" / "config.json").is_file():
            return load_vae_folder(vae_path / "vae", place)
        raise ModelLoadError(f"{vae_path} is not a diffusers AutoencoderKL folder (no config.json or vae/config.json)")
    if vae_path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(unknown_extension_message(vae_path, "VAE"))
    if base_vae_config is None:
        raise ModelLoadError(
            f"cannot load the single-file VAE {vae_path}: the base model has no vae/config.json to describe it"
        )
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    checkpoint = _vae_state_dict(read_checkpoint(vae_path, device=place.map_location), vae_path)
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in checkpoint):
        converted = checkpoint  # already diffusers-format (e.g. diffusion_pytorch_model.safetensors)
    else:
        converted = convert(lambda: convert_ldm_vae_checkpoint(checkpoint, base_vae_config), "VAE", vae_path)
    return instantiate(
        lambda: AutoencoderKL.from_config(base_vae_config), converted, "VAE", vae_path, "the base model's VAE config",
        place.device, torch.float32,
    )


def _vae_state_dict(checkpoint: dict, path: Path) -> dict:
    """Bare encoder/decoder/quant_conv keys of a VAE file; drops loss.*, model_ema.* and the rest."""
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix + "encoder.") for k in checkpoint):
            checkpoint = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
            break
    kept = {k: v for k, v in checkpoint.items() if k.startswith(_VAE_TOP_LEVEL)}
    if not kept:
        raise ModelLoadError(f"{path} holds no VAE weights (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*)")
    return kept


# ---------------------------------------------------------------------------------------------
# Noise scheduler, misc
# ---------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error


def unknown_extension_message(path: Path, what: str) -> str:
    return (
        f"{what} {path} has an unsupported extension {path.suffix!r}: expected a diffusers folder, "
        f"a .safetensors file or a .ckpt/.pt/.pth file"
    )


def stay_offline() -> None:
    """Every load passes local_files_only=True; the env vars also cover libraries imported later."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
