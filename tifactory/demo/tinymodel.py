"""A tiny, randomly initialised Stable Diffusion 1.5-shaped model for tests and dry runs.

`build_tiny_model` writes a diffusers-format folder (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/) that `StableDiffusionPipeline.from_pretrained` loads fully offline. The
shapes that matter to textual inversion match SD1.5: the text encoder's hidden size is 768 (so a
learned embedding is `[n, 768]`), the UNet cross-attends to 768-wide states, the VAE downsamples by 8
into 4 latent channels, and the noise schedule is SD1.5's. Everything else is shrunk so the whole
folder is a few tens of MB and builds in seconds on a CPU.

`save_single_file` turns such a diffusers folder (or any SD1.5 diffusers folder) into the original
CompVis/LDM single-file layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`) so single-file loading can be tested without real checkpoints.

Heavy imports (torch, diffusers, transformers) happen inside the functions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from tifactory.fileio import atomic_path
from tifactory.training import sd15

# ---------------------------------------------------------------------------------------------
# Constants shared with tests and the rest of the package
# ---------------------------------------------------------------------------------------------

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
TEXT_HIDDEN_SIZE = 768

# SD1.5's scheduler (PNDM, as shipped in the SD1.5 diffusers repo): the noise schedule is what
# training needs; the sampler family only matters for the pipeline.
SD15_SCHEDULER_CONFIG: dict = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# Words that must be single tokens: textual-inversion "object"/"style" template words and the
# words of typical sample prompts. CLIP's pre-tokenizer splits "close-up" into "close", "-", "up".
TOKENIZER_WORDS: tuple[str, ...] = tuple(
    """
    a an the of my one in on with and at by for to from is
    photo photograph picture rendering rendition painting style portrait drawing sketch
    cropped close up clean dirty dark bright good nice small large weird cool
    woman man person people girl boy child face headshot selfie body
    smiling smile wearing sitting standing walking looking holding posing
    beach studio lighting light city street oil park garden forest mountain mountains snow
    night sunset day background outdoors indoors room window office kitchen cafe
    red white black blue green yellow pink purple brown gray golden
    dress shirt suit jacket hat glasses hair long short coffee cup table chair
    professional high quality detailed realistic photorealistic cinematic natural soft sharp focus
    art digital pencil watercolor anime illustration young old happy serious front view side full
    """.split()
)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2/CLIP scheme).

    Printable Latin-1 bytes stand for themselves; the others (control characters, space, ...) are
    shifted to code points from 256 upwards, in byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1))
    printable |= set(range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1))
    alphabet = []
    shifted = 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


def _learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is one symbol (classic BPE training, deterministic ties).

    Because the merges are learned on exactly these words, applying them by rank (as the CLIP
    tokenizer does) reproduces the training segmentation: each word ends up as one token.
    """
    segmentations = {w: [*w[:-1], w[-1] + "</w>"] for w in sorted(set(words)) if len(w) > 1}
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter = Counter()
        for symbols in segmentations.values():
            counts.update(zip(symbols, symbols[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        for word, symbols in segmentations.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(joined)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segmentations[word] = merged


def write_tiny_tokenizer(out_dir: str | Path, words: tuple[str, ...] = TOKENIZER_WORDS) -> Path:
    """Write a CLIPTokenizer-loadable folder (vocab.json, merges.txt, configs) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for word in words:
        if not re.fullmatch(r"[a-z]+", word):
            raise ValueError(f"tokenizer words must be lowercase ASCII letters, got {word!r}")
    alphabet = _byte_alphabet()
    merges = _learn_merges(words)
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:  # a merge can re-create a token already in the vocab; keep the first id
        vocab.setdefault(token, len(vocab))

    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text(sd15.merges_text(merges), encoding="utf-8")
    for name, text in sd15.tokenizer_settings_files().items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return out_dir


# ---------------------------------------------------------------------------------------------
# Tiny model
# ---------------------------------------------------------------------------------------------


def _tiny_unet(torch_seed: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(torch_seed)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        # Cross-attention on the half-resolution level only (plus the mid block): cheap at 512 px.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=4,  # diffusers' legacy name: 4 heads per attention layer
        norm_num_groups=32,
    )


def _tiny_vae(torch_seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(torch_seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 levels -> downsampling factor 8
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
        scaling_factor=0.18215,
    )


def _tiny_text_encoder(torch_seed: int, vocab_size: int, bos_id: int, eos_id: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(torch_seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN_SIZE,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(config).eval()


def _save_text_encoder(model, out_dir: Path) -> None:
    """Save config + weights, with the `text_model.` key prefix that SD1.5's own folder uses.

    transformers 5 saves a CLIPTextModel without that prefix (it flattened the class) but loads
    both spellings; the prefixed one is what older transformers and other tools expect.
    """
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    state = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        full_key = key if key.startswith("text_model.") else f"text_model.{key}"
        state[full_key] = tensor.detach().contiguous()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SD1.5-shaped diffusers folder to `out_dir` and return its path.

    Weights are deterministic for a given `seed`. The folder is assembled beside `out_dir` and
    renamed into place at the end, so an interrupted build leaves no half-written model behind;
    an existing `out_dir` is replaced.
    """
    import torch
    from diffusers import PNDMScheduler
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        tokenizer_dir = write_tiny_tokenizer(work / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        _check_tokenizer(tokenizer)

        with torch.no_grad():
            text_encoder = _tiny_text_encoder(
                seed, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
            )
            _save_text_encoder(text_encoder, work / "text_encoder")
            _tiny_unet(seed + 1).save_pretrained(work / "unet", safe_serialization=True)
            _tiny_vae(seed + 2).save_pretrained(work / "vae", safe_serialization=True)
        PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG).save_pretrained(work / "scheduler")

        model_index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": _diffusers_version(),
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (work / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n", encoding="utf-8")

        _normal_permissions(work)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _normal_permissions(root: Path) -> None:
    """mkdtemp/safetensors create owner-only entries; give the folder the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _check_tokenizer(tokenizer) -> None:
    bad = [w for w in TOKENIZER_WORDS if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if bad:
        raise RuntimeError(f"tiny tokenizer splits words that should be single tokens: {bad}")


# ---------------------------------------------------------------------------------------------
# diffusers folder -> original SD1.5 (CompVis/LDM) single file
# ---------------------------------------------------------------------------------------------

_UNET_FIXED = {
    "time_embedding.linear_1.weight": "time_embed.0.weight",
    "time_embedding.linear_1.bias": "time_embed.0.bias",
    "time_embedding.linear_2.weight": "time_embed.2.weight",
    "time_embedding.linear_2.bias": "time_embed.2.bias",
    "conv_in.weight": "input_blocks.0.0.weight",
    "conv_in.bias": "input_blocks.0.0.bias",
    "conv_norm_out.weight": "out.0.weight",
    "conv_norm_out.bias": "out.0.bias",
    "conv_out.weight": "out.2.weight",
    "conv_out.bias": "out.2.bias",
}

_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _unet_resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _UNET_RESNET_PARTS:
        raise KeyError(rest)
    return f"{_UNET_RESNET_PARTS[head]}.{tail}"


def unet_diffusers_to_ldm(state_dict: dict, config) -> dict:
    """Rename a diffusers UNet2DConditionModel state dict to LDM `model.diffusion_model.*` keys.

    Handles the SD1.x UNet family (any number of levels, int `layers_per_block`, down/up blocks
    with or without cross-attention). The attention sub-modules keep their names (LDM's
    SpatialTransformer and diffusers' Transformer2DModel agree), only their prefixes move.
    """
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError("only an int layers_per_block (SD1.x) is supported")
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict = {}
    for key, tensor in state_dict.items():
        if key in _UNET_FIXED:
            new = _UNET_FIXED[key]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            b, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + b * (per_block + 1) + j}.0.{_unet_resnet_rest(rest)}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            b, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + b * (per_block + 1) + j}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            b, rest = int(m[1]), m[2]
            new = f"input_blocks.{1 + b * (per_block + 1) + per_block}.0.op.{rest}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            j, rest = int(m[1]), m[2]
            new = f"middle_block.{0 if j == 0 else 2}.{_unet_resnet_rest(rest)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            b, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{b * (per_block + 1) + j}.0.{_unet_resnet_rest(rest)}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            b, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{b * (per_block + 1) + j}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b, rest = int(m[1]), m[2]
            slot = 2 if up_has_attention[b] else 1
            new = f"output_blocks.{b * (per_block + 1) + per_block}.{slot}.conv.{rest}"
        else:
            raise ValueError(f"UNet key {key!r} has no SD1.x (LDM) counterpart")
        out[f"model.diffusion_model.{new}"] = tensor
    return out


_VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def vae_diffusers_to_ldm(state_dict: dict, config) -> dict:
    """Rename a diffusers AutoencoderKL state dict to LDM `first_stage_model.*` keys.

    LDM's VAE attention uses 1x1 convolutions, so the q/k/v/proj_out weights get two trailing
    singleton dimensions; the decoder's levels are numbered in the opposite order.
    """
    levels = len(config["up_block_types"])
    out: dict = {}
    for key, tensor in state_dict.items():
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\..+|(post_)?quant_conv\..+", key):
            new = key
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level = levels - 1 - int(m[1])
            new = f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            part = _VAE_ATTENTION_PARTS.get(m[2])
            if part is None:
                raise ValueError(f"VAE key {key!r} has no SD1.x (LDM) counterpart")
            new = f"{m[1]}.mid.attn_1.{part}.{m[3]}"
            if m[3] == "weight" and part != "norm" and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        else:
            raise ValueError(f"VAE key {key!r} has no SD1.x (LDM) counterpart")
        out[f"first_stage_model.{new}"] = tensor
    return out


def text_encoder_diffusers_to_ldm(state_dict: dict, max_positions: int = MODEL_MAX_LENGTH) -> dict:
    """Prefix a CLIPTextModel state dict as `cond_stage_model.transformer.text_model.*`.

    Accepts both the flattened (transformers >= 5.6) and the `text_model.`-prefixed spelling, and
    adds the `position_ids` buffer that original SD1.5 checkpoints carry.
    """
    import torch

    out: dict = {}
    for key, tensor in state_dict.items():
        bare = key.removeprefix("text_model.")
        if bare.endswith("position_ids"):
            continue
        out[f"cond_stage_model.transformer.text_model.{bare}"] = tensor
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
        max_positions, dtype=torch.int64
    )[None, :]
    return out


def save_single_file(model_dir: str | Path, out_file: str | Path, *, dtype=None) -> Path:
    """Convert an SD1.x diffusers folder into one original-layout (CompVis/LDM) checkpoint file.

    `.safetensors` -> a flat safetensors file; `.ckpt`/`.pt`/`.pth` -> `torch.save({"state_dict": ...})`.
    `dtype` (e.g. torch.float16) casts floating-point weights; default keeps them as loaded (fp32).
    The file is written atomically.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    model_dir, out_file = Path(model_dir), Path(out_file)
    suffix = out_file.suffix.lower()
    if suffix not in {".safetensors", ".ckpt", ".pt", ".pth"}:
        raise ValueError(f"unsupported single-file extension {suffix!r} (use .safetensors or .ckpt)")

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", local_files_only=True)

    state: dict = {}
    state.update(unet_diffusers_to_ldm(unet.state_dict(), unet.config))
    state.update(vae_diffusers_to_ldm(vae.state_dict(), vae.config))
    state.update(
        text_encoder_diffusers_to_ldm(
            text_encoder.state_dict(), text_encoder.config.max_position_embeddings
        )
    )
    for key, tensor in state.items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous().clone()

    with atomic_path(out_file) as tmp:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt"})
        else:
            torch.save({"state_dict": state}, tmp)
    return out_file
