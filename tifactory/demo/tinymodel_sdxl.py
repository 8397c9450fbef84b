"""A tiny, randomly initialised SDXL-shaped model for tests and dry runs.

`build_tiny_sdxl_model` writes a diffusers-format SDXL folder (model_index.json, unet/, vae/,
text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/) that
`StableDiffusionXLPipeline.from_pretrained` loads fully offline. What textual inversion on SDXL sees is
SDXL's: a CLIPTextModel 768 wide and a CLIPTextModelWithProjection 1280 wide (so an embedding is
`clip_l` [n, 768] + `clip_g` [n, 1280]), a UNet that cross-attends to their 2048-wide concatenation and
takes `addition_embed_type: text_time` (pooled 1280-wide text embedding + six size numbers), a VAE that
downsamples by 8 into 4 latent channels with SDXL's scaling factor 0.13025, SDXL's noise schedule, and
tokenizer_2 padding with "!". Everything else is shrunk (two text layers each, a two-level UNet whose
attention level has two transformer layers, as SDXL's deeper levels do) so the folder builds in a few
seconds on a CPU.

Heavy imports (torch, diffusers, transformers) happen inside the functions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tifactory.demo import tinymodel
from tifactory.families import sdxl_resources

TEXT_LAYERS = 2
TEXT_INTERMEDIATE = 256
TEXT_HEADS = 4
ADDITION_TIME_EMBED_DIM = 8  # SDXL's is 256; only the sum below has to agree with the UNet's input layer


def tiny_sdxl_unet_config() -> dict:
    """The tiny UNet's config (keyword arguments of UNet2DConditionModel)."""
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "transformer_layers_per_block": (1, 2),
        "attention_head_dim": 4,  # diffusers' legacy name: 4 heads
        "cross_attention_dim": sdxl_resources.CROSS_ATTENTION_WIDTH,
        "use_linear_projection": True,
        "norm_num_groups": 32,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": sdxl_resources.POOLED_WIDTH
        + sdxl_resources.TIME_IDS * ADDITION_TIME_EMBED_DIM,
    }


def tiny_sdxl_vae_config() -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,  # 4 levels -> downsampling factor 8
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 16, 32, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 1024,
        "scaling_factor": sdxl_resources.LATENT_SCALE,
        "force_upcast": True,
    }


def tiny_text_config(*, second: bool, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    """CLIPTextConfig of the tiny CLIP-L (second=False) or bigG-shaped encoder (second=True)."""
    from transformers import CLIPTextConfig

    width = sdxl_resources.CLIP_G_WIDTH if second else sdxl_resources.CLIP_L_WIDTH
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        max_position_embeddings=tinymodel.MODEL_MAX_LENGTH,
        hidden_act="gelu" if second else "quick_gelu",
        projection_dim=width,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def save_text_encoder(model, out_dir: Path) -> None:
    """config.json + model.safetensors with the `text_model.` key spelling diffusers SDXL folders use
    (transformers 5 saves CLIPTextModel without it and loads both spellings)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    state = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        full = key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"
        state[full] = tensor.detach().contiguous()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def write_tiny_tokenizers(work: Path) -> tuple[Path, Path]:
    """tokenizer/ (the demo's tiny CLIP BPE, padding with <|endoftext|>) and tokenizer_2/ (the same
    vocabulary, padding with "!")."""
    first = tinymodel.write_tiny_tokenizer(work / "tokenizer")
    second = tinymodel.write_tiny_tokenizer(work / "tokenizer_2")
    for name, text in sdxl_resources.tokenizer_2_settings_files().items():
        (second / name).write_text(text, encoding="utf-8")
    return first, second


def build_tiny_sdxl_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SDXL-shaped diffusers folder to `out_dir` and return its path.

    Weights are deterministic for a given `seed`. The folder is assembled beside `out_dir` and renamed
    into place at the end (an interrupted build leaves nothing half-written); an existing `out_dir` is
    replaced.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        first_dir, second_dir = write_tiny_tokenizers(work)
        tokenizer = CLIPTokenizer.from_pretrained(first_dir, local_files_only=True)
        tokenizer_2 = CLIPTokenizer.from_pretrained(second_dir, local_files_only=True)
        ids = dict(vocab_size=len(tokenizer), bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
        with torch.no_grad():
            torch.manual_seed(seed)
            text = CLIPTextModel(tiny_text_config(second=False, pad_id=tokenizer.pad_token_id, **ids))
            save_text_encoder(text.eval(), work / "text_encoder")
            torch.manual_seed(seed + 3)
            text_2 = CLIPTextModelWithProjection(
                tiny_text_config(second=True, pad_id=tokenizer_2.pad_token_id, **ids))
            save_text_encoder(text_2.eval(), work / "text_encoder_2")
            torch.manual_seed(seed + 1)
            UNet2DConditionModel(**tiny_sdxl_unet_config()).save_pretrained(work / "unet", safe_serialization=True)
            torch.manual_seed(seed + 2)
            AutoencoderKL(**tiny_sdxl_vae_config()).save_pretrained(work / "vae", safe_serialization=True)
        scheduler = {k: v for k, v in sdxl_resources.SCHEDULER_CONFIG.items() if not k.startswith("_")}
        EulerDiscreteScheduler.from_config(scheduler).save_pretrained(work / "scheduler")

        import diffusers

        index = {"_class_name": sdxl_resources.MODEL_INDEX["_class_name"], "_diffusers_version": diffusers.__version__,
                 **{k: v for k, v in sdxl_resources.MODEL_INDEX.items() if not k.startswith("_")}}
        (work / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

        umask = os.umask(0)
        os.umask(umask)
        for path in [work, *work.rglob("*")]:
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out_dir
