"""Random-weight models of SD1.5's full architecture, saved as A1111-style single files, for tests.

`write_sd15_checkpoint` builds the UNet, VAE and text encoder from the shipped configs (resources/sd15/),
renames their weights to the original single-file layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.text_model.*`, with tifactory.demo.tinymodel's diffusers->LDM maps, which
tests/training/test_models.py checks against the loader) and writes them as one file, like
v1-5-pruned-emaonly.safetensors. `write_vae_ckpt` writes a VAE alone as a weights-only `.ckpt` with bare
`encoder.*`/`decoder.*` keys, like vae-ft-mse-840000-ema-pruned.ckpt.
"""

from __future__ import annotations

from pathlib import Path


def _sd15_modules(seed: int):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tifactory.training import sd15

    folder = sd15.config_dir()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    return unet, vae, text_encoder


def _cast(state: dict, dtype) -> dict:
    return {key: (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
            .detach().contiguous() for key, tensor in state.items()}


def write_sd15_checkpoint(path: str | Path, *, seed: int = 0, dtype=None) -> Path:
    """A random SD1.5 (860M UNet, 84M VAE, 123M CLIP text encoder) in the original single-file layout."""
    import torch

    from tifactory.demo.tinymodel import text_encoder_diffusers_to_ldm, unet_diffusers_to_ldm, vae_diffusers_to_ldm

    path = Path(path)
    with torch.no_grad():
        unet, vae, text_encoder = _sd15_modules(seed)
        state = unet_diffusers_to_ldm(unet.state_dict(), unet.config)
        del unet
        state.update(vae_diffusers_to_ldm(vae.state_dict(), vae.config))
        state.update(text_encoder_diffusers_to_ldm(text_encoder.state_dict()))
        state = _cast(state, dtype)
    _save(path, state)
    return path


def write_vae_ckpt(path: str | Path, *, seed: int = 1, dtype=None) -> Path:
    """A random SD1.5 VAE as a bare-key (`encoder.*`, `decoder.*`, `quant_conv.*`) state dict."""
    import torch
    from diffusers import AutoencoderKL

    from tifactory.training import sd15
    from tifactory.demo.tinymodel import vae_diffusers_to_ldm

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sd15.config_dir() / "vae"))
    state = {key.removeprefix("first_stage_model."): tensor
             for key, tensor in vae_diffusers_to_ldm(vae.state_dict(), vae.config).items()}
    _save(Path(path), _cast(state, dtype))
    return Path(path)


def _save(path: Path, state: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state}, path)
