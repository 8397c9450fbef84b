"""A *taught* tiny model: the tiny SD1.5-shaped model made to know a few concepts, so learning shows.

A purely random tiny model cannot show that textual inversion learns: its UNet does not know what it
renders, so no embedding explains its images better than another. This module teaches it, on a CPU
in about a minute:

* the VAE becomes an exact, deterministic autoencoder of 8x8-pixel block colours (weights set in
  closed form, no training): the encoder averages each 8x8 block of R, G, B (and their mean) into
  four latent channels, the decoder paints the blocks back. Its posterior has (near) zero variance
  and the latents times `scaling_factor` have zero mean and unit variance per channel over the
  concept images, as SD1.5's latents have;
* a few **concepts**, each a family of procedurally drawn images (an orange sun on blue, yellow and
  green stripes, a magenta and white checkerboard, a cyan ring on black), each with a hidden
  embedding: `num_vectors` random vectors norm-matched to the token embeddings;
* the UNet is fine-tuned as a conditional denoiser: an image of concept c, noised, conditioned on
  the text encoder's output for an object-template prompt ("a photo of a {}") whose placeholder
  tokens carry c's embedding. Class-word prompts ("a photo of a person") and the empty prompt are
  taught as the mixture of all concepts, so the init word explains no concept well.

Textual inversion on held-out images of one concept then has something to find: the concept's
embedding (or another that conditions the UNet the same way). `recovery_figures` measures how far a
trained embedding got. Everything is deterministic for a given seed (CPU, fp32).

Heavy imports (torch, diffusers, transformers, numpy) happen inside the functions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
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
    """One [num_vectors, 768] random embedding per concept, each row scaled to the mean token-row norm."""
    import torch

    target_norm = token_embedding_weight.float().norm(dim=1).mean()
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn((len(CONCEPTS), num_vectors, token_embedding_weight.shape[1]), generator=generator)
    return vectors / vectors.norm(dim=-1, keepdim=True) * target_norm


class Conditioner:
    """Text-encoder outputs for prompts whose placeholder tokens carry given embeddings (no grad)."""

    def __init__(self, tokenizer, text_encoder, num_vectors: int):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokens = [f"<taught{index}>" for index in range(num_vectors)]
        tokenizer.add_tokens(self.tokens)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.ids = tokenizer.convert_tokens_to_ids(self.tokens)
        self.placeholder = " ".join(self.tokens)

    def positions(self, prompt: str) -> list[int]:
        """Where the placeholder tokens sit in the tokenised `prompt`."""
        ids = self.tokenizer(prompt.format(self.placeholder)).input_ids
        return [index for index, token in enumerate(ids) if token in self.ids]

    def encode(self, prompts: list[str], vectors=None):
        """prompts with `{}` for the placeholder; `vectors` [num_vectors, 768] fill the placeholder."""
        import torch

        text = [prompt.format(self.placeholder) for prompt in prompts]
        ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            if vectors is not None:
                self.text_encoder.get_input_embeddings().weight[self.ids] = vectors.float()
            return self.text_encoder(ids)[0]


# ----------------------------------------------------------------------------- teaching

def build_taught_model(out_dir: str | os.PathLike, *, num_vectors: int, steps: int, seed: int = 0,
                       image_size: int = 64, teach_images: int = 48, batch_size: int = 32,
                       learning_rate: float = 3e-3, high_t_share: float = 0.7, log: Callable[[str], None] = print) -> Path:
    """Build the tiny model, teach it the concepts (see the module docstring), write a diffusers folder.

    Besides the usual folders, `out_dir` holds `concepts.safetensors` (the hidden embedding of every
    concept, `[num_vectors, 768]` each) and `taught.json` (image size, build settings and the
    teaching's held-out losses). Deterministic for a given seed; written atomically.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from tifactory.training.templates import OBJECT_TEMPLATES
    from tifactory.demo.tinymodel import build_tiny_model

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        build_tiny_model(work / "model", seed=seed)
        model = work / "model"
        tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder", local_files_only=True).eval()
        # the tiny UNet plus a pooled-text path into the time embedding (diffusers' addition_embed_type "text"):
        # besides cross-attention, the conditioning then scales and shifts every ResNet block, as class labels do,
        # which a tiny UNet learns to use in a few hundred CPU steps (cross-attention alone takes far longer)
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel.from_config({**UNet2DConditionModel.load_config(model / "unet"),
                                                 "addition_embed_type": "text",
                                                 "addition_embed_type_num_heads": 12})
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_pretrained(model / "scheduler", local_files_only=True)
        embeddings = concept_embeddings(text_encoder.get_input_embeddings().weight, num_vectors, seed + 10)

        # -- images and latents
        teach = [[concept_image(name, index, image_size) for index in range(teach_images)] for name in CONCEPTS]
        held = [[concept_image(name, HELD_OUT_START + index, image_size) for index in range(8)]
                for name in CONCEPTS]
        raw = block_means(images_to_pixels([image for family in teach for image in family]))
        mean, std = raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3))
        vae = closed_form_vae(mean, std, AutoencoderKL.load_config(model / "vae")["scaling_factor"])
        with torch.no_grad():
            def latents_of(images):
                return vae.encode(images_to_pixels(images)).latent_dist.mean * vae.config.scaling_factor
            teach_latents = torch.stack([latents_of(family) for family in teach])  # [K, n, 4, h, w]
            held_latents = torch.stack([latents_of(family) for family in held])

        # -- conditionings: per concept x template, plus the class words and the empty prompt (mixtures)
        conditioner = Conditioner(tokenizer, text_encoder, num_vectors)
        concept_states = torch.stack([conditioner.encode(OBJECT_TEMPLATES, embeddings[k])
                                      for k in range(len(CONCEPTS))])  # [K, T, 77, 768]
        generic_prompts = [t.format(word) for word in CLASS_WORDS for t in OBJECT_TEMPLATES] + [""]
        generic_states = conditioner.encode(generic_prompts)

        # -- fine-tune the UNet as a conditional denoiser
        alphas_cumprod = scheduler.alphas_cumprod.float()
        unet.train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed + 20)
        num_concepts, num_templates = concept_states.shape[:2]

        def draw(n, g):
            concept = torch.randint(0, num_concepts, (n,), generator=g)
            image = torch.randint(0, teach_images, (n,), generator=g)
            latents = teach_latents[concept, image]
            flip = torch.rand(n, generator=g) < 0.5
            latents = torch.where(flip.view(-1, 1, 1, 1), latents.flip(-1), latents)
            generic = torch.rand(n, generator=g) < 0.2
            states = torch.where(generic.view(-1, 1, 1),
                                 generic_states[torch.randint(0, len(generic_prompts), (n,), generator=g)],
                                 concept_states[concept, torch.randint(0, num_templates, (n,), generator=g)])
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
            loss = torch.nn.functional.mse_loss(unet(noisy, timesteps, states).sample, noise)
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
                    row[other] = _mean_loss(unet, alphas_cumprod, latents, noise, timesteps, concept_states[j, 0])
                row["person"] = _mean_loss(unet, alphas_cumprod, latents, noise, timesteps, generic_states[0])
                evaluation[name] = row
                log(f"held-out {name} images, loss by conditioning: "
                    + ", ".join(f"{key} {value:.4f}" for key, value in row.items()))

        # -- write: the tiny model folder with the taught UNet and the closed-form VAE
        shutil.rmtree(model / "unet")
        shutil.rmtree(model / "vae")
        unet.save_pretrained(model / "unet", safe_serialization=True)
        vae.save_pretrained(model / "vae", safe_serialization=True)
        save_file({name: embeddings[k].contiguous() for k, name in enumerate(CONCEPTS)},
                  str(model / CONCEPTS_FILE), metadata={"num_vectors": str(num_vectors)})
        info = {"concepts": list(CONCEPTS), "image_size": image_size, "num_vectors": num_vectors, "seed": seed,
                "teach_images": teach_images, "steps": steps, "batch_size": batch_size,
                "learning_rate": learning_rate, "high_t_share": high_t_share, "held_out_start": HELD_OUT_START,
                "builder": builder_fingerprint(),
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


def _mean_loss(unet, alphas_cumprod, latents, noise, timesteps, states) -> float:
    import torch

    alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    if states.dim() == 2:
        states = states.expand(len(latents), -1, -1)
    with torch.no_grad():
        prediction = unet(noisy, timesteps, states).sample
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


def builder_fingerprint() -> str:
    """SHA-256 of the code that builds a taught model (this module and the tiny model's): a folder whose
    taught.json carries another fingerprint was built by other code."""
    import hashlib

    from tifactory.demo import tinymodel

    digest = hashlib.sha256()
    for module_file in (__file__, tinymodel.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()


def is_taught_as(model_dir: str | os.PathLike, *, num_vectors: int, steps: int, seed: int) -> bool:
    """Whether `model_dir` is a taught model that this code, with these settings and the other build
    defaults, builds (the same bytes): for reusing one instead of building it again."""
    info = read_taught_info(model_dir)
    return (info is not None and info.get("builder") == builder_fingerprint()
            and (info["num_vectors"], info["steps"], info["seed"]) == (num_vectors, steps, seed)
            and all(info.get(name) == parameter.default for name, parameter in _BUILD_DEFAULTS.items()))


def read_taught_info(model_dir: str | os.PathLike) -> dict | None:
    """taught.json of a taught model folder, or None for any other model."""
    path = Path(model_dir) / TAUGHT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def recovery_figures(model_dir: str | os.PathLike, vectors, *, target: str, other: str, init_word: str,
                     images: list[str | os.PathLike], seed: int = 0, repeats: int = 8,
                     min_timestep: int = 0) -> dict:
    """How far trained `vectors` [n, 768] (None: the init word's) got toward the hidden embedding of `target`.

    Conditioning = the text encoder's output at the placeholder tokens of "a photo of a <tokens>" (the
    final layer norm bounds it, whatever the vectors' norm). Returned figures:
    * cond_dist_target / cond_dist_other: distance of the trained conditioning to `target`'s and to
      `other`'s (a second concept);
    * cond_cos_target: cosine between the conditioning's displacement from the init word's and the
      direction from the init word's conditioning to `target`'s; vec_cos_target: the same in vector space;
    * loss_init / loss_target / loss_trained: denoising loss on `images` (each `repeats` times, fixed
      noise and timesteps) conditioned on the init word, on `target`'s embedding, on the trained vectors;
      gap_closed = (loss_init - loss_trained) / (loss_init - loss_target).
    """
    import torch
    from safetensors.torch import load_file

    from tifactory.families import ModelSpec, load_model
    from tifactory.roster import DEMO_MODEL_FAMILY
    from tifactory.training.data import load_image_tensor
    from tifactory.training.templates import OBJECT_TEMPLATES

    components = load_model(ModelSpec(path=model_dir, family=DEMO_MODEL_FAMILY))
    concepts = load_file(str(Path(model_dir) / CONCEPTS_FILE))
    num_vectors = concepts[target].shape[0] if vectors is None else vectors.shape[0]
    tokenizer, text_encoder = components.tokenizer, components.text_encoder.eval()
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    init_vectors = text_encoder.get_input_embeddings().weight[
        [init_ids[index % len(init_ids)] for index in range(num_vectors)]].detach().clone()
    vectors = init_vectors.clone() if vectors is None else vectors.detach().float().cpu()
    conditioner = Conditioner(tokenizer, text_encoder, num_vectors)
    embeddings = {"init": init_vectors, "target": concepts[target], "other": concepts[other], "trained": vectors}
    prompt = [OBJECT_TEMPLATES[0]]
    positions = conditioner.positions(prompt[0])  # the conditioning = the output at the trained tokens
    states = {name: conditioner.encode(prompt, value)[0, positions] for name, value in embeddings.items()}

    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    figures = {
        "cond_dist_target": float((states["trained"] - states["target"]).norm()),
        "cond_dist_other": float((states["trained"] - states["other"]).norm()),
        "cond_dist_init_target": float((states["init"] - states["target"]).norm()),
        "cond_cos_target": cosine(states["trained"] - states["init"], states["target"] - states["init"]),
        "vec_cos_target": cosine(vectors - init_vectors, concepts[target] - init_vectors),
    }

    vae, unet = components.vae, components.unet.eval()
    with torch.no_grad():
        pixels = torch.stack([load_image_tensor(Path(path), _image_size(path)) for path in images])
        latents = (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor).repeat(repeats, 1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(min_timestep, components.noise_scheduler.config.num_train_timesteps, (len(latents),),
                              generator=generator)
    alphas_cumprod = components.noise_scheduler.alphas_cumprod.float()
    templates = [OBJECT_TEMPLATES[index % len(OBJECT_TEMPLATES)] for index in range(len(latents))]
    for name in ("init", "target", "trained"):
        conditioning = conditioner.encode(templates, embeddings[name])
        figures[f"loss_{name}"] = _mean_loss(unet, alphas_cumprod, latents, noise, timesteps, conditioning)
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
    """recovery_figures for every (step: vectors) of one run, against `concept` and other_concept(concept);
    written as a TSV (RECOVERY_COLUMNS) and returned as rows."""
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
