"""The SDXL base architecture configs and both tokenizers shipped in `resources/sdxl/`.

A single-file SDXL checkpoint (`sd_xl_base_1.0.safetensors` and its finetunes: Pony, Illustrious, ...)
holds weights only; these files describe it, so it loads offline with an empty Hugging Face cache. The
layout is a diffusers SDXL folder without weights (model_index.json, unet/, vae/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/). `base_model_config` overrides the folder.

Where each value comes from: SDXL base 1.0 as published in diffusers format, compared with public copies of
the same numbers (kohya sd-scripts' SDXL UNet constants, other projects' config copies) and pinned by the
module sizes they build (tests/training/test_sdxl_resources.py: UNet 2,567,463,684 and bigG 694,659,840
parameters):

* UNet: 320/640/1280, 2 resnets per level, transformer depths 1/2/10, heads 5/10/20 of 64 channels,
  linear projections, cross-attention 2048 wide (768 CLIP-L + 1280 bigG), `addition_embed_type`
  `text_time` with 256-wide Fourier features of the six size numbers, so the added embedding's input is
  1280 (pooled bigG) + 6 x 256 = 2816 (`projection_class_embeddings_input_dim`).
* VAE: SD's 128/256/512/512 autoencoder with `scaling_factor` 0.13025 and `force_upcast` (it overflows
  in fp16).
* text_encoder: CLIP ViT-L/14's text tower (12 x 768, 12 heads, quick-GELU), as SD1.5's.
* text_encoder_2: OpenCLIP ViT-bigG/14's text tower as `CLIPTextModelWithProjection` (32 x 1280, 20 heads,
  GELU, 5120 MLP, a 1280 x 1280 projection without bias).
* scheduler: Euler discrete, scaled-linear betas 0.00085-0.012, epsilon, leading spacing.

One deliberate difference from the published text encoder configs: they say `bos_token_id` 0,
`eos_token_id` 2, `pad_token_id` 1 (CLIP's placeholder ids), and with `eos_token_id` 2 transformers pools
a CLIPTextModelWithProjection at argmax(token id), which is a new placeholder token's position once one is
added. The shipped configs name the real ids (49406 / 49407; pad 49407 for CLIP-L and 0 = "!" for bigG, as
each tokenizer pads), so transformers pools at the first end-of-text token, as kohya, A1111/Forge and
ComfyUI do. tifactory does not rely on that: `tifactory.families.sdxl_text.pooled_at_eos` pools at the
end-of-text token whatever the config says (a real diffusers SDXL folder keeps its eos id 2).

Both tokenizers have CLIP's vocabulary (generated from OpenAI's BPE merges as resources/sd15/'s is, by
`resources/sdxl/make_resources.py`); tokenizer_2 pads with "!" (id 0) instead of <|endoftext|>, as the
SDXL repository's tokenizer_2 does.

Import cost: standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path

from tifactory import REPO_ROOT
from tifactory.errors import TifactoryError
from tifactory.training import sd15

SDXL_DIR = REPO_ROOT / "resources" / "sdxl"

CLIP_L_WIDTH = 768
CLIP_G_WIDTH = 1280
CROSS_ATTENTION_WIDTH = CLIP_L_WIDTH + CLIP_G_WIDTH  # 2048
TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)
ADDITION_TIME_EMBED_DIM = 256
POOLED_WIDTH = CLIP_G_WIDTH
LATENT_SCALE = 0.13025
TOKENIZER_2_PAD = "!"

SCHEDULER_CONFIG: dict = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

UNET_CONFIG: dict = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": CROSS_ATTENTION_WIDTH,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": POOLED_WIDTH + TIME_IDS * ADDITION_TIME_EMBED_DIM,  # 2816
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_embedding_type": "positional",
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

VAE_CONFIG: dict = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": LATENT_SCALE,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_BOS_ID, _EOS_ID = sd15.VOCAB_SIZE - 2, sd15.VOCAB_SIZE - 1  # 49406, 49407

_TEXT_COMMON: dict = {
    "attention_dropout": 0.0,
    "bos_token_id": _BOS_ID,
    "dropout": 0.0,
    "eos_token_id": _EOS_ID,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": sd15.MODEL_MAX_LENGTH,
    "model_type": "clip_text_model",
    "vocab_size": sd15.VOCAB_SIZE,
}

TEXT_ENCODER_CONFIG: dict = {
    "architectures": ["CLIPTextModel"],
    **_TEXT_COMMON,
    "hidden_act": "quick_gelu",
    "hidden_size": CLIP_L_WIDTH,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": _EOS_ID,
    "projection_dim": CLIP_L_WIDTH,
}

TEXT_ENCODER_2_CONFIG: dict = {
    "architectures": ["CLIPTextModelWithProjection"],
    **_TEXT_COMMON,
    "hidden_act": "gelu",
    "hidden_size": CLIP_G_WIDTH,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 0,  # "!"
    "projection_dim": CLIP_G_WIDTH,
}

MODEL_INDEX: dict = {
    "_class_name": "StableDiffusionXLPipeline",
    "feature_extractor": [None, None],
    "force_zeros_for_empty_prompt": True,
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

CONFIG_FILES: dict[str, dict] = {
    "model_index.json": MODEL_INDEX,
    "unet/config.json": UNET_CONFIG,
    "vae/config.json": VAE_CONFIG,
    "text_encoder/config.json": TEXT_ENCODER_CONFIG,
    "text_encoder_2/config.json": TEXT_ENCODER_2_CONFIG,
    "scheduler/scheduler_config.json": SCHEDULER_CONFIG,
}

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
REQUIRED_FILES = tuple(name for name in CONFIG_FILES if name != "model_index.json") + tuple(
    f"{folder}/{name}" for folder in ("tokenizer", "tokenizer_2") for name in TOKENIZER_FILES
)


class SDXLResourceError(TifactoryError, RuntimeError):
    """The shipped SDXL files are missing or not what they should be."""


def config_dir() -> Path:
    """The shipped SDXL config folder; a clear error when an install left it out."""
    missing = [name for name in REQUIRED_FILES if not (SDXL_DIR / name).is_file()]
    if missing:
        raise SDXLResourceError(
            f"the shipped SDXL configs are incomplete in {SDXL_DIR} (missing {missing}); reinstall tifactory "
            "from its repository (pip install -e .) or set base_model_config to a diffusers SDXL folder"
        )
    return SDXL_DIR


def json_text(data: dict) -> str:
    """A config file's text as written to resources/sdxl/ (2-space indent, trailing newline)."""
    return json.dumps(data, indent=2) + "\n"


def tokenizer_2_settings_files() -> dict[str, str]:
    """tokenizer_2's special_tokens_map.json and tokenizer_config.json: CLIP-L's, padding with "!"."""
    files = {}
    for name, text in sd15.tokenizer_settings_files().items():
        data = json.loads(text)
        data["pad_token"] = TOKENIZER_2_PAD
        files[name] = json.dumps(data, indent=2) + "\n"
    return files


def resource_files(source_gz: bytes) -> dict[str, str]:
    """relative path -> text of every file under resources/sdxl/ that make_resources.py generates, from
    the gzipped CLIP BPE file (see tifactory.training.sd15.tokenizer_files)."""
    tokenizer = sd15.tokenizer_files(source_gz)
    files = {name: json_text(data) for name, data in CONFIG_FILES.items()}
    files.update({f"tokenizer/{name}": text for name, text in tokenizer.items()})
    tokenizer_2 = {**tokenizer, **tokenizer_2_settings_files()}
    files.update({f"tokenizer_2/{name}": text for name, text in tokenizer_2.items()})
    return files
