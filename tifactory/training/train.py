"""Textual-inversion training: the published kohya recipe, read top to bottom.

Only the subject's new token vectors train; everything else is frozen. Every random choice (data order,
templates, noise, timesteps) is derived from (seed, epoch) or (seed, step), so a run resumed from its
last saved state ends byte-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tifactory.photos.dataset import read_dataset_toml
from tifactory.device import pick_device
from tifactory.training.embedding import build_metadata, checkpoint_name, reproducible_date, save_embedding
from tifactory.fileio import atomic_path, sha256_file, write_text_atomic
from tifactory.training.templates import TEMPLATES, training_tokens
from tifactory.errors import TifactoryError

STATE_FORMAT_VERSION = 1


class TrainingError(TifactoryError, RuntimeError):
    """A training problem the user must act on (bad token, NaN loss, no images...)."""


# ----------------------------------------------------------------------------- precision

def pick_compute_dtype(device, mixed_precision: str):
    """bf16 where supported, fp16 (with loss scaling) where bf16 is missing, fp32 on CPU."""
    import torch

    if device.type != "cuda" or mixed_precision == "no":
        return torch.float32
    if mixed_precision == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


# ----------------------------------------------------------------------------- trainable embedding

def make_placeholder_embedding(base_embedding, first_placeholder_id: int, initial_vectors):
    """Token embedding whose rows >= first_placeholder_id come from a small trainable tensor."""
    return placeholder_embedding_class()(base_embedding, first_placeholder_id, initial_vectors)


_PLACEHOLDER_EMBEDDING: list = []


def placeholder_embedding_class():
    """The PlaceholderEmbedding class, made once per process (torch is imported lazily): one class for every
    subject, so a process that trains several (the GPU worker) reuses the compiled step instead of tracing it
    again for each subject's new embedding module (dynamo guards on the module's type)."""
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


# ----------------------------------------------------------------------------- compilation

# Blocks that repeat through a model, compiled one class at a time instead of the whole model as one graph
# (less to trace and compile, a slower step): a diffusers model's own `_repeated_blocks` (the UNet's
# BasicTransformerBlock) and CLIP's encoder layer.
TEXT_ENCODER_REPEATED_BLOCKS = ("CLIPEncoderLayer",)


def compile_repeated_blocks(models: list, **options) -> int:
    """torch.compile every repeated block of `models` in place (`compile_scope: blocks`); returns the count."""
    import torch._dynamo

    # one compiled graph per distinct block shape (the UNet's transformer blocks come in 4 widths)
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 16))
    count = 0
    for model in models:
        names = set(getattr(model, "_repeated_blocks", None) or TEXT_ENCODER_REPEATED_BLOCKS)
        for module in model.modules():
            if type(module).__name__ in names:
                module.compile(**options)
                count += 1
    return count


# ----------------------------------------------------------------------------- data

def bucket_resolution(width: int, height: int, params: dict) -> tuple[int, int]:
    """kohya-style bucket for one image: area <= resolution², sides multiples of the step, in range."""
    target_area = params["resolution"] ** 2
    step = params["bucket_reso_steps"]
    if not params["enable_bucket"]:
        return params["resolution"], params["resolution"]
    scale = math.sqrt(target_area / (width * height))
    if params["bucket_no_upscale"]:
        scale = min(scale, 1.0)
    bucket_w = max(params["min_bucket_reso"], min(params["max_bucket_reso"], int(width * scale) // step * step))
    bucket_h = max(params["min_bucket_reso"], min(params["max_bucket_reso"], int(height * scale) // step * step))
    return bucket_w, bucket_h


def load_image_tensor(path: Path, bucket: tuple[int, int]):
    """Resize (cover) + centre-crop to the bucket; return a [3, H, W] tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        bucket_w, bucket_h = bucket
        scale = max(bucket_w / image.width, bucket_h / image.height)
        resized_w, resized_h = max(bucket_w, round(image.width * scale)), max(bucket_h, round(image.height * scale))
        if (resized_w, resized_h) != image.size:
            image = image.resize((resized_w, resized_h), Image.Resampling.LANCZOS)
        left, top = (resized_w - bucket_w) // 2, (resized_h - bucket_h) // 2
        image = image.crop((left, top, left + bucket_w, top + bucket_h))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def encode_latents(vae, pixels, generator):
    """One sample of the VAE's latent distribution of `pixels` [n, 3, H, W], scaled for the UNet; the noise
    comes from `generator` (drawn on its device)."""
    import torch

    distribution = vae.encode(pixels).latent_dist
    noise = torch.randn(distribution.mean.shape, generator=generator, device=generator.device).to(pixels.device)
    return (distribution.mean + distribution.std * noise) * vae.config.scaling_factor


@dataclass
class BucketLatents:
    """The latents of each bucket's images (× flip variants): `rows[bucket]` holds them cached
    (train.cache_latents: true, the recipe), or holds the images' pixels and `vae` encodes the rows a step
    takes, a fresh sample each time (cache_latents: false, as kohya without --cache_latents)."""

    rows: list
    vae: object = None

    def take(self, bucket_id: int, row_indices, generator, chunk: int):
        chosen = self.rows[bucket_id].index_select(0, row_indices)
        if self.vae is None:
            return chosen
        import torch

        with torch.no_grad():  # in chunks of the micro-batch: the out-of-memory fallback shrinks both
            return torch.cat([encode_latents(self.vae, chosen[start:start + chunk], generator)
                              for start in range(0, len(chosen), chunk)]).float()


@dataclass
class TrainingImage:
    path: Path
    bucket: tuple[int, int]


def list_training_images(dataset_toml: Path, params: dict) -> tuple[list[TrainingImage], list[int]]:
    """Images and their per-epoch repeat counts, from a kohya dataset config."""
    from PIL import Image

    images, repeats = [], []
    for subset in read_dataset_toml(dataset_toml):
        for path in subset["images"]:
            with Image.open(path) as image:
                bucket = bucket_resolution(image.width, image.height, params)
            images.append(TrainingImage(path=path, bucket=bucket))
            repeats.append(subset["num_repeats"])
    if not images:
        raise TrainingError(f"{dataset_toml}: the dataset holds no images")
    return images, repeats


def epoch_order(seed: int, epoch: int, repeats: list[int]) -> list[int]:
    """Image index per sample of one epoch (each image `repeats` times), shuffled from (seed, epoch)."""
    order = [index for index, count in enumerate(repeats) for _ in range(count)]
    random.Random(f"order:{seed}:{epoch}").shuffle(order)
    return order


def samples_for_step(step: int, samples_per_step: int, repeats: list[int], seed: int,
                     num_variants: int, num_templates: int) -> list[tuple[int, int, int]]:
    """(image index, variant (0 or flipped 1), template index) for every sample of optimizer step `step`."""
    epoch_length = sum(repeats)
    samples = []
    for sample_index in range(step * samples_per_step, (step + 1) * samples_per_step):
        epoch, position = divmod(sample_index, epoch_length)
        order = _cached_epoch_order(seed, epoch, tuple(repeats))
        chooser = random.Random(f"sample:{seed}:{sample_index}")
        samples.append((order[position], chooser.randrange(num_variants), chooser.randrange(num_templates)))
    return samples


_EPOCH_CACHE: dict = {}


def _cached_epoch_order(seed: int, epoch: int, repeats: tuple[int, ...]) -> list[int]:
    key = (seed, epoch, repeats)
    if key not in _EPOCH_CACHE:
        _EPOCH_CACHE.clear()
        _EPOCH_CACHE[key] = epoch_order(seed, epoch, list(repeats))
    return _EPOCH_CACHE[key]


# ----------------------------------------------------------------------------- optimizer schedule

def make_optimizer(params: dict, trainable: list):
    """AdamW (torch) or AdamW8bit (bitsandbytes, when installed) with the config's betas, eps, decay."""
    import torch

    settings = dict(lr=params["learning_rate"], betas=(params["adam_beta1"], params["adam_beta2"]),
                    eps=params["adam_epsilon"], weight_decay=params["weight_decay"])
    if params["optimizer"] == "AdamW":
        return torch.optim.AdamW(trainable, **settings)
    try:
        import bitsandbytes
    except ImportError:
        raise TrainingError("optimizer AdamW8bit needs bitsandbytes (pip install bitsandbytes, CUDA only); "
                            "or set train.optimizer: AdamW") from None
    return bitsandbytes.optim.AdamW8bit(trainable, **settings)


def lr_lambda_for(params: dict) -> Callable[[int], float]:
    warmup, total, kind = params["lr_warmup_steps"], params["max_train_steps"], params["lr_scheduler"]

    def factor(step: int) -> float:
        if kind != "constant" and warmup and step < warmup:
            return (step + 1) / warmup
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine

    return factor


# ----------------------------------------------------------------------------- resume state

def run_fingerprint(params: dict, dataset_hash: str, base_model_hash: str) -> str:
    payload = json.dumps({"params": params, "dataset": dataset_hash, "base_model": base_model_hash,
                          "format": STATE_FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def save_state(state_dir: Path, state: dict) -> None:
    import torch

    with atomic_path(state_dir / "state.pt") as tmp_path:
        torch.save(state, tmp_path)


def load_state(state_dir: Path, fingerprint: str, log: Callable[[str], None]) -> dict | None:
    import torch

    path = state_dir / "state.pt"
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt state is not worth a crash: start over
        log(f"ignoring unreadable resume state {path}: {error}")
        return None
    if state.get("fingerprint") != fingerprint:
        log(f"ignoring resume state {path}: it belongs to other inputs or parameters")
        return None
    return state


# ----------------------------------------------------------------------------- captions and the step plan

def caption_prompts(images: list[TrainingImage], subject: str, token_text: str,
                    log: Callable[[str], None]) -> list[str]:
    """Caption mode: one prompt per image from the `.txt` beside it, the subject token expanded."""
    prompts, missing = [], []
    for image in images:
        caption_path = image.path.with_suffix(".txt")
        if not caption_path.is_file():
            raise TrainingError(f"caption mode: {caption_path} is missing (template: caption needs a .txt "
                                "beside every image)")
        caption = caption_path.read_text(encoding="utf-8").strip()
        if not any(word.strip(",.;:!?()") == subject for word in caption.split()):
            missing.append(caption_path.name)
            caption = f"{subject}, {caption}" if caption else subject
        prompts.append(" ".join(word.replace(subject, token_text, 1) if word.strip(",.;:!?()") == subject else word
                                for word in caption.split()))  # punctuation around the word stays
    if missing:
        log(f"warning: the token {subject!r} is not in {len(missing)} caption(s) ({', '.join(missing[:5])}"
            f"{'…' if len(missing) > 5 else ''}); it was put in front, since a caption without it trains nothing")
    return prompts


@dataclass
class StepPlan:
    """Device-resident indices for a range of steps: per step, one (bucket, start, end) per bucket group."""
    groups: list[list[tuple[int, int, int]]]
    positions: object   # [n] position of each sample inside its step (timestep index)
    latent_rows: object  # [n] row in its bucket's latent tensor
    prompt_rows: object  # [n] row in the tokenised prompts


def build_step_plan(first_step: int, last_step: int, samples_per_step: int, repeats: list[int], seed: int,
                    num_variants: int, images: list[TrainingImage], image_slots: list[tuple[int, int]],
                    prompt_for_sample: Callable[[int, int], int], device) -> StepPlan:
    """Precompute every index the loop needs, so the loop itself never waits on the host."""
    import torch

    groups, positions, latent_rows, prompt_rows = [], [], [], []
    for step in range(first_step, last_step):
        samples = samples_for_step(step, samples_per_step, repeats, seed, num_variants, 1 << 30)
        by_bucket: dict[int, list[int]] = {}
        for position, (image_index, _, _) in enumerate(samples):
            by_bucket.setdefault(image_slots[image_index][0], []).append(position)
        step_groups = []
        for bucket_id, members in by_bucket.items():
            start = len(positions)
            for position in members:
                image_index, variant, random_pick = samples[position]
                positions.append(position)
                latent_rows.append(image_slots[image_index][1] * num_variants + variant)
                prompt_rows.append(prompt_for_sample(image_index, random_pick))
            step_groups.append((bucket_id, start, len(positions)))
        groups.append(step_groups)

    def to_device(values):
        return torch.tensor(values, dtype=torch.long).to(device, non_blocking=False)

    return StepPlan(groups=groups, positions=to_device(positions), latent_rows=to_device(latent_rows),
                    prompt_rows=to_device(prompt_rows))


# ----------------------------------------------------------------------------- the loss of a batch

def denoising_loss(predict_noise: Callable, latents, noise, timesteps, input_ids, alphas_cumprod, *,
                   divisor: int, min_snr_gamma: float = 0.0, noise_offset: float = 0.0, offset_noise=None):
    """The training loss of one batch: kohya's epsilon MSE, summed over the samples and divided by `divisor`.

    `noise` is the per-sample Gaussian noise; with `noise_offset` the per-channel `offset_noise` [n, C, 1, 1]
    is added to it (kohya's --noise_offset). The latents are noised to `timesteps` with the schedule's
    `alphas_cumprod` (as DDPMScheduler.add_noise does) and `predict_noise(noisy_latents, timesteps,
    input_ids)` is the text encoder + UNet. Each sample's mean squared error is weighted by
    min(SNR, gamma) / SNR when `min_snr_gamma` is set. Called once per micro-batch with
    divisor = batch size x gradient accumulation, the gradients add up to those of kohya's loop.
    """
    import torch

    if noise_offset:
        noise = noise + noise_offset * offset_noise
    alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy_latents = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    noise_pred = predict_noise(noisy_latents, timesteps, input_ids)
    per_sample = ((noise_pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
        per_sample = per_sample * torch.clamp(snr, max=min_snr_gamma) / snr
    return per_sample.sum() / divisor


# ----------------------------------------------------------------------------- the training run, by phase

@dataclass
class TrainingResult:
    final_path: Path
    stats: dict


@dataclass
class Precision:
    device: object
    compute_dtype: object  # the UNet's and text encoder's weights and activations
    autocast: bool  # autocast on top (moves activations to fp32 and back around every norm)


def choose_precision(params: dict, log: Callable[[str], None]) -> Precision:
    """Phase 1: the device and the dtype the frozen models run in."""
    import torch

    device = pick_device(params["device"])
    compute_dtype = pick_compute_dtype(device, params["mixed_precision"])
    if device.type == "cpu":  # bit-exact reruns and resumes (some CPU kernels otherwise vary with load)
        torch.use_deterministic_algorithms(True, warn_only=True)
    log(f"device {device}, compute dtype {compute_dtype} (asked: {params['mixed_precision']}), "
        f"save precision {params['save_precision']}")
    if device.type == "cuda":  # which physical GPU this job got (see tifactory.gpu_slots)
        log(f"CUDA device {torch.cuda.current_device()} of {torch.cuda.device_count()} visible: "
            f"{torch.cuda.get_device_name()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return Precision(device, compute_dtype, compute_dtype != torch.float32 and params["autocast"])


def load_frozen_models(base_model: str, base_model_config: str, vae: str, precision: Precision, components,
                       stats: dict, log: Callable[[str], None]):
    """Phase 2a: the base model's parts, frozen; weights read straight onto the device, the UNet in the
    compute dtype. `components` (preloaded models) is for benchmarks."""
    from tifactory.training.models import load_components

    started = time.perf_counter()
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401 - timed apart from the weights
    from transformers import CLIPTextModel  # noqa: F401
    stats["import_s"] = time.perf_counter() - started
    if components is None:
        components = load_components(base_model, vae=vae or None, config_dir=base_model_config or None,
                                     device=precision.device, unet_dtype=precision.compute_dtype)
    for module in (components.text_encoder, components.vae, components.unet):
        module.requires_grad_(False)
        module.eval()
    stats["load_s"] = time.perf_counter() - started
    log(f"loaded {base_model} in {stats['load_s']:.1f} s (of which {stats['import_s']:.1f} s importing diffusers "
        f"and transformers)")
    return components


def add_placeholder_tokens(components, subject: str, params: dict, log: Callable[[str], None]):
    """Phase 2b: the subject's new tokens, their vectors initialised from the init word.
    Returns (token strings, the trainable fp32 vectors)."""
    tokenizer, text_encoder = components.tokenizer, components.text_encoder
    try:
        token_strings, token_note = training_tokens(subject, params["num_vectors"], tokenizer.get_vocab())
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if token_note:
        log(token_note)
    if tokenizer.add_tokens(token_strings) != len(token_strings):
        raise TrainingError(f"could not add tokens {token_strings} to the tokenizer")
    placeholder_ids = tokenizer.convert_tokens_to_ids(token_strings)
    if placeholder_ids != list(range(placeholder_ids[0], placeholder_ids[0] + len(placeholder_ids))):
        raise TrainingError(f"placeholder token ids are not contiguous: {placeholder_ids}")
    init_ids = tokenizer(params["init_word"], add_special_tokens=False).input_ids
    if not init_ids:
        raise TrainingError(f"init word {params['init_word']!r} encodes to no tokens")
    init_ids = spread_init_ids(init_ids, params["num_vectors"], log)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    base_embedding = text_encoder.get_input_embeddings()
    initial_vectors = base_embedding.weight[init_ids].detach().clone().float()
    embedding = make_placeholder_embedding(base_embedding, placeholder_ids[0], initial_vectors)
    text_encoder.set_input_embeddings(embedding)
    return token_strings, embedding.vectors


def place_models(components, precision: Precision, params: dict) -> None:
    """Phase 2c: frozen weights in the compute dtype on the device; the trained vectors stay fp32."""
    import torch

    device, dtype = precision.device, precision.compute_dtype
    components.unet.to(device, dtype=dtype)
    vectors = components.text_encoder.get_input_embeddings().vectors
    components.text_encoder.to(device, dtype=dtype)
    vectors.data = vectors.data.float()
    components.vae.to(device, dtype=torch.float32)  # the VAE only encodes latents, in fp32 (no_half_vae)
    if device.type == "cuda":
        components.unet.to(memory_format=torch.channels_last)
    if params["attention"] == "xformers":
        try:
            components.unet.enable_xformers_memory_efficient_attention()
        except Exception as error:  # noqa: BLE001 - report the library's reason plainly
            raise TrainingError(f"attention: xformers asked for but unusable here ({error}); "
                                "use attention: sdpa") from None


@dataclass
class TrainingData:
    """Everything the loop reads, resident on the device."""
    images: list[TrainingImage]
    repeats: list[int]
    prompts: list[str]
    prompt_ids: object  # [prompts, 77] token ids
    prompt_for_sample: Callable[[int, int], int]  # (image index, random pick) -> prompt row
    num_variants: int  # 2 with flip_aug (the mirrored image is a second latent)
    image_slots: list[tuple[int, int]]  # (bucket id, index inside the bucket) per image
    bucket_latents: BucketLatents  # per bucket: [images x variants, 4, h, w] (or their pixels, uncached)


def prepare_data(dataset_toml: Path, params: dict, subject: str, token_strings: list[str], components,
                 device, stats: dict, log: Callable[[str], None]) -> TrainingData:
    """Phase 3: images, their latents encoded once per bucket (or, with cache_latents false, their pixels),
    and the tokenised prompts."""
    import torch

    images, repeats = list_training_images(dataset_toml, params)
    num_variants = 2 if params["flip_aug"] else 1
    prompt_token = " ".join(token_strings)
    if params["template"] == "caption":
        prompts = caption_prompts(images, subject, prompt_token, log)
        prompt_for_sample = lambda image_index, random_pick: image_index  # noqa: E731
    else:
        prompts = [template.format(prompt_token) for template in TEMPLATES[params["template"]]]
        prompt_for_sample = lambda image_index, random_pick: random_pick % len(prompts)  # noqa: E731
    tokenizer = components.tokenizer
    prompt_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids.to(device)

    started = time.perf_counter()
    vae = components.vae
    buckets = sorted({image.bucket for image in images})
    image_slots: list[tuple[int, int]] = []
    latents_per_bucket: list[list] = [[] for _ in buckets]
    latent_generator = torch.Generator(device="cpu").manual_seed(params["seed"])
    with torch.no_grad():
        for image in images:
            bucket_id = buckets.index(image.bucket)
            image_slots.append((bucket_id, len(latents_per_bucket[bucket_id]) // num_variants))
            pixels = load_image_tensor(image.path, image.bucket)
            batch = torch.stack([pixels, pixels.flip(-1)][:num_variants]).to(device, dtype=torch.float32)
            if params["cache_latents"]:
                batch = encode_latents(vae, batch, latent_generator)
            latents_per_bucket[bucket_id].extend(batch)
    if params["cache_latents"]:
        bucket_latents = BucketLatents([torch.stack(rows).float().contiguous() for rows in latents_per_bucket])
        vae.to("cpu")
    else:  # pixels stay on the device with the VAE; every step encodes the rows it takes
        bucket_latents = BucketLatents([torch.stack(rows).contiguous() for rows in latents_per_bucket], vae)
    stats["cache_latents_s"] = time.perf_counter() - started
    log(f"{'cached latents' if params['cache_latents'] else 'loaded pixels (cache_latents: false)'} of "
        f"{len(images)} image(s) x {num_variants} variant(s) in {len(buckets)} bucket(s) "
        f"{buckets} in {stats['cache_latents_s']:.1f} s")
    return TrainingData(images, repeats, prompts, prompt_ids, prompt_for_sample, num_variants, image_slots,
                        bucket_latents)


def dataset_fingerprint(images: list[TrainingImage]) -> str:
    return hashlib.sha256("".join(sha256_file(image.path) for image in images).encode()).hexdigest()


def make_model_call(components, precision: Precision, params: dict) -> tuple[Callable, str]:
    """Phase 4a: text encoder + UNet as one call, compiled on CUDA (inductor caches compiled graphs on disk).
    Returns (call, a description of the compile setting)."""
    import torch

    device, dtype = precision.device, precision.compute_dtype
    text_encoder, unet = components.text_encoder, components.unet

    def predict_noise(noisy_latents, timesteps, input_ids):
        with torch.autocast(device.type, dtype=dtype, enabled=precision.autocast):
            encoder_hidden_states = text_encoder(input_ids)[0]
            return unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states).sample

    compile_mode = params["compile"]  # auto | false | true | a torch.compile mode name
    if compile_mode == "auto":
        # on CUDA compiling pays off from the first subject of a roster on (later jobs load the cached
        # graphs); on CPU it costs more than it saves. A compile failure falls back to eager.
        compile_mode = device.type == "cuda"
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
    uses_cuda_graphs = device.type == "cuda" and compile_mode in ("reduce-overhead", "max-autotune")
    if compile_mode:
        options = dict(dynamic=False, mode=None if compile_mode is True else compile_mode)
        if params["compile_scope"] == "blocks":
            compile_mode = f"{compile_mode}: {compile_repeated_blocks([unet, text_encoder], **options)} blocks"
        else:
            predict_noise = torch.compile(predict_noise, **options)

    def model_call(noisy_latents, timesteps, input_ids):
        if device.type == "cuda":
            noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
        if uses_cuda_graphs:  # a new replay: the previous one's outputs are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        return predict_noise(noisy_latents, timesteps, input_ids)

    described = (f"compile {compile_mode} (asked: {params['compile']}, scope {params['compile_scope']}, cache "
                 f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR') or 'torch default'}), autocast {precision.autocast}")
    return model_call, described


@dataclass
class RunState:
    """What a resumed run continues from (also what `save_state` writes)."""
    step: int
    date: str
    loss_rows: list  # (step, loss, lr, seconds since the loop began)
    saved_vectors: dict  # step -> the checkpoint's vectors (CPU, fp32)


def make_optimization(params: dict, vectors, precision: Precision):
    """Phase 4b: AdamW (or 8-bit), the lr schedule, and loss scaling for fp16."""
    import torch

    optimizer = make_optimizer(params, [vectors])
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(params))
    grad_scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.compute_dtype == torch.float16)
    return optimizer, lr_scheduler, grad_scaler


def resume_or_start(state_dir: Path, fingerprint: str, vectors, optimization, log: Callable[[str], None]) -> RunState:
    """Phase 4c: continue from the saved state when it belongs to this very run, else start at step 0."""
    state = load_state(state_dir, fingerprint, log)
    if state is None:
        return RunState(step=0, date=reproducible_date(), loss_rows=[], saved_vectors={})
    optimizer, lr_scheduler, grad_scaler = optimization
    vectors.data.copy_(state["vectors"].to(vectors.device))
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    grad_scaler.load_state_dict(state["grad_scaler"])
    log(f"resuming from step {state['step']} (state in {state_dir})")
    return RunState(step=state["step"], date=state["date"], loss_rows=[tuple(row) for row in state["loss_rows"]],
                    saved_vectors=dict(state["saved_vectors"]))


def accumulate_step_gradient(step: int, plan_groups, plan: StepPlan, data: TrainingData, model_call: Callable,
                             alphas_cumprod, grad_scaler, params: dict, device, micro_batch: int):
    """Forward + backward of every sample of one optimizer step; returns the step's mean loss (on device)."""
    import torch

    samples_per_step = params["train_batch_size"] * params["gradient_accumulation_steps"]
    step_generator = torch.Generator(device=device).manual_seed(params["seed"] * 1_000_003 + step)
    # noise and timesteps are drawn per bucket group before chunking: any micro-batch size sees the same
    # samples, so sequential (1) and fused (15) micro-batches compute the same gradient
    timesteps = torch.randint(0, len(alphas_cumprod), (samples_per_step,), generator=step_generator, device=device)
    step_loss = torch.zeros((), device=device)
    for bucket_id, start, end in plan_groups:
        latents = data.bucket_latents.take(bucket_id, plan.latent_rows[start:end], step_generator, micro_batch)
        noise = torch.randn(latents.shape, generator=step_generator, device=device)
        offset = torch.randn((end - start, latents.shape[1], 1, 1), generator=step_generator,
                             device=device) if params["noise_offset"] else None
        group_timesteps = timesteps.index_select(0, plan.positions[start:end])
        group_ids = data.prompt_ids.index_select(0, plan.prompt_rows[start:end])
        for chunk_start in range(0, end - start, micro_batch):
            chunk = slice(chunk_start, chunk_start + micro_batch)
            loss = denoising_loss(  # summed over the chunk / samples_per_step: the accumulated batch's mean
                model_call, latents[chunk], noise[chunk], group_timesteps[chunk], group_ids[chunk], alphas_cumprod,
                divisor=samples_per_step, min_snr_gamma=params["min_snr_gamma"], noise_offset=params["noise_offset"],
                offset_noise=None if offset is None else offset[chunk])
            grad_scaler.scale(loss).backward()
            step_loss += loss.detach()
    return step_loss


class LossLog:
    """The loss per step, read back from the device in one sync every few steps; `loss.tsv` rewritten as it
    grows (atomically), and a progress line every `progress_every_s` seconds (steps, samples/s, loss, ETA)
    plus a tqdm bar when stderr is a terminal."""

    def __init__(self, run: RunState, *, max_steps: int, samples_per_step: int, loss_tsv: Path, lr_scheduler,
                 progress_every_s: float | None, log: Callable[[str], None]):
        self.rows, self.max_steps, self.samples_per_step = run.loss_rows, max_steps, samples_per_step
        self.loss_tsv, self.lr_scheduler, self.log = loss_tsv, lr_scheduler, log
        self.progress_every_s = progress_every_s
        self.pending: list = []
        self.flush_times: list[tuple[int, float]] = []
        self.resumed_at_s = self.rows[-1][3] if self.rows else 0.0  # seconds the run had before this process
        self.started = time.perf_counter() - self.resumed_at_s
        self.first_step = run.step
        self.last_progress = time.perf_counter()
        self.bar = None
        if progress_every_s and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=run.step, unit="step", file=sys.stderr)

    def add(self, step_loss) -> None:
        self.pending.append(step_loss)

    def flush(self, up_to_step: int) -> None:
        """Read the pending losses (the loop's only host sync); stop on a non-finite loss."""
        if not self.pending:
            return
        import torch

        values = torch.stack(self.pending).float().tolist()
        seconds = time.perf_counter() - self.started
        self.flush_times.append((up_to_step, time.perf_counter()))
        for offset, value in enumerate(values):
            step_number = up_to_step - len(values) + 1 + offset
            if not math.isfinite(value):
                raise TrainingError(f"loss became {value} at step {step_number}; stopping "
                                    "(no final embedding written). Lower the learning rate or check the data.")
            self.rows.append((step_number, value, self.lr_scheduler.get_last_lr()[0], round(seconds, 3)))
        self.pending.clear()
        if self.bar is not None:
            self.bar.update(up_to_step - self.bar.n)
            self.bar.set_postfix(loss=f"{self.rows[-1][1]:.4f}")
        if self.progress_every_s and time.perf_counter() - self.last_progress >= self.progress_every_s:
            self.progress(up_to_step)

    def progress(self, done: int) -> None:
        """One line a person can watch, and loss.tsv as it stands (for the loss plot)."""
        self.last_progress = time.perf_counter()
        elapsed = time.perf_counter() - self.started
        steps_here = done - self.first_step
        rate = steps_here / max(elapsed - self.resumed_at_s, 1e-9)  # steps per second in this process
        recent = [row[1] for row in self.rows[-10:]]
        eta = (self.max_steps - done) / rate if rate > 0 else float("inf")
        self.log(f"step {done}/{self.max_steps}: {rate * self.samples_per_step:.1f} samples/s, loss "
                 f"{sum(recent) / len(recent):.4f} (mean of last {len(recent)}), lr {self.rows[-1][2]:.2e}, "
                 f"{elapsed:.0f} s, ETA {eta:.0f} s")
        self.write()

    def write(self) -> None:
        write_text_atomic(self.loss_tsv, "step\tloss\tlr\tseconds\n" + "".join(
            f"{step}\t{loss:.6g}\t{lr:.6g}\t{seconds:.3f}\n" for step, loss, lr, seconds in self.rows))

    def close(self) -> None:
        self.write()
        if self.bar is not None:
            self.bar.close()

    def steady_ms_per_step(self) -> float | None:
        """Milliseconds per step after the first flush (which includes compilation)."""
        if len(self.flush_times) >= 2:
            (first_step, first_time), (last_step, last_time) = self.flush_times[1], self.flush_times[-1]
            if last_step > first_step:
                return 1000 * (last_time - first_time) / (last_step - first_step)
        return None


def train_embedding(*, dataset_toml: str | os.PathLike, base_model: str, base_model_config: str = "",
                    vae: str = "", subject: str, params: dict, final_path: str | os.PathLike,
                    checkpoint_dir: str | os.PathLike, loss_tsv: str | os.PathLike,
                    state_dir: str | os.PathLike, log: Callable[[str], None] = print,
                    progress_every_s: float | None = None, components=None,
                    model_hash: str | None = None) -> TrainingResult:
    """Train one subject's embedding, phase by phase. `progress_every_s`: a progress line (and loss.tsv
    rewritten) this often; None = only at checkpoints. `components` (preloaded models: benchmarks, the GPU
    worker) with `model_hash` (model_fingerprint of base_model, recorded as when loading it here)."""
    import torch

    from tifactory.training.models import model_fingerprint

    started = time.perf_counter()
    stats: dict = {}
    final_path, checkpoint_dir, state_dir = Path(final_path), Path(checkpoint_dir), Path(state_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(params["seed"])

    # -- 1. device and precision
    precision = choose_precision(params, log)
    device = precision.device

    # -- 2. model and tokens (the model's hash, needed only for resume and metadata, on a thread meanwhile)
    hasher = ThreadPoolExecutor(max_workers=1)
    base_model_hash = hasher.submit(model_fingerprint, base_model) if components is None and not model_hash else None
    components = load_frozen_models(base_model, base_model_config, vae, precision, components, stats, log)
    token_strings, vectors = add_placeholder_tokens(components, subject, params, log)
    place_models(components, precision, params)

    # -- 3. data and latent cache
    data = prepare_data(Path(dataset_toml), params, subject, token_strings, components, device, stats, log)
    dataset_hash = hasher.submit(dataset_fingerprint, data.images)

    # -- 4. model call, optimizer, resume
    model_call, compile_note = make_model_call(components, precision, params)
    optimization = make_optimization(params, vectors, precision)
    optimizer, lr_scheduler, grad_scaler = optimization
    dataset_hash = dataset_hash.result()
    base_model_hash = base_model_hash.result() if base_model_hash is not None else model_hash or "in-memory"
    hasher.shutdown()
    fingerprint = run_fingerprint(params, dataset_hash, base_model_hash)
    run = resume_or_start(state_dir, fingerprint, vectors, optimization, log)

    def metadata_for(step: int) -> dict[str, str]:
        return build_metadata(subject=subject, step=step, resolution=params["resolution"], date=run.date,
                              recipe=params, base_model=base_model, base_model_hash=base_model_hash,
                              dataset_hash=dataset_hash, tokens=token_strings)

    def save_checkpoint(step: int, step_vectors) -> None:
        save_embedding(checkpoint_dir / checkpoint_name(subject, step), step_vectors, metadata_for(step),
                       params["save_precision"])

    for step, step_vectors in sorted(run.saved_vectors.items()):  # Snakemake cleared the checkpoint folder
        save_checkpoint(step, step_vectors)

    # -- 5. the loop
    samples_per_step = params["train_batch_size"] * params["gradient_accumulation_steps"]
    max_steps, save_every, micro_batch = params["max_train_steps"], params["save_every_n_steps"], params["micro_batch_size"]
    plan = build_step_plan(run.step, max_steps, samples_per_step, data.repeats, params["seed"], data.num_variants,
                           data.images, data.image_slots, data.prompt_for_sample, device)
    alphas_cumprod = components.noise_scheduler.alphas_cumprod.to(device, dtype=torch.float32)
    losses = LossLog(run, max_steps=max_steps, samples_per_step=samples_per_step, loss_tsv=Path(loss_tsv),
                     lr_scheduler=lr_scheduler, progress_every_s=progress_every_s, log=log)
    log(f"training {max_steps} steps x {samples_per_step} samples (micro-batch {micro_batch}), "
        f"{len(data.images)} image(s), repeats {data.repeats[0]}, {len(data.prompts)} prompt(s), tokens "
        f"{token_strings}, init {params['init_word']!r}, {compile_note}")
    loop_started = time.perf_counter()
    for step in range(run.step, max_steps):
        while True:
            try:
                step_loss = accumulate_step_gradient(step, plan.groups[step - run.step], plan, data, model_call,
                                                     alphas_cumprod, grad_scaler, params, device, micro_batch)
                break
            except torch.OutOfMemoryError:
                if micro_batch == 1:
                    raise
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                micro_batch = max(1, micro_batch // 2)
                log(f"out of GPU memory at step {step + 1}: splitting the accumulated batch into "
                    f"micro-batches of {micro_batch} (same gradient, less memory)")
        if params["max_grad_norm"]:
            grad_scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([vectors], params["max_grad_norm"])
        grad_scaler.step(optimizer)
        grad_scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.add(step_loss)

        done = step + 1
        if done == run.step + 1:  # first step: includes compilation and kernel autotuning
            losses.flush(done)
            stats["first_step_s"] = time.perf_counter() - loop_started
        if done % 10 == 0 or done % save_every == 0 or done == max_steps:
            losses.flush(done)
            if not torch.isfinite(vectors).all():
                raise TrainingError(f"embedding vectors became non-finite by step {done}; stopping")
        if done % save_every == 0 or done == max_steps:
            if done % save_every == 0:
                run.saved_vectors[done] = vectors.detach().float().cpu().clone()
                save_checkpoint(done, run.saved_vectors[done])
            save_state(state_dir, {
                "fingerprint": fingerprint, "step": done, "date": run.date,
                "vectors": vectors.detach().float().cpu().clone(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": grad_scaler.state_dict(),
                "loss_rows": run.loss_rows, "saved_vectors": run.saved_vectors})
            losses.progress(done)

    # -- 6. outputs: loss table, final embedding; then the resume state is no longer needed
    losses.close()
    save_embedding(final_path, vectors.detach().float().cpu(), metadata_for(max_steps), params["save_precision"])
    (state_dir / "state.pt").unlink(missing_ok=True)
    if (steady := losses.steady_ms_per_step()) is not None:
        stats["steady_ms_per_step"] = steady
    stats.update(total_s=time.perf_counter() - started, micro_batch_size=micro_batch,
                 samples_per_step=samples_per_step, steps=max_steps - run.step)
    if device.type == "cuda":
        stats["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    log(f"wrote {final_path} after {stats['total_s']:.1f} s; stats {json.dumps(stats)}")
    return TrainingResult(final_path=final_path, stats=stats)
