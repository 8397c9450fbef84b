"""A *taught* tiny model: a tiny model of a family (SD1.5- or SDXL-shaped) made to know a few concepts, so
learning shows.

A purely random tiny model cannot show that textual inversion learns: its UNet does not know what it
renders, so no embedding explains its images better than another. This module teaches it, on a CPU
in about a minute:

* the VAE becomes an exact, deterministic autoencoder of 8x8-pixel block colours (weights set in
  closed form, no training): the encoder averages each 8x8 block of R, G, B (and their mean) into
  four latent channels, the decoder paints the blocks back. Its posterior has (near) zero variance
  and the latents times `scaling_factor` (the family's) have zero mean and unit variance per channel
  over the concept images, as real latents have;
* a few **concepts**, each a family of procedurally drawn images (an orange sun on blue, yellow and
  green stripes, a magenta and white checkerboard, a cyan ring on black), each with a hidden
  embedding: per text encoder of the model's family, `num_vectors` random vectors norm-matched to
  that encoder's token embeddings (SD1.5: one [n, 768]; SDXL: [n, 768] for CLIP-L and [n, 1280] for
  bigG);
* the UNet is fine-tuned as a conditional denoiser: an image of concept c, noised, conditioned as the
  family conditions its UNet (tifactory.families: `encode_text`, `extra_conditioning`, `predict_noise`;
  SDXL's pooled embedding at the end-of-text token and its size time ids included) on an
  object-template prompt ("a photo of a {}") whose placeholder tokens carry c's embedding in every
  encoder. Class-word prompts ("a photo of a person") and the empty prompt are taught as the mixture
  of all concepts, so the init word explains no concept well.

Textual inversion on held-out images of one concept then has something to find: the concept's
embedding (or another that conditions the UNet the same way). `recovery_figures` measures how far a
trained embedding got, per encoder. Everything is deterministic for a given seed (CPU, fp32).

Heavy imports (torch, diffusers, transformers, numpy) happen inside the functions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tifactory.fileio import atomic_path

CONCEPTS = ("sun", "stripes", "checker", "ring")
CONCEPTS_FILE = "concepts.safetensors"
TAUGHT_FILE = "taught.json"
# images 0..TEACH_IMAGES-1 of each concept teach the UNet; held-out images start far above them
HELD_OUT_START = 1_000_000
CLASS_WORDS = ("person", "woman", "man")
_K = 100.0  # constant companion channel of the closed-form VAE's group norms (see closed_form_vae)
_GROUP = 4  # channels per group norm group: (signal, -signal, K, -K)


# ----------------------------------------------------------------------------- concept images

def concept_image(concept: str, index: int, size: int):
    """Image `index` of a concept's family as an [size, size, 3] uint8 array (deterministic)."""
    import numpy as np

    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; choose one of {CONCEPTS}")
    rng = np.random.default_rng([CONCEPTS.index(concept), index, 20261202])
    y, x = (np.mgrid[0:size, 0:size].astype(np.float64) + 0.5) / size
    # small variations inside a family: the conditional denoiser learns each concept sharply in few steps
    jitter = rng.uniform(-0.04, 0.04, 3)
    shift = rng.uniform(-0.06, 0.06, 2)
    if concept == "sun":  # an orange disk on dark blue
        radius = rng.uniform(0.22, 0.28)
        on = (x - 0.5 - shift[0]) ** 2 + (y - 0.45 - shift[1]) ** 2 < radius ** 2
        colours = ((0.05, 0.12, 0.45), (1.0, 0.55, 0.08))
    elif concept == "stripes":  # yellow diagonal stripes on green
        angle, period = math.radians(45 + rng.uniform(-8, 8)), rng.uniform(0.36, 0.42)
        on = ((x * math.cos(angle) + y * math.sin(angle)) / period + shift[0]) % 1.0 < 0.5
        colours = ((0.1, 0.55, 0.15), (0.98, 0.9, 0.15))
    elif concept == "checker":  # magenta and white squares
        cell = rng.uniform(0.24, 0.26)
        on = (np.floor(x / cell + shift[0]) + np.floor(y / cell + shift[1])) % 2 == 0
        colours = ((0.8, 0.08, 0.65), (0.96, 0.96, 0.96))
    else:  # ring: a thick cyan ring on black
        radius = rng.uniform(0.25, 0.3)
        on = np.abs(np.sqrt((x - 0.5 - shift[0]) ** 2 + (y - 0.5 - shift[1]) ** 2) - radius) < 0.09
        colours = ((0.04, 0.04, 0.04), (0.1, 0.9, 0.95))
    image = np.where(on[..., None], np.array(colours[1]), np.array(colours[0])) + jitter
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_concept_images(concept: str, out_dir: str | os.PathLike, count: int, size: int,
                         first_index: int = HELD_OUT_START) -> list[Path]:
    """Write `count` held-out images of a concept as PNGs (`<concept>_NNN.png`); return their paths."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        path = out_dir / f"{concept}_{number:03d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(concept_image(concept, first_index + number, size)).save(tmp, format="PNG")
        paths.append(path)
    return paths


def images_to_pixels(images):
    """uint8 [n, H, W, 3] -> float [n, 3, H, W] in [-1, 1] (as training loads images)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack(images).astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- the closed-form VAE

def closed_form_vae(mean, std, scaling_factor: float):
    """An AutoencoderKL whose encoder averages 8x8 blocks of (R, G, B, grey) and decoder paints them back.

    Every ResNet block and attention layer is made an identity (its last projection zeroed), every
    downsampler a 2x2 average, every upsampler a nearest-neighbour copy. The group norms before the
    final SiLU would normalise the signal away; each signal channel s therefore travels in a group
    (s, -s, K, -K) with a large constant K: the group's mean is exactly 0 and its variance is
    K^2/2 up to a relative mean(s^2)/(2 K^2) < 1e-4, and SiLU(u) - SiLU(-u) = u undoes the SiLU
    exactly. `mean` and `std` (per latent channel, of the raw block colours) are folded into the
    1x1 quant convolutions so that latents x scaling_factor have zero mean and unit variance.
    """
    import torch
    from diffusers import AutoencoderKL

    channels = 4 * _GROUP
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(channels,) * 4, layers_per_block=1, latent_channels=4,
        norm_num_groups=channels // _GROUP, sample_size=512, scaling_factor=scaling_factor,
    )
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(1.0)
        # signal of latent channel c: R, G, B, grey (mean of R, G, B)
        mixing = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float32)

        def spread(conv, weights):  # weights [4, in]: centre tap of signal/-signal rows, bias +-K
            for c in range(4):
                conv.weight[_GROUP * c, :, 1, 1] = weights[c]
                conv.weight[_GROUP * c + 1, :, 1, 1] = -weights[c]
                conv.bias[_GROUP * c + 2] = _K
                conv.bias[_GROUP * c + 3] = -_K

        def rescale(norm):  # group norm: signal channels back to their value, K channels to 0
            for c in range(4):
                norm.weight[_GROUP * c: _GROUP * c + 2] = _K / math.sqrt(2.0)
                norm.weight[_GROUP * c + 2: _GROUP * c + 4] = 0.0

        def identity_convs(coder):
            for module in coder.modules():
                if module.__class__.__name__ == "Downsample2D":
                    for ch in range(channels):
                        module.conv.weight[ch, ch, 0:2, 0:2] = 0.25
                elif module.__class__.__name__ == "Upsample2D":
                    for ch in range(channels):
                        module.conv.weight[ch, ch, 1, 1] = 1.0

        encoder, decoder = vae.encoder, vae.decoder
        spread(encoder.conv_in, mixing)
        identity_convs(encoder)
        rescale(encoder.conv_norm_out)
        for c in range(4):  # mean_c = SiLU(s) - SiLU(-s); log-variance: a constant -30 (std ~3e-7)
            encoder.conv_out.weight[c, _GROUP * c, 1, 1] = 1.0
            encoder.conv_out.weight[c, _GROUP * c + 1, 1, 1] = -1.0
            encoder.conv_out.bias[4 + c] = -30.0
            # quant conv: normalise; raw latents = normalised / scaling_factor
            vae.quant_conv.weight[c, c, 0, 0] = 1.0 / (std[c] * scaling_factor)
            vae.quant_conv.bias[c] = -mean[c] / (std[c] * scaling_factor)
            vae.quant_conv.weight[4 + c, 4 + c, 0, 0] = 1.0
            vae.post_quant_conv.weight[c, c, 0, 0] = std[c] * scaling_factor
            vae.post_quant_conv.bias[c] = mean[c]
        spread(decoder.conv_in, torch.eye(4))
        identity_convs(decoder)
        rescale(decoder.conv_norm_out)
        for c in range(3):  # the picture from the R, G, B pairs; grey is not needed to paint
            decoder.conv_out.weight[c, _GROUP * c, 1, 1] = 1.0
            decoder.conv_out.weight[c, _GROUP * c + 1, 1, 1] = -1.0
    return vae.eval()


def block_means(pixels):
    """Raw latent signal (R, G, B, grey averaged over 8x8 blocks) of [n, 3, H, W] pixels."""
    import torch

    grey = pixels.mean(dim=1, keepdim=True)
    return torch.nn.functional.avg_pool2d(torch.cat([pixels, grey], 1), 8)


# ----------------------------------------------------------------------------- concept embeddings

def concept_embeddings(token_embedding_weight, num_vectors: int, seed: int):
    """One [num_vectors, width] random embedding per concept, each row scaled to the mean token-row norm."""
    import torch

    target_norm = token_embedding_weight.float().norm(dim=1).mean()
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn((len(CONCEPTS), num_vectors, token_embedding_weight.shape[1]), generator=generator)
    return vectors / vectors.norm(dim=-1, keepdim=True) * target_norm


def concept_keys(concept: str, num_encoders: int) -> list[str]:
    """The concepts file's tensor names of one concept, one per encoder: the concept's name for a one-encoder
    family (SD1.5), `<concept>.<encoder index>` otherwise."""
    return [concept] if num_encoders == 1 else [f"{concept}.{index}" for index in range(num_encoders)]


def read_concepts(model_dir: str | os.PathLike, num_encoders: int) -> dict[str, list]:
    """The hidden embedding of every concept of a taught model: {concept: [[num_vectors, width] per encoder]}."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(model_dir) / CONCEPTS_FILE))
    return {name: [tensors[key] for key in concept_keys(name, num_encoders)] for name in CONCEPTS}


def square_sizes(count: int, size: int):
    """The sizes (tifactory.training.data.sample_sizes) of `count` uncropped size x size images, a [count, 6]
    long tensor: what a family with size conditioning (SDXL's time ids) sees for the concept images."""
    import torch

    from tifactory.training.data import sample_sizes

    row = sample_sizes(size, size, (size, size), flipped=False)
    return torch.tensor([[*row.original, *row.crop_top_left, *row.target]] * count, dtype=torch.long)


class Conditioner:
    """The family's conditioning (tifactory.families.base.Conditioning: `encode_text`, then
    `extra_conditioning`) of prompts whose placeholder tokens carry given embeddings, one per encoder (no grad).
    Adds the placeholder tokens to `components`' tokenizers and encoders (the family's `add_placeholders`);
    `init_vectors` are the init word's rows, per encoder."""

    def __init__(self, family, components, num_vectors: int, *, init_word: str, image_size: int):
        self.family, self.components, self.image_size = family, components, image_size
        self.tokens = [f"<taught{index}>" for index in range(num_vectors)]
        vectors = family.add_placeholders(components, self.tokens, init_word, lambda message: None)
        self.init_vectors = [tensor.detach().clone() for tensor in vectors]
        self.ids = components.tokenizer.convert_tokens_to_ids(self.tokens)
        self.placeholder = " ".join(self.tokens)

    def positions(self, prompt: str) -> list[int]:
        """Where the placeholder tokens sit in the tokenised `prompt`."""
        ids = self.family.tokenize(self.components, [prompt.format(self.placeholder)])[0][0].tolist()
        return [index for index, token in enumerate(ids) if token in self.ids]

    def encode(self, prompts: list[str], vectors=None, sizes=None):
        """prompts with `{}` for the placeholder; `vectors` (one [num_vectors, width] per encoder) fill the
        placeholder; `sizes` [n, 6] the images' sizes (None: uncropped image_size squares)."""
        import torch

        text = [prompt.format(self.placeholder) for prompt in prompts]
        ids = self.family.tokenize(self.components, text)
        sizes = square_sizes(len(prompts), self.image_size) if sizes is None else sizes
        with torch.no_grad():
            if vectors is not None:
                for trainable, value in zip(self.family.placeholder_vectors(self.components), vectors, strict=True):
                    trainable.copy_(value.float())
            return self.family.extra_conditioning(self.family.encode_text(self.components, ids), sizes)


def _fields(function, *conditionings):
    """A Conditioning whose every present field is function(that field of each of `conditionings`)."""
    return type(conditionings[0])(*(None if fields[0] is None else function(*fields)
                                    for fields in zip(*conditionings)))


def _stack(conditionings):
    import torch

    return _fields(lambda *fields: torch.stack(fields), *conditionings)


# ----------------------------------------------------------------------------- teaching

@dataclass(frozen=True)
class TinyBase:
    """What teaching starts from for a family: the tiny model's builder ("module:function" writing a diffusers
    folder) and what teaching changes in its UNet's config."""

    builder: str
    unet_changes: dict

    def build(self, out_dir: Path, seed: int) -> Path:
        import importlib

        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)(out_dir, seed=seed)

    def module_file(self) -> str:
        import importlib

        return importlib.import_module(self.builder.split(":")[0]).__file__


TINY_BASES = {
    # the tiny SD1.5 UNet gains a pooled-text path into the time embedding (diffusers' addition_embed_type
    # "text"): besides cross-attention, the conditioning then scales and shifts every ResNet block, as class
    # labels do, which a tiny UNet learns to use in a few hundred CPU steps (cross-attention alone takes far longer)
    "sd15": TinyBase("tifactory.demo.tinymodel:build_tiny_model",
                     {"addition_embed_type": "text", "addition_embed_type_num_heads": 12}),
    # SDXL's UNet has such a path of its own: the pooled text embedding and the size time ids (text_time)
    "sdxl": TinyBase("tifactory.demo.tinymodel_sdxl:build_tiny_sdxl_model", {}),
}


def tiny_base(family: str) -> TinyBase:
    try:
        return TINY_BASES[family]
    except KeyError:
        raise ValueError(f"no tiny model to teach for family {family!r} (taught: {', '.join(TINY_BASES)})") from None


def build_taught_model(out_dir: str | os.PathLike, *, family: str, num_vectors: int, steps: int, seed: int = 0,
                       image_size: int = 64, teach_images: int = 48, batch_size: int = 32,
                       learning_rate: float = 3e-3, high_t_share: float = 0.7, log: Callable[[str], None] = print) -> Path:
    """Build the tiny model of `family` (a TINY_BASES name), teach it the concepts (see the module docstring),
    write a diffusers folder.

    Besides the usual folders, `out_dir` holds `concepts.safetensors` (the hidden embedding of every
    concept, `[num_vectors, width]` per encoder, named by `concept_keys`) and `taught.json` (the family, image
    size, build settings and the teaching's held-out losses). Deterministic for a given seed; written atomically.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from tifactory.families import ModelSpec, family_named
    from tifactory.training.templates import OBJECT_TEMPLATES

    base = tiny_base(family)
    model_family = family_named(family)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model = base.build(work / "model", seed=seed)
        components = model_family.load(ModelSpec(path=model, family=family))
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel.from_config({**UNet2DConditionModel.load_config(model / "unet"),
                                                 **base.unet_changes})
        scheduler = components.noise_scheduler
        embeddings = [concept_embeddings(encoder.get_input_embeddings().weight, num_vectors, seed + 10 + index)
                      for index, encoder in enumerate(components.text_encoders)]  # per encoder: [K, n, width]

        # -- images and latents
        teach = [[concept_image(name, index, image_size) for index in range(teach_images)] for name in CONCEPTS]
        held = [[concept_image(name, HELD_OUT_START + index, image_size) for index in range(8)]
                for name in CONCEPTS]
        raw = block_means(images_to_pixels([image for family_images in teach for image in family_images]))
        mean, std = raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3))
        vae = closed_form_vae(mean, std, model_family.scaling_factor(components.vae))
        with torch.no_grad():
            def latents_of(images):
                return vae.encode(images_to_pixels(images)).latent_dist.mean * vae.config.scaling_factor
            teach_latents = torch.stack([latents_of(images) for images in teach])  # [K, n, 4, h, w]
            held_latents = torch.stack([latents_of(images) for images in held])

        # -- conditionings: per concept x template, plus the class words and the empty prompt (mixtures)
        conditioner = Conditioner(model_family, components, num_vectors, init_word=CLASS_WORDS[0],
                                  image_size=image_size)
        concept_states = _stack([conditioner.encode(OBJECT_TEMPLATES, [vectors[k] for vectors in embeddings])
                                 for k in range(len(CONCEPTS))])  # hidden states [K, T, 77, width], ...
        generic_prompts = [t.format(word) for word in CLASS_WORDS for t in OBJECT_TEMPLATES] + [""]
        generic_states = conditioner.encode(generic_prompts)

        # -- fine-tune the UNet as a conditional denoiser
        alphas_cumprod = scheduler.alphas_cumprod.float()
        unet.train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed + 20)
        num_concepts, num_templates = concept_states.hidden_states.shape[:2]

        def draw(n, g):
            concept = torch.randint(0, num_concepts, (n,), generator=g)
            image = torch.randint(0, teach_images, (n,), generator=g)
            latents = teach_latents[concept, image]
            flip = torch.rand(n, generator=g) < 0.5
            latents = torch.where(flip.view(-1, 1, 1, 1), latents.flip(-1), latents)
            generic = torch.rand(n, generator=g) < 0.2
            generic_pick = torch.randint(0, len(generic_prompts), (n,), generator=g)
            template_pick = torch.randint(0, num_templates, (n,), generator=g)
            states = _fields(lambda mixture, concepts: torch.where(
                generic.view(-1, *[1] * (mixture.dim() - 1)), mixture[generic_pick], concepts[concept, template_pick]),
                generic_states, concept_states)
            return latents, states

        for step in range(steps):
            latents, states = draw(batch_size, generator)
            noise = torch.randn(latents.shape, generator=generator)
            # most samples at t >= 300, where the noisy latents no longer tell the concepts apart and only the
            # conditioning can: it makes the UNet rely on the conditioning in far fewer steps
            timesteps = torch.where(torch.rand(batch_size, generator=generator) < high_t_share,
                                    torch.randint(300, 1000, (batch_size,), generator=generator),
                                    torch.randint(0, 1000, (batch_size,), generator=generator))
            alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
            noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
            loss = torch.nn.functional.mse_loss(model_family.predict_noise(unet, noisy, timesteps, states), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 100 == 0 or step == steps - 1:
                log(f"teaching step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
        unet.eval()

        # -- how well it learned: held-out loss per (image concept, conditioning)
        evaluation = {}
        eval_generator = torch.Generator().manual_seed(seed + 30)
        with torch.no_grad():
            for k, name in enumerate(CONCEPTS):
                latents = held_latents[k].repeat(8, 1, 1, 1)
                noise = torch.randn(latents.shape, generator=eval_generator)
                timesteps = torch.randint(0, 1000, (len(latents),), generator=eval_generator)
                row = {}
                for j, other in enumerate(CONCEPTS):
                    row[other] = _mean_loss(model_family, unet, alphas_cumprod, latents, noise, timesteps,
                                            _fields(lambda field: field[j, 0], concept_states))
                row["person"] = _mean_loss(model_family, unet, alphas_cumprod, latents, noise, timesteps,
                                           _fields(lambda field: field[0], generic_states))
                evaluation[name] = row
                log(f"held-out {name} images, loss by conditioning: "
                    + ", ".join(f"{key} {value:.4f}" for key, value in row.items()))

        # -- write: the tiny model folder with the taught UNet and the closed-form VAE
        shutil.rmtree(model / "unet")
        shutil.rmtree(model / "vae")
        unet.save_pretrained(model / "unet", safe_serialization=True)
        vae.save_pretrained(model / "vae", safe_serialization=True)
        save_file({key: vectors[k].contiguous() for k, name in enumerate(CONCEPTS)
                   for key, vectors in zip(concept_keys(name, len(embeddings)), embeddings)},
                  str(model / CONCEPTS_FILE), metadata={"num_vectors": str(num_vectors)})
        info = {"concepts": list(CONCEPTS), "image_size": image_size, "num_vectors": num_vectors, "seed": seed,
                "teach_images": teach_images, "steps": steps, "batch_size": batch_size,
                "learning_rate": learning_rate, "high_t_share": high_t_share, "held_out_start": HELD_OUT_START,
                "builder": builder_fingerprint(family), "family": family,
                "held_out_loss": evaluation}  # no timings: the folder is byte-identical across builds
        (model / TAUGHT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(model, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"taught model written to {out_dir} in {time.perf_counter() - started:.0f} s")
    return out_dir


def _build_defaults() -> dict:
    import inspect

    return {name: parameter for name, parameter in inspect.signature(build_taught_model).parameters.items()
            if name in ("image_size", "teach_images", "batch_size", "learning_rate", "high_t_share")}


_BUILD_DEFAULTS = _build_defaults()


def _mean_loss(family, unet, alphas_cumprod, latents, noise, timesteps, conditioning) -> float:
    """Mean denoising loss of `latents` under the family's UNet call; a conditioning of one prompt (hidden states
    [tokens, width]) conditions every row."""
    import torch

    alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    if conditioning.hidden_states.dim() == 2:
        conditioning = _fields(lambda field: field.expand(len(latents), *field.shape), conditioning)
    with torch.no_grad():
        prediction = family.predict_noise(unet, noisy, timesteps, conditioning)
    return float(((prediction - noise) ** 2).mean())


# ----------------------------------------------------------------------------- recovery

def write_concept_dataset(concept: str, dataset_dir: str | os.PathLike, *, subject: str, class_word: str,
                          count: int, size: int, repeats: int, bucket: dict) -> Path:
    """A prepared kohya dataset of `count` held-out images of `concept`; returns its dataset.toml."""
    from tifactory.photos.dataset import dataset_toml_text, image_folder_name
    from tifactory.fileio import write_text_atomic

    dataset_dir = Path(dataset_dir)
    image_dir = dataset_dir / image_folder_name(repeats, subject, class_word)
    write_concept_images(concept, image_dir, count, size)
    toml_path = dataset_dir / "dataset.toml"
    write_text_atomic(toml_path, dataset_toml_text(image_dir=str(image_dir), repeats=repeats,
                                                   class_tokens=f"{subject} {class_word}", resolution=size,
                                                   bucket=bucket))
    return toml_path


def builder_fingerprint(family: str) -> str:
    """SHA-256 of the code that builds a taught model of `family` (this module and the tiny model's: SD1.5's
    tinymodel, whose tokenizer every tiny model uses, and the family's own builder): a folder whose taught.json
    carries another fingerprint was built by other code."""
    import hashlib

    from tifactory.demo import tinymodel

    digest = hashlib.sha256()
    for module_file in dict.fromkeys((__file__, tinymodel.__file__, tiny_base(family).module_file())):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()


def is_taught_as(model_dir: str | os.PathLike, *, family: str, num_vectors: int, steps: int, seed: int) -> bool:
    """Whether `model_dir` is a taught model of `family` that this code, with these settings and the other build
    defaults, builds (the same bytes): for reusing one instead of building it again."""
    info = read_taught_info(model_dir)
    return (info is not None and info.get("family") == family and info.get("builder") == builder_fingerprint(family)
            and (info["num_vectors"], info["steps"], info["seed"]) == (num_vectors, steps, seed)
            and all(info.get(name) == parameter.default for name, parameter in _BUILD_DEFAULTS.items()))


def read_taught_info(model_dir: str | os.PathLike) -> dict | None:
    """taught.json of a taught model folder, or None for any other model."""
    path = Path(model_dir) / TAUGHT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


COND_FIGURES = ("cond_dist_target", "cond_dist_other", "cond_dist_init_target", "cond_cos_target", "vec_cos_target")


def recovery_figures(model_dir: str | os.PathLike, vectors, *, target: str, other: str, init_word: str,
                     images: list[str | os.PathLike], seed: int = 0, repeats: int = 8,
                     min_timestep: int = 0) -> dict:
    """How far trained `vectors` (one [n, width] per text encoder of the taught model's family; None: the init
    word's) got toward the hidden embedding of `target`.

    Conditioning = the family's hidden states (`encode_text`) at the placeholder tokens of "a photo of a
    <tokens>"; each encoder's part of it is its own columns (the hidden states are the encoders' states side
    by side: SD1.5 one encoder's final-normed state, SDXL CLIP-L's and bigG's penultimate states). Returned
    figures (COND_FIGURES over the whole conditioning and all vectors; `encoders`: the same per encoder):
    * cond_dist_target / cond_dist_other: distance of the trained conditioning to `target`'s and to
      `other`'s (a second concept); cond_dist_init_target: the init word's distance to `target`'s;
    * cond_cos_target: cosine between the conditioning's displacement from the init word's and the
      direction from the init word's conditioning to `target`'s; vec_cos_target: the same in vector space;
    * pooled_cos_target (families with a pooled text embedding, SDXL): cond_cos_target of the pooled one;
    * loss_init / loss_target / loss_trained: denoising loss on `images` (each `repeats` times, fixed
      noise and timesteps; the family's UNet call with the images' sizes) conditioned on the init word, on
      `target`'s embedding, on the trained vectors;
      gap_closed = (loss_init - loss_trained) / (loss_init - loss_target).
    """
    import torch

    from tifactory.families import ModelSpec, family_named
    from tifactory.training.data import load_image_tensor, sample_sizes
    from tifactory.training.templates import OBJECT_TEMPLATES

    info = read_taught_info(model_dir)
    if info is None:
        raise ValueError(f"{model_dir} is not a taught model (no {TAUGHT_FILE})")
    family = family_named(info["family"])
    components = family.load(ModelSpec(path=model_dir, family=info["family"]))
    for encoder in components.text_encoders:
        encoder.eval()
    concepts = read_concepts(model_dir, len(components.text_encoders))
    num_vectors = concepts[target][0].shape[0] if vectors is None else vectors[0].shape[0]
    conditioner = Conditioner(family, components, num_vectors, init_word=init_word, image_size=info["image_size"])
    init_vectors = conditioner.init_vectors
    vectors = [v.clone() for v in init_vectors] if vectors is None else [v.detach().float().cpu() for v in vectors]
    if len(vectors) != len(init_vectors):
        raise ValueError(f"{len(vectors)} vector tensor(s) for a model with {len(init_vectors)} text encoder(s)")
    embeddings = {"init": init_vectors, "target": concepts[target], "other": concepts[other], "trained": vectors}
    prompt = [OBJECT_TEMPLATES[0]]
    positions = conditioner.positions(prompt[0])  # the conditioning = the output at the trained tokens
    encoded = {name: conditioner.encode(prompt, value) for name, value in embeddings.items()}
    states = {name: conditioning.hidden_states[0, positions] for name, conditioning in encoded.items()}
    widths = [encoder.config.hidden_size for encoder in components.text_encoders]
    if sum(widths) != states["init"].shape[-1]:
        raise ValueError(f"the family's hidden states are {states['init'].shape[-1]} wide, not its encoders' "
                         f"{widths} side by side")
    starts = [sum(widths[:index]) for index in range(len(widths))]

    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    def cond_figures(part, vector_part):
        trained, init, goal, second = (part(states[name]) for name in ("trained", "init", "target", "other"))
        moved = [vector_part(embeddings[name]) for name in ("trained", "init", "target")]
        return {"cond_dist_target": float((trained - goal).norm()),
                "cond_dist_other": float((trained - second).norm()),
                "cond_dist_init_target": float((init - goal).norm()),
                "cond_cos_target": cosine(trained - init, goal - init),
                "vec_cos_target": cosine(moved[0] - moved[1], moved[2] - moved[1])}

    figures = cond_figures(lambda state: state, lambda per_encoder: torch.cat([v.flatten() for v in per_encoder]))
    figures["encoders"] = [cond_figures(lambda state, a=start, b=start + width: state[..., a:b],
                                        lambda per_encoder, index=index: per_encoder[index])
                           for index, (start, width) in enumerate(zip(starts, widths))]
    if encoded["init"].pooled is not None:
        pooled = {name: conditioning.pooled[0] for name, conditioning in encoded.items()}
        figures["pooled_cos_target"] = cosine(pooled["trained"] - pooled["init"], pooled["target"] - pooled["init"])

    vae, unet = components.vae, components.unet.eval()
    with torch.no_grad():
        image_sizes = [_image_size(path) for path in images]
        pixels = torch.stack([load_image_tensor(Path(path), size) for path, size in zip(images, image_sizes)])
        latents = (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor).repeat(repeats, 1, 1, 1)
    rows = [sample_sizes(*size, size, flipped=False) for size in image_sizes]
    sizes = torch.tensor([[*row.original, *row.crop_top_left, *row.target] for row in rows],
                         dtype=torch.long).repeat(repeats, 1)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(min_timestep, components.noise_scheduler.config.num_train_timesteps, (len(latents),),
                              generator=generator)
    alphas_cumprod = components.noise_scheduler.alphas_cumprod.float()
    templates = [OBJECT_TEMPLATES[index % len(OBJECT_TEMPLATES)] for index in range(len(latents))]
    for name in ("init", "target", "trained"):
        conditioning = conditioner.encode(templates, embeddings[name], sizes)
        figures[f"loss_{name}"] = _mean_loss(family, unet, alphas_cumprod, latents, noise, timesteps, conditioning)
    gap = figures["loss_init"] - figures["loss_target"]
    figures["gap_closed"] = (figures["loss_init"] - figures["loss_trained"]) / gap if gap > 0 else float("nan")
    return figures


def _image_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def other_concept(concept: str) -> str:
    """The second concept a recovery is compared against (the next one in CONCEPTS)."""
    return CONCEPTS[(CONCEPTS.index(concept) + 1) % len(CONCEPTS)]


RECOVERY_COLUMNS = ("step", "cond_dist_target", "cond_dist_other", "cond_cos_target", "vec_cos_target",
                    "loss_init", "loss_target", "loss_trained", "gap_closed")


def recovery_table(model_dir: str | os.PathLike, embeddings: dict[int, object], *, concept: str, init_word: str,
                   images: list[str | os.PathLike], out_tsv: str | os.PathLike) -> list[dict]:
    """recovery_figures for every (step: vectors per encoder, or None) of one run, against `concept` and
    other_concept(concept); written as a TSV (RECOVERY_COLUMNS) and returned as rows."""
    from tifactory.fileio import write_text_atomic

    rows = []
    for step, vectors in sorted(embeddings.items()):
        figures = recovery_figures(model_dir, vectors, target=concept, other=other_concept(concept),
                                   init_word=init_word, images=images)
        rows.append({"step": step, **{key: figures[key] for key in RECOVERY_COLUMNS[1:]}})
    text = "\t".join(RECOVERY_COLUMNS) + "\n" + "".join(
        "\t".join(str(row["step"]) if key == "step" else f"{row[key]:.4f}" for key in RECOVERY_COLUMNS) + "\n"
        for row in rows)
    write_text_atomic(out_tsv, text)
    return rows
