"""Loading a test model through its family (tifactory.families): the tiny test models are SD1.5-shaped."""

from __future__ import annotations

from tifactory.families import ModelSpec, load_model


def sd15_spec(path, *, config_dir="", vae="") -> ModelSpec:
    return ModelSpec(path=path, family="sd15", config_dir=config_dir or "", vae=vae or "")


def load_sd15(path, *, config_dir="", vae="", device=None, unet_dtype=None):
    """An SD1.5 model (folder or single file) as SD15.load loads it."""
    return load_model(sd15_spec(path, config_dir=config_dir, vae=vae), device=device, unet_dtype=unet_dtype)
