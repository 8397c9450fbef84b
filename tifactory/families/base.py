"""`Family`: what a Stable Diffusion model family knows, with SD1.5's behaviour as the base class.

One object per family (tifactory.families.FAMILIES names them); plain inputs and outputs, no state of its own.
Training (tifactory.training.train) and sampling (tifactory.sampling) ask it for everything that differs
between families: loading, the text side (tokenizers and text encoders, a list), the trainable placeholder
vectors (one tensor per encoder), the UNet's conditioning and call, prompt embeddings for the sample grid, the
embedding file's tensors, the noise schedule and the latent scale. Everything else is family-neutral.

A family with two text encoders and size conditioning (SDXL) subclasses SD1.5 and overrides: `load`'s text
parts, `encode_text` (hidden states of both encoders + a pooled output), `extra_conditioning` (time ids),
`predict_noise` (added_cond_kwargs), `embedding_tensors`/`read_vectors`, `latent_scale`,
`native_resolution` and `pipeline`.

Import cost: no torch at import time.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from tifactory.errors import TifactoryError

logger = logging.getLogger(__name__)


class PlaceholderError(TifactoryError, ValueError):
    """The subject's tokens or init word cannot be set up in the model's tokenizers."""


@dataclass
class Components:
    """A loaded model: one tokenizer per text encoder (lists, in the family's encoder order), the VAE, the UNet
    and the DDPM noise scheduler the family trains with."""

    tokenizers: list
    text_encoders: list
    vae: Any  # diffusers.AutoencoderKL
    unet: Any  # diffusers.UNet2DConditionModel
    noise_scheduler: Any  # diffusers.DDPMScheduler

    @property
    def tokenizer(self):
        """The first encoder's tokenizer (the only one of a one-encoder family such as SD1.5)."""
        return self.tokenizers[0]

    @property
    def text_encoder(self):
        """The first text encoder (the only one of a one-encoder family such as SD1.5)."""
        return self.text_encoders[0]


class Conditioning(NamedTuple):
    """What the UNet is conditioned on: the text encoders' hidden states [n, tokens, width]; a pooled text
    embedding [n, width] and the size-conditioning time ids [n, 6] for families that use them (else None).
    A NamedTuple, so a compiled model call takes it as it is."""

    hidden_states: Any
    pooled: Any = None
    time_ids: Any = None


@dataclass(frozen=True)
class SampleSize:
    """One training sample's sizes, (height, width) in pixels: the image before resizing, the top-left corner
    of its crop in the resized image, and the bucket (target) size; SDXL conditions on them."""

    original: tuple[int, int]
    crop_top_left: tuple[int, int]
    target: tuple[int, int]


class Family:
    """SD1.5's behaviour; subclasses set the identity constants and `load`, and override what differs."""

    name: str = ""
    architecture: str = ""  # the embedding file's modelspec.architecture
    title: str = ""  # for messages ("Stable Diffusion 1.5")
    native_resolution: int = 0
    latent_scale: float = 0.0  # the VAE latents' scaling factor (when the VAE's config lacks one)
    noise_schedule: dict = {}  # the family's training noise schedule; fills in what a scheduler config omits

    # ------------------------------------------------------------------ loading

    def load(self, spec, *, device=None, unet_dtype=None) -> Components:
        """`spec` (a ModelSpec) loaded offline onto `device` (None = the CPU), the UNet in `unet_dtype`
        (None = float32), text encoders and VAE in float32."""
        raise NotImplementedError(f"{type(self).__name__} does not define load")

    def noise_scheduler(self, config: dict | None):
        """A DDPMScheduler from a model's scheduler config (any sampler's), the family's schedule filling in
        what it leaves out; a value that differs from the family's is logged."""
        from diffusers import DDPMScheduler

        merged = dict(self.noise_schedule)
        merged.update({k: v for k, v in (config or {}).items() if not k.startswith("_")})
        accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
        merged = {k: v for k, v in merged.items() if k in accepted}
        merged["clip_sample"] = False
        for key, expected in self.noise_schedule.items():
            if merged.get(key) != expected:
                logger.warning("noise scheduler %s=%r differs from %s's %r", key, merged.get(key), self.name,
                               expected)
        return DDPMScheduler.from_config(merged)

    def vae_dtype(self, compute_dtype):
        """The dtype training encodes latents in: float32 (kohya's no_half_vae), whatever the compute dtype."""
        import torch

        return torch.float32

    def scaling_factor(self, vae) -> float:
        """The latents' scale: the VAE config's scaling_factor (as diffusers' pipelines use it), else the
        family's `latent_scale`."""
        return float(getattr(vae.config, "scaling_factor", None) or self.latent_scale)

    # ------------------------------------------------------------------ the trainable placeholder vectors

    def add_placeholders(self, components: Components, token_strings: list[str], init_word: str,
                         log: Callable[[str], None]) -> list:
        """Add `token_strings` to every tokenizer (the same ids in each) and route each text encoder's rows
        for them to a trainable fp32 tensor initialised from the init word's rows of that encoder. Returns the
        trainable tensors, one per encoder, in encoder order."""
        vectors, first_ids = [], []
        for tokenizer, text_encoder in zip(components.tokenizers, components.text_encoders):
            if tokenizer.add_tokens(token_strings) != len(token_strings):
                raise PlaceholderError(f"could not add tokens {token_strings} to the tokenizer")
            ids = tokenizer.convert_tokens_to_ids(token_strings)
            if ids != list(range(ids[0], ids[0] + len(ids))):
                raise PlaceholderError(f"placeholder token ids are not contiguous: {ids}")
            init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
            if not init_ids:
                raise PlaceholderError(f"init word {init_word!r} encodes to no tokens")
            init_ids = spread_init_ids(init_ids, len(token_strings), log if not first_ids else lambda _: None)
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            base_embedding = text_encoder.get_input_embeddings()
            initial = base_embedding.weight[init_ids].detach().clone().float()
            embedding = make_placeholder_embedding(base_embedding, ids[0], initial)
            text_encoder.set_input_embeddings(embedding)
            vectors.append(embedding.vectors)
            first_ids.append(ids[0])
        if len(set(first_ids)) != 1:
            raise PlaceholderError(f"the tokenizers gave the new tokens different ids ({first_ids}); their "
                                   "vocabularies differ")
        return vectors

    def placeholder_vectors(self, components: Components) -> list:
        """The trainable tensors `add_placeholders` installed, one per encoder."""
        return [encoder.get_input_embeddings().vectors for encoder in components.text_encoders]

    # ------------------------------------------------------------------ conditioning and the UNet call

    def tokenize(self, components: Components, prompts: list[str]) -> list:
        """Token ids [len(prompts), max_length] per tokenizer, padded as each tokenizer pads."""
        return [tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids for tokenizer in components.tokenizers]

    def encode_text(self, components: Components, ids_per_encoder: list) -> Conditioning:
        """SD1.5: the text encoder's last hidden state [n, 77, 768]."""
        return Conditioning(components.text_encoders[0](ids_per_encoder[0])[0])

    def extra_conditioning(self, conditioning: Conditioning, sizes) -> Conditioning:
        """Inputs besides the text (SDXL: time ids from the samples' sizes, a [n, 6] tensor of original
        size, crop top-left, target size). SD1.5 has none: `conditioning` as it is."""
        return conditioning

    def predict_noise(self, unet, noisy_latents, timesteps, conditioning: Conditioning):
        """The UNet's noise prediction."""
        return unet(noisy_latents, timesteps, conditioning.hidden_states).sample

    # ------------------------------------------------------------------ sampling

    def pipeline(self, components: Components, scheduler):
        """The diffusers pipeline that renders sample grids from prompt embeddings."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
            unet=components.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    def prompt_embeddings(self, components: Components, ids_per_encoder: list, weights) -> dict:
        """The pipeline's keyword arguments for one prompt: `ids_per_encoder` [1, max_length] per tokenizer
        (the trigger words' rows already in the encoders), `weights` [max_length] A1111's per-token weights.
        SD1.5: the weighted last hidden state as `prompt_embeds` (callers prefix `negative_` for the negative
        prompt)."""
        from tifactory.sampling.prompts import apply_weights

        hidden = components.text_encoders[0](ids_per_encoder[0])[0]
        return {"prompt_embeds": apply_weights(hidden, weights.to(hidden.dtype))}

    # ------------------------------------------------------------------ the embedding file

    def embedding_tensors(self, vectors: list) -> dict:
        """The embedding file's tensors from the trained vectors (one [n, dim] per encoder). SD1.5: the one
        tensor under the format's key (owned by tifactory.training.embedding)."""
        from tifactory.training.embedding import EMBEDDING_KEY

        return {EMBEDDING_KEY: vectors[0]}

    def read_vectors(self, path) -> list:
        """The per-encoder vectors ([n, dim] each) of an embedding file, read leniently (other trainers'
        layouts too) by the format's owner, tifactory.training.embedding."""
        from tifactory.training.embedding import read_embedding

        return [read_embedding(path).vectors]


# ---------------------------------------------------------------------------------------------
# The trainable rows of a token embedding
# ---------------------------------------------------------------------------------------------


def make_placeholder_embedding(base_embedding, first_placeholder_id: int, initial_vectors):
    """Token embedding whose rows >= first_placeholder_id come from a small trainable tensor."""
    return placeholder_embedding_class()(base_embedding, first_placeholder_id, initial_vectors)


_PLACEHOLDER_EMBEDDING: list = []


def placeholder_embedding_class():
    """The PlaceholderEmbedding class, made once per process (torch is imported lazily): one class for every
    subject and encoder, so a process that trains several subjects (the GPU worker, tifactory.worker) reuses the
    compiled step instead of tracing it again for each subject's new module (dynamo guards on the module's
    type)."""
    if _PLACEHOLDER_EMBEDDING:
        return _PLACEHOLDER_EMBEDDING[0]
    import torch

    class PlaceholderEmbedding(torch.nn.Module):
        def __init__(self, base_embedding, first_placeholder_id: int, initial_vectors):
            super().__init__()
            self.register_buffer("base_weight", base_embedding.weight.detach().clone(), persistent=False)
            self.vectors = torch.nn.Parameter(initial_vectors.detach().clone().float())
            self.first_placeholder_id = first_placeholder_id
            self.embedding_dim = self.base_weight.shape[1]
            self.num_embeddings = self.base_weight.shape[0]

        @property
        def weight(self):  # what transformers reads for dtype/device
            return self.base_weight

        def forward(self, input_ids):
            embeds = torch.nn.functional.embedding(input_ids, self.base_weight)
            is_placeholder = (input_ids >= self.first_placeholder_id).unsqueeze(-1)
            placeholder_index = (input_ids - self.first_placeholder_id).clamp(min=0)
            trained = self.vectors.to(embeds.dtype)[placeholder_index]
            return torch.where(is_placeholder, trained, embeds)

    _PLACEHOLDER_EMBEDDING.append(PlaceholderEmbedding)
    return PlaceholderEmbedding


def spread_init_ids(init_ids: list[int], num_vectors: int, log: Callable[[str], None]) -> list[int]:
    """Map the init word's token ids onto num_vectors vectors (repeat or truncate, with a warning)."""
    if len(init_ids) == num_vectors:
        return list(init_ids)
    log(f"warning: init word has {len(init_ids)} token(s) for {num_vectors} vector(s); "
        f"{'repeating' if len(init_ids) < num_vectors else 'truncating'} its tokens")
    return [init_ids[index % len(init_ids)] for index in range(num_vectors)]
