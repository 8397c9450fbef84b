"""`TrainSettings`: one subject's training recipe (config.yaml's `train:` section, demo and roster overrides
applied), frozen. Its defaults live in config.yaml and workflow/schemas/config.schema.yaml only.

Import cost: standard library only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from tifactory.errors import TifactoryError


class TrainSettingsError(TifactoryError, ValueError):
    """A training recipe with missing, unknown or impossible settings."""


@dataclass(frozen=True)
class TrainSettings:
    """The kohya textual-inversion recipe (train_textual_inversion.py flags) and tifactory's run settings."""

    num_vectors: int
    init_word: str
    template: str
    optimizer: str
    learning_rate: float
    lr_scheduler: str
    lr_warmup_steps: int
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    weight_decay: float
    max_grad_norm: float
    train_batch_size: int
    gradient_accumulation_steps: int
    micro_batch_size: int
    max_train_steps: int
    mixed_precision: str
    autocast: bool
    save_precision: str
    seed: int
    cache_latents: bool
    flip_aug: bool
    resolution: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    noise_offset: float
    min_snr_gamma: float
    attention: str
    compile: object  # auto | a bool | a torch.compile mode name
    compile_scope: str
    save_every_n_steps: int
    device: str

    def __post_init__(self):
        checks = [(self.num_vectors >= 1, f"num_vectors must be >= 1, got {self.num_vectors}"),
                  (bool(self.init_word.strip()), "init_word is empty (the roster's class word fills it in)"),
                  (self.max_train_steps >= 1, f"max_train_steps must be >= 1, got {self.max_train_steps}"),
                  (self.save_every_n_steps >= 1, f"save_every_n_steps must be >= 1, got {self.save_every_n_steps}"),
                  (self.micro_batch_size >= 1, f"micro_batch_size must be >= 1, got {self.micro_batch_size}"),
                  (self.train_batch_size >= 1 and self.gradient_accumulation_steps >= 1,
                   "train_batch_size and gradient_accumulation_steps must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise TrainSettingsError(f"bad training setting: train.{message}")

    @classmethod
    def from_config(cls, train: dict, **overrides) -> "TrainSettings":
        """From one subject's `train` section (config.yaml's, with demo and roster overrides merged:
        tifactory.roster.train_params) and keyword overrides."""
        values = {**train, **overrides}
        names = [item.name for item in fields(cls)]
        unknown = sorted(set(values) - set(names))
        missing = [name for name in names if name not in values]
        if unknown or missing:
            raise TrainSettingsError(f"training settings: unknown {unknown}, missing {missing} (config.yaml's train "
                                     "section lists them all)")
        return cls(**{name: values[name] for name in names})

    @property
    def samples_per_step(self) -> int:
        return self.train_batch_size * self.gradient_accumulation_steps

    def as_dict(self) -> dict:
        return asdict(self)

    def as_json(self) -> str:
        """The recipe as the embedding's metadata and the resume fingerprint record it (sorted keys)."""
        return json.dumps(self.as_dict(), sort_keys=True)
