"""SDXL single files in the original (Stability AI generative-models) layout <-> diffusers state dicts.

The layout of `sd_xl_base_1.0.safetensors` and the finetunes that share it:

| prefix | module |
| --- | --- |
| `model.diffusion_model.` | UNet (LDM names; the size/pooled-text embedding is `label_emb.0.0` / `label_emb.0.2`) |
| `first_stage_model.` | VAE (LDM names; mid-block attention as 1x1 convolutions) |
| `conditioner.embedders.0.transformer.text_model.` | CLIP ViT-L/14 in transformers' own names (+ `embeddings.position_ids`) |
| `conditioner.embedders.1.model.` | OpenCLIP ViT-bigG/14 text tower: `token_embedding.weight`, `positional_embedding`, `transformer.resblocks.N.{ln_1, attn.in_proj_weight/in_proj_bias (q, k, v stacked), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, `text_projection`, `logit_scale` |

`text_projection` is OpenCLIP's matrix applied as `x @ text_projection` ([width, projection_dim]); the
diffusers / transformers `text_projection.weight` of CLIPTextModelWithProjection is a Linear weight
([projection_dim, width], applied as `x @ weight.T`), so one is the other's transpose. diffusers'
`convert_open_clip_checkpoint` transposes it. Some tools save `conditioner.embedders.1.model.
text_projection.weight` instead, already in the Linear orientation (ComfyUI's loader transposes that one
back for its own `x @ P`); it is taken as it is. `tests/training/test_sdxl_single_file.py` checks that the
converted model's `text_embeds` equal OpenCLIP's `ln_final(x)[eos] @ text_projection` computed from the file.

Original -> diffusers (`original_to_diffusers`) uses diffusers' own converters (offline: they only rename
and split tensors; the configs come from resources/sdxl/ or `base_model_config`). diffusers -> original
(`diffusers_to_original`) is the reverse map, used to write test files (`save_sdxl_single_file`,
`write_random_sdxl_single_file`). `load_sdxl_single_file` builds the four modules from a file, offline.

Import cost: standard library only at import time.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tifactory.fileio import atomic_path

try:  # the family seam (branch seam) moves the SD1.5 loader's shared pieces to tifactory.families.loading
    from tifactory.families.loading import ModelLoadError, read_checkpoint
except ImportError:  # main before that merge
    from tifactory.training.models import ModelLoadError, read_checkpoint

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "conditioner.embedders.0.transformer."
TEXT_2_PREFIX = "conditioner.embedders.1.model."
POSITION_IDS_KEY = TEXT_PREFIX + "text_model.embeddings.position_ids"
LOGIT_SCALE_KEY = TEXT_2_PREFIX + "logit_scale"
OPENCLIP_LOGIT_SCALE = math.log(1 / 0.07)  # OpenCLIP's initial value; not used by SDXL

_ADD_EMBEDDING = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


# --------------------------------------------------------------------------------------------- diffusers -> original

def text_model_keys(state_dict: dict) -> dict:
    """A CLIP text model's state dict in diffusers' `text_model.*` spelling (transformers >= 5.6 saves
    CLIPTextModel without the prefix); the non-persistent position_ids buffer is dropped."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):
            continue
        out[key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"] = tensor
    return out


def unet_to_original(state_dict: dict, config) -> dict:
    """diffusers SDXL UNet -> `model.diffusion_model.*` (LDM names; add_embedding -> label_emb.0)."""
    from tifactory.demo.tinymodel import unet_diffusers_to_ldm

    added, rest = {}, {}
    for key, tensor in state_dict.items():
        for old, new in _ADD_EMBEDDING.items():
            if key.startswith(old):
                added[UNET_PREFIX + new + key[len(old):]] = tensor
                break
        else:
            rest[key] = tensor
    if len(added) != 4:
        raise ValueError(f"the UNet has {len(added)} add_embedding tensors, SDXL's text_time embedding has 4")
    return {**unet_diffusers_to_ldm(rest, config), **added}


def text_encoder_to_original(state_dict: dict, max_positions: int) -> dict:
    """CLIP-L -> `conditioner.embedders.0.transformer.text_model.*`, with the position_ids buffer the
    original files carry."""
    import torch

    out = {TEXT_PREFIX + key: tensor for key, tensor in text_model_keys(state_dict).items()}
    out[POSITION_IDS_KEY] = torch.arange(max_positions, dtype=torch.int64)[None, :]
    return out


def text_encoder_2_to_original(state_dict: dict) -> dict:
    """CLIPTextModelWithProjection (bigG) -> OpenCLIP's `conditioner.embedders.1.model.*`: q/k/v stacked
    into in_proj, text_projection transposed, logit_scale added."""
    import torch

    state = text_model_keys(state_dict)
    out: dict = {}
    stacked: dict[tuple[int, str], dict[str, Any]] = {}
    for key, tensor in state.items():
        if key in _OPENCLIP_TOP:
            out[TEXT_2_PREFIX + _OPENCLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            out[TEXT_2_PREFIX + "text_projection"] = tensor.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            stacked.setdefault((int(m[1]), m[3]), {})[m[2]] = tensor
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            if m[2] not in _OPENCLIP_LAYER_PARTS:
                raise ValueError(f"text encoder 2 key {key!r} has no OpenCLIP counterpart")
            out[f"{TEXT_2_PREFIX}transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER_PARTS[m[2]]}.{m[3]}"] = tensor
        else:
            raise ValueError(f"text encoder 2 key {key!r} has no OpenCLIP counterpart")
    for (layer, kind), parts in stacked.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"text encoder 2 layer {layer} lacks some of q/k/v {kind}")
        out[f"{TEXT_2_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]])
    out[LOGIT_SCALE_KEY] = torch.tensor(OPENCLIP_LOGIT_SCALE)
    return out


def diffusers_to_original(unet: dict, unet_config, vae: dict, vae_config, text: dict, text_2: dict,
                          max_positions: int = 77) -> dict:
    """The four diffusers state dicts -> one original-layout SDXL state dict."""
    from tifactory.demo.tinymodel import vae_diffusers_to_ldm

    out = unet_to_original(unet, unet_config)
    out.update(vae_diffusers_to_ldm(vae, vae_config))
    out.update(text_encoder_to_original(text, max_positions))
    out.update(text_encoder_2_to_original(text_2))
    return out


# --------------------------------------------------------------------------------------------- original -> diffusers

def original_to_diffusers(checkpoint: dict, unet_config: dict, vae_config: dict | None, text_2_config,
                          *, release: bool = False) -> dict[str, dict]:
    """An original-layout SDXL state dict -> {"unet", "vae", "text_encoder", "text_encoder_2"} state dicts
    in diffusers' key spelling (text encoders as `text_model.*`, `text_projection.weight`), with diffusers'
    own converters. `vae_config` None skips the VAE. `release=True` removes each part's tensors from
    `checkpoint` once converted, so a caller that builds modules part by part holds one copy at a time."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    def part(prefix: str) -> dict:
        keys = [key for key in checkpoint if key.startswith(prefix)]
        return {key: (checkpoint.pop(key) if release else checkpoint[key]) for key in keys}

    out = {"unet": convert_ldm_unet_checkpoint(part(UNET_PREFIX), unet_config)}
    vae = part(VAE_PREFIX)
    if vae_config is not None:
        out["vae"] = convert_ldm_vae_checkpoint(vae, vae_config)
    text = convert_ldm_clip_checkpoint(part(TEXT_PREFIX))
    out["text_encoder"] = {key: tensor for key, tensor in text.items() if not key.endswith("position_ids")}
    holder = SimpleNamespace(config=text_2_config)
    text_2 = part(TEXT_2_PREFIX)
    linear = text_2.pop(TEXT_2_PREFIX + "text_projection.weight", None)  # some tools save it as a Linear weight
    out["text_encoder_2"] = convert_open_clip_checkpoint(holder, text_2, prefix=TEXT_2_PREFIX)
    if linear is not None and "text_projection.weight" not in out["text_encoder_2"]:
        out["text_encoder_2"]["text_projection.weight"] = linear
    return out


# --------------------------------------------------------------------------------------------- loading

@dataclass
class SDXLModules:
    """What an SDXL single file holds, built offline: [CLIP-L, bigG] tokenizers and text encoders, the UNet,
    the VAE (None when skipped), and the scheduler and VAE configs of the describing folder."""

    tokenizers: list
    text_encoders: list
    unet: Any
    vae: Any
    scheduler_config: dict
    vae_config: dict


class SDXLCheckpointError(ModelLoadError):
    """An SDXL single file whose tensors do not fit the configs that describe it."""


def assign_weights(build, state_dict: dict, what: str, *, dtype=None, device=None):
    """Build a module with empty (meta) parameters, then assign `state_dict` (diffusers spelling; adapted to
    the module's own), cast to `dtype` on `device`; missing, unexpected or reshaped keys are one error."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    expected = model.state_dict()
    if not any(key.startswith("text_model.") for key in expected):
        state_dict = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = [f"{key}: file {tuple(state_dict[key].shape)} vs config {tuple(expected[key].shape)}"
                for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    if missing or unexpected or reshaped:
        raise SDXLCheckpointError(f"the {what} weights do not match the config describing them (set "
                                  f"base_model_config to this model's diffusers folder): {len(missing)} missing "
                                  f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                                  f"{len(reshaped)} of another shape {reshaped[:3]}")
    dtype = dtype or torch.float32
    tensors = {key: (value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device=device))
               for key, value in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def load_sdxl_single_file(path: str | Path, config_dir: str | Path | None = None, *, device=None,
                          unet_dtype=None, text_dtype=None, skip_vae: bool = False) -> SDXLModules:
    """Build the SDXL modules of an original-layout single file (.safetensors, or .ckpt read weights-only),
    offline, described by `config_dir` (default: resources/sdxl/). The UNet is built in `unet_dtype`, the
    text encoders in `text_dtype`, the VAE in float32 (each default float32). The file's tensors are released
    part by part as each module is built."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from tifactory.families import sdxl_resources

    folder = Path(config_dir) if config_dir else sdxl_resources.config_dir()
    unet_config = dict(UNet2DConditionModel.load_config(folder / "unet"))
    vae_config = dict(AutoencoderKL.load_config(folder / "vae"))
    text_config = CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True)
    text_2_config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2", local_files_only=True)
    tokenizers = [CLIPTokenizer.from_pretrained(folder / name, local_files_only=True)
                  for name in ("tokenizer", "tokenizer_2")]
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))

    checkpoint = read_checkpoint(path, device=device or "cpu")
    missing = [prefix for prefix in (UNET_PREFIX, TEXT_PREFIX, TEXT_2_PREFIX) + (() if skip_vae else (VAE_PREFIX,))
               if not any(key.startswith(prefix) for key in checkpoint)]
    if missing:
        raise SDXLCheckpointError(f"{path} is not an SDXL single file: no {', '.join(p + '*' for p in missing)} keys")
    try:
        parts = original_to_diffusers(checkpoint, unet_config, None if skip_vae else vae_config, text_2_config,
                                      release=True)
    except (KeyError, IndexError, ValueError, RuntimeError) as error:
        raise SDXLCheckpointError(f"{path} does not fit the configs in {folder}: converting it failed "
                                  f"({type(error).__name__}: {error})") from error
    del checkpoint
    text_dtype = text_dtype or torch.float32
    unet = assign_weights(lambda: UNet2DConditionModel.from_config(unet_config), parts.pop("unet"), "UNet",
                          dtype=unet_dtype, device=device)
    text = assign_weights(lambda: CLIPTextModel(text_config), parts.pop("text_encoder"), "text encoder",
                          dtype=text_dtype, device=device)
    text_2 = assign_weights(lambda: CLIPTextModelWithProjection(text_2_config), parts.pop("text_encoder_2"),
                            "text encoder 2", dtype=text_dtype, device=device)
    vae = None
    if not skip_vae:
        vae = assign_weights(lambda: AutoencoderKL.from_config(vae_config), parts.pop("vae"), "VAE",
                             dtype=torch.float32, device=device)
    return SDXLModules(tokenizers=tokenizers, text_encoders=[text, text_2], unet=unet, vae=vae,
                       scheduler_config=scheduler_config, vae_config=vae_config)


# --------------------------------------------------------------------------------------------- writing

def save_sdxl_single_file(model_dir: str | Path, out_file: str | Path, *, dtype=None) -> Path:
    """An SDXL diffusers folder (e.g. the tiny one) -> one original-layout .safetensors file, atomically;
    `dtype` (e.g. torch.float16) casts floating-point weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_dir = Path(model_dir)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", local_files_only=True)
    text = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", local_files_only=True)
    text_2 = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2", local_files_only=True)
    state = diffusers_to_original(unet.state_dict(), unet.config, vae.state_dict(), vae.config, text.state_dict(),
                                  text_2.state_dict(), text.config.max_position_embeddings)
    state = {key: (tensor.detach().to(dtype) if dtype is not None and tensor.is_floating_point()
                   else tensor.detach()).contiguous().clone() for key, tensor in state.items()}
    with atomic_path(out_file) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return Path(out_file)


def original_layout_shapes(config_dir: str | Path | None = None) -> dict:
    """key -> meta tensor (shape, dtype) of the original-layout file the configs describe (no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tifactory.families import sdxl_resources

    folder = Path(config_dir) if config_dir else sdxl_resources.config_dir()
    unet_config = dict(UNet2DConditionModel.load_config(folder / "unet"))
    vae_config = dict(AutoencoderKL.load_config(folder / "vae"))
    text_config = CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text = CLIPTextModel(text_config)
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2",
                                                                             local_files_only=True))
    return diffusers_to_original(unet.state_dict(), unet_config, vae.state_dict(), vae_config, text.state_dict(),
                                 text_2.state_dict(), text_config.max_position_embeddings)


_SAFETENSORS_DTYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "int64": "I64"}


def write_random_sdxl_single_file(out_file: str | Path, config_dir: str | Path | None = None, *, seed: int = 0,
                                  dtype: str = "float16", device: str = "cpu") -> Path:
    """Write a random original-layout SDXL file of the architecture `config_dir` describes (default: SDXL
    base, ~6.9 GB in fp16), streaming one tensor at a time (memory: the largest tensor). Weights are
    N(0, 1/fan_in), norm scales 1 + N(0, 0.01^2), biases N(0, 0.01^2), so a forward pass stays finite.
    `device` draws the numbers there (a GPU draws SDXL's 3.5 B in seconds; another device, other numbers)."""
    import torch

    shapes = original_layout_shapes(config_dir)
    float_dtype = getattr(torch, dtype)
    entries, offset = {}, 0
    for key in sorted(shapes):
        meta = shapes[key]
        kind = "int64" if key == POSITION_IDS_KEY else dtype
        size = math.prod(meta.shape) * (8 if kind == "int64" else torch.finfo(float_dtype).bits // 8)
        entries[key] = {"dtype": _SAFETENSORS_DTYPE[kind], "shape": list(meta.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    generator = torch.Generator(device).manual_seed(seed)
    with atomic_path(out_file) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        for key in sorted(shapes):
            tensor = random_tensor(key, tuple(shapes[key].shape), generator)
            tensor = tensor if key == POSITION_IDS_KEY else tensor.to(float_dtype)
            handle.write(tensor.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return Path(out_file)


def random_tensor(key: str, shape: tuple, generator):
    """One tensor of a random SDXL file (see write_random_sdxl_single_file), float32 (position ids int64)."""
    import torch

    device = generator.device
    if key == POSITION_IDS_KEY:
        return torch.arange(shape[-1], dtype=torch.int64, device=device)[None, :]
    if key == LOGIT_SCALE_KEY:
        return torch.full(shape, OPENCLIP_LOGIT_SCALE, device=device)
    values = torch.randn(shape, generator=generator, device=device)
    if len(shape) >= 2:
        return values / math.sqrt(math.prod(shape[1:]))
    if key.endswith(".weight"):  # 1-D weights are norm scales
        return 1 + 0.01 * values
    return 0.01 * values
