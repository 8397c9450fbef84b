"""Load a Stable Diffusion 1.5 base model (diffusers folder or original single file), offline.

`load_components` returns the five pieces textual-inversion training needs: by default on the CPU in
float32; with `device` (and `unet_dtype`) the weights are read straight onto that device, the UNet in
its compute dtype (no random initialisation, no whole model built on the CPU first, no float32 UNet on
the way). The base model may be

* a diffusers-format folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/);
* one `.safetensors` file in the original SD1.x (CompVis/LDM) layout;
* one `.ckpt`/`.pt`/`.pth` file in that layout, read with `torch.load(weights_only=True)` so a
  pickle that would run code is refused.

A single file carries weights only: the configs and the tokenizer come from `config_dir` when given
(config key `base_model_config`: a local diffusers-format folder of the same architecture; only its
*.json/*.txt files are read), else from SD1.5's configs and CLIP tokenizer shipped in resources/sd15/
(tifactory.training.sd15). Nothing is ever fetched from the network.

Import cost: this module imports no torch/diffusers/transformers at import time (the Snakefile
imports the package while it parses the DAG).
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

# SD1.5's training noise schedule; fills in whatever a scheduler config leaves out.
SD15_NOISE_SCHEDULE: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}

# Globals that old PyTorch-Lightning SD1.x checkpoints reference as plain metadata (the class is a
# dict key in ckpt["callbacks"]); they are mapped to an inert stand-in, never imported.
_INERT_PICKLE_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)

_CONFIG_DIR_REQUIRED = (
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer",
)


class ModelLoadError(TifactoryError):
    """The base model, VAE or config folder is missing, unreadable, unsafe or of the wrong shape."""


@dataclass
class Components:
    tokenizer: Any  # transformers.CLIPTokenizer
    text_encoder: Any  # transformers.CLIPTextModel
    vae: Any  # diffusers.AutoencoderKL
    unet: Any  # diffusers.UNet2DConditionModel
    noise_scheduler: Any  # diffusers.DDPMScheduler


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def load_components(
    base_model: str | Path,
    *,
    vae: str | Path | None = None,
    config_dir: str | Path | None = None,
    device: Any = None,
    unet_dtype: Any = None,
) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler, offline.

    `device` (a torch.device or its name; default: the CPU) is where every weight is placed as it is
    read; `unet_dtype` (default float32) is the UNet's dtype. The text encoder and the VAE are always
    float32 (small: the caller casts them where it wants), so the text encoder's token embeddings, from
    which new tokens are initialised, keep the file's precision.

    `vae` optionally replaces the base model's VAE: a diffusers AutoencoderKL folder (or a
    pipeline folder with vae/), or a single original-layout VAE file (e.g.
    vae-ft-mse-840000-ema-pruned.ckpt / .safetensors). `config_dir` describes a single-file
    `base_model` (see the module docstring); without it the shipped SD1.5 configs do.
    """
    _stay_offline()
    base = Path(base_model)
    if not base.exists():
        raise ModelLoadError(f"base model not found: {base}")
    place = Placement.of(device, unet_dtype)
    if base.is_dir():
        loaded = load_folder(base, skip_vae=vae is not None, place=place)
    elif base.suffix.lower() in SINGLE_FILE_SUFFIXES:
        loaded = _load_single_file(base, config_dir, skip_vae=vae is not None, place=place)
    else:
        raise ModelLoadError(_unknown_extension_message(base, "base model"))

    if vae is not None:
        loaded["vae"] = _load_vae_override(Path(vae), loaded["vae_config"], place=place)
    return Components(
        tokenizer=loaded["tokenizer"],
        text_encoder=loaded["text_encoder"],
        vae=loaded["vae"],
        unet=loaded["unet"],
        noise_scheduler=_noise_scheduler(loaded["scheduler_config"]),
    )


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


# ---------------------------------------------------------------------------------------------
# Diffusers folder
# ---------------------------------------------------------------------------------------------


def load_folder(base: Path, *, skip_vae: bool, place: Placement) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    required = ["unet", "text_encoder", "tokenizer"] + ([] if skip_vae else ["vae"])
    missing = [name for name in required if not (base / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{base} is not a diffusers Stable Diffusion folder: missing sub-folder(s) {missing} "
            "(expected model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    out: dict = {"tokenizer": _load_tokenizer(base)}
    out["text_encoder"] = _guarded(
        "text encoder",
        base / "text_encoder",
        lambda: CLIPTextModel.from_pretrained(
            base,
            subfolder="text_encoder",
            local_files_only=True,
            dtype=torch.float32,
            variant=_variant(base / "text_encoder", "model"),
            device_map=place.device_map(),
        ),
    )
    out["unet"] = _guarded(
        "UNet",
        base / "unet",
        lambda: UNet2DConditionModel.from_pretrained(
            base,
            subfolder="unet",
            local_files_only=True,
            torch_dtype=place.unet_dtype,
            variant=_variant(base / "unet", "diffusion_pytorch_model"),
            device_map=place.device_map(),
        ),
    )
    if (base / "vae" / "config.json").is_file():
        out["vae_config"] = dict(AutoencoderKL.load_config(base / "vae", local_files_only=True))
    else:
        out["vae_config"] = None
    out["vae"] = None if skip_vae else _load_vae_folder(base / "vae", place)
    out["scheduler_config"] = _read_json(base / "scheduler" / "scheduler_config.json")
    for module in (out["text_encoder"], out["unet"]):
        module.eval()
    return out


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return _guarded(
        "tokenizer",
        folder / "tokenizer",
        lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
    )


def _load_vae_folder(folder: Path, place: Placement):
    import torch
    from diffusers import AutoencoderKL

    vae = _guarded(
        "VAE",
        folder,
        lambda: AutoencoderKL.from_pretrained(
            folder,
            local_files_only=True,
            torch_dtype=torch.float32,
            variant=_variant(folder, "diffusion_pytorch_model"),
            device_map=place.device_map(),
        ),
    )
    return vae.eval()


def _variant(folder: Path, stem: str) -> str | None:
    """'fp16' when a folder only has fp16-variant weights (e.g. `model.fp16.safetensors`)."""
    standard = [f"{stem}.safetensors", f"{stem}.bin", f"{stem}.safetensors.index.json", f"{stem}.bin.index.json"]
    if any((folder / name).exists() for name in standard):
        return None
    fp16 = [f"{stem}.fp16.safetensors", f"{stem}.fp16.bin", f"{stem}.safetensors.index.fp16.json"]
    if any((folder / name).exists() for name in fp16):
        return "fp16"
    return None


def _guarded(what: str, where: Path, load):
    try:
        return load()
    except ModelLoadError:
        raise
    except Exception as error:  # the libraries raise OSError, ValueError, EnvironmentError, ...
        raise ModelLoadError(f"could not load the {what} from {where}: {type(error).__name__}: {error}") from error


# ---------------------------------------------------------------------------------------------
# Original-layout single file
# ---------------------------------------------------------------------------------------------


def _load_single_file(path: Path, config_dir: str | Path | None, *, skip_vae: bool, place: Placement) -> dict:
    import torch

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = resolve_config_dir(config_dir, path)  # before reading a multi-GB file
    unet_config = _guarded("UNet config", cfg / "unet", lambda: dict(UNet2DConditionModel.load_config(cfg / "unet")))
    vae_config = _guarded("VAE config", cfg / "vae", lambda: dict(AutoencoderKL.load_config(cfg / "vae")))
    text_config = _guarded(
        "text encoder config",
        cfg / "text_encoder",
        lambda: CLIPTextConfig.from_pretrained(cfg / "text_encoder", local_files_only=True),
    )
    tokenizer = _load_tokenizer(cfg)

    checkpoint = read_checkpoint(path, device=place.map_location)  # conversion runs where the weights go
    _check_sd1_layout(checkpoint, path, need_vae=not skip_vae)
    described_by = f"the configs in {cfg}"
    out: dict = {"tokenizer": tokenizer, "vae_config": vae_config}
    out["unet"] = _instantiate(
        lambda: UNet2DConditionModel.from_config(unet_config),
        _convert(lambda: convert_ldm_unet_checkpoint(checkpoint, unet_config), "UNet", path),
        "UNet",
        path,
        described_by,
        place.device,
        place.unet_dtype,
    )
    out["text_encoder"] = _instantiate(
        lambda: CLIPTextModel(text_config),
        lambda model: _clip_state_dict(checkpoint, wrapped=hasattr(model, "text_model")),
        "text encoder",
        path,
        described_by,
        place.device,
        torch.float32,
    )
    out["vae"] = None
    if not skip_vae:
        out["vae"] = _instantiate(
            lambda: AutoencoderKL.from_config(vae_config),
            _convert(lambda: convert_ldm_vae_checkpoint(checkpoint, vae_config), "VAE", path),
            "VAE",
            path,
            described_by,
            place.device,
            torch.float32,
        )
    out["scheduler_config"] = _read_json(cfg / "scheduler" / "scheduler_config.json")
    return out


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
        raise ModelLoadError(_unknown_extension_message(path, "checkpoint"))

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


def _check_sd1_layout(checkpoint: dict, path: Path, *, need_vae: bool) -> None:
    """The DAG-time verdict (tifactory.training.model_check) again on the loaded tensors: what else the file is."""
    from tifactory.training.model_check import classify_keys

    verdict = classify_keys({key: tuple(tensor.shape) for key, tensor in checkpoint.items()})
    if verdict is not None:
        only = "; only Stable Diffusion 1.x (SD1.5) is supported" if verdict.architecture else ""
        raise ModelLoadError(f"{path} is {verdict.found}{only}")
    if need_vae and not any(k.startswith("first_stage_model.") for k in checkpoint):
        raise ModelLoadError(f"{path} has no VAE weights (first_stage_model.*); pass a separate vae")


def resolve_config_dir(config_dir: str | Path | None, checkpoint_path: Path) -> Path:
    """`config_dir` (config key base_model_config) when given, else the shipped SD1.5 configs."""
    from tifactory.training import sd15

    if config_dir is None:
        try:
            folder = sd15.config_dir()
        except sd15.SD15ResourceError as error:
            raise ModelLoadError(str(error)) from None
        logger.info("describing %s with the shipped SD1.5 configs in %s", checkpoint_path, folder)
        return folder
    folder = Path(config_dir)
    missing = _missing_config_parts(folder)
    if missing:
        raise ModelLoadError(
            f"config_dir {folder} is not a usable diffusers Stable Diffusion 1.5 folder: "
            f"missing {missing}"
        )
    return folder


def _missing_config_parts(folder: Path) -> list[str]:
    if not folder.is_dir():
        return [f"the folder itself ({folder} does not exist)"]
    return [part for part in _CONFIG_DIR_REQUIRED if not (folder / part).exists()]


def _convert(convert, what: str, path: Path) -> dict:
    try:
        return convert()
    except Exception as error:
        raise ModelLoadError(
            f"could not convert the {what} weights of {path} from the original layout: "
            f"{type(error).__name__}: {error}"
        ) from error


def _clip_state_dict(checkpoint: dict, wrapped: bool) -> dict:
    """cond_stage_model.transformer[.text_model].* -> the CLIPTextModel's own key spelling."""
    out = {}
    for key, tensor in checkpoint.items():
        if not key.startswith("cond_stage_model.transformer."):
            continue
        bare = key.removeprefix("cond_stage_model.transformer.").removeprefix("text_model.")
        if bare.endswith("position_ids"):
            continue  # a non-persistent buffer in current transformers
        out[f"text_model.{bare}" if wrapped else bare] = tensor
    return out


def _instantiate(build, weights, what: str, source: Path, described_by: str, device=None, dtype=None):
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


def _load_vae_override(vae_path: Path, base_vae_config: dict | None, place: Placement):
    import torch

    if not vae_path.exists():
        raise ModelLoadError(f"VAE not found: {vae_path}")
    if vae_path.is_dir():
        if (vae_path / "config.json").is_file():
            return _load_vae_folder(vae_path, place)
        if (vae_path / "vae" / "config.json").is_file():
            return _load_vae_folder(vae_path / "vae", place)
        raise ModelLoadError(f"{vae_path} is not a diffusers AutoencoderKL folder (no config.json or vae/config.json)")
    if vae_path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(_unknown_extension_message(vae_path, "VAE"))
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
        converted = _convert(lambda: convert_ldm_vae_checkpoint(checkpoint, base_vae_config), "VAE", vae_path)
    return _instantiate(
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


def _noise_scheduler(config: dict | None):
    import inspect

    from diffusers import DDPMScheduler

    merged = dict(SD15_NOISE_SCHEDULE)
    merged.update({k: v for k, v in (config or {}).items() if not k.startswith("_")})
    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    merged = {k: v for k, v in merged.items() if k in accepted}
    merged["clip_sample"] = False
    for key, expected in SD15_NOISE_SCHEDULE.items():
        if merged.get(key) != expected:
            logger.warning("noise scheduler %s=%r differs from SD1.5's %r", key, merged.get(key), expected)
    return DDPMScheduler.from_config(merged)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error


def _unknown_extension_message(path: Path, what: str) -> str:
    return (
        f"{what} {path} has an unsupported extension {path.suffix!r}: expected a diffusers folder, "
        f"a .safetensors file or a .ckpt/.pt/.pth file"
    )


def _stay_offline() -> None:
    """Every load passes local_files_only=True; the env vars also cover libraries imported later."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
