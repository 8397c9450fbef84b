"""Model families (docs/model-families.md): `ModelSpec`, the model that travels, and the family registry.

Everything that differs between Stable Diffusion families (SD1.5, SDXL) lives behind one `Family` object per
family (tifactory.families.base); this module names them and says which model is meant. It imports no torch
(the Snakefile imports it while it parses the DAG); `family_named` imports a family's module on first use.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, dataclass, fields

from tifactory.errors import TifactoryError

# family name -> "module:class"; a third family is one new module and one line here
FAMILIES: dict[str, str] = {
    "sd15": "tifactory.families.sd15:SD15",
}


class FamilyError(TifactoryError, ValueError):
    """An unknown family name, or a ModelSpec that cannot be read back."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model as jobs, rules' params and the GPU worker's cache key name it.

    `path`: a diffusers folder or a single file; `config_dir`: a diffusers folder whose configs and
    tokenizers describe a single file ("" = the family's shipped ones); `vae`: a VAE override ("" = the
    model's own); `family`: a FAMILIES name, detected from the model by tifactory.training.model_check,
    never a config key of its own. Paths are kept as given (strings)."""

    path: str
    family: str
    config_dir: str = ""
    vae: str = ""

    def __post_init__(self):
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, item.name, os.fspath(value))
            elif not isinstance(value, str):
                raise FamilyError(f"ModelSpec.{item.name} must be a string or path, got {type(value).__name__}")
        if self.family not in FAMILIES:
            raise FamilyError(f"unknown model family {self.family!r} (known: {', '.join(FAMILIES)})")
        if not self.path:
            raise FamilyError("ModelSpec.path is empty")

    @property
    def name(self) -> str:
        """The model's file or folder name (for logs, titles and the embedding's metadata)."""
        return os.path.basename(self.path.rstrip("/"))

    def as_params(self) -> dict[str, str]:
        """The plain dict a Snakemake `params:` entry holds (what changes it reruns the job)."""
        return asdict(self)

    @classmethod
    def from_params(cls, params) -> "ModelSpec":
        """Back from `as_params` (a dict or Snakemake's Namedlist-like mapping)."""
        params = dict(params)
        unknown = set(params) - {item.name for item in fields(cls)}
        if unknown:
            raise FamilyError(f"not a ModelSpec: unknown field(s) {sorted(unknown)}")
        return cls(**params)


def family_named(name: str):
    """The Family object of a FAMILIES name (imports its module, which imports no torch at import time)."""
    try:
        module_name, class_name = FAMILIES[name].split(":")
    except KeyError:
        raise FamilyError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None
    return getattr(importlib.import_module(module_name), class_name)()


def load_model(spec: ModelSpec, *, device=None, unet_dtype=None):
    """`spec`'s family loads it: tifactory.families.base.Components on `device` (None = the CPU)."""
    return family_named(spec.family).load(spec, device=device, unet_dtype=unet_dtype)
