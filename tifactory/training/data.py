"""The training data pipeline: images and their buckets, latents, the step plan and the prompts.

kohya's data handling, made deterministic: each image goes to an aspect-ratio bucket (`bucket_resolution`),
is resized to cover it and centre-cropped (`load_image_tensor`), and encoded once into latents (or at every
step, with cache_latents false). Which image, flip variant and template each sample of each step uses is
derived from (seed, epoch) and (seed, sample index) alone (`samples_for_step`), so a resumed run sees the same
samples as an uninterrupted one; `build_step_plan` turns that into device-resident indices for the loop.
The model family (tifactory.families) tokenises the prompts and scales the latents.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tifactory.errors import TifactoryError
from tifactory.families.base import SampleSize
from tifactory.fileio import sha256_file
from tifactory.photos.dataset import read_dataset_toml
from tifactory.training.settings import TrainSettings
from tifactory.training.templates import TEMPLATES


class TrainingError(TifactoryError, RuntimeError):
    """A training problem the user must act on (bad token, NaN loss, no images...)."""


# ----------------------------------------------------------------------------- images and buckets

def bucket_resolution(width: int, height: int, *, resolution: int, enable_bucket: bool, min_bucket_reso: int,
                      max_bucket_reso: int, bucket_reso_steps: int, bucket_no_upscale: bool) -> tuple[int, int]:
    """kohya-style bucket for one image: area <= resolution², sides multiples of the step, in range."""
    if not enable_bucket:
        return resolution, resolution
    scale = math.sqrt(resolution ** 2 / (width * height))
    if bucket_no_upscale:
        scale = min(scale, 1.0)
    step = bucket_reso_steps
    bucket_w = max(min_bucket_reso, min(max_bucket_reso, int(width * scale) // step * step))
    bucket_h = max(min_bucket_reso, min(max_bucket_reso, int(height * scale) // step * step))
    return bucket_w, bucket_h


def settings_bucket(settings: TrainSettings) -> dict:
    """bucket_resolution's keywords from the training settings."""
    return {name: getattr(settings, name) for name in ("resolution", "enable_bucket", "min_bucket_reso",
                                                        "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")}


def cover_crop(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """How an image of `width` x `height` fills its bucket: resized to cover it, then centre-cropped.
    Returns (resized width, resized height, crop left, crop top)."""
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    resized_w, resized_h = max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
    return resized_w, resized_h, (resized_w - bucket_w) // 2, (resized_h - bucket_h) // 2


def sample_sizes(width: int, height: int, bucket: tuple[int, int], flipped: bool) -> SampleSize:
    """The sizes a family may condition on (SDXL's time ids) for one image as `load_image_tensor` crops it;
    a mirrored variant's crop is mirrored too (its left edge measured from the other side)."""
    resized_w, _, left, top = cover_crop(width, height, bucket)
    if flipped:
        left = resized_w - bucket[0] - left
    return SampleSize(original=(height, width), crop_top_left=(top, left), target=(bucket[1], bucket[0]))


def load_image_tensor(path: Path, bucket: tuple[int, int]):
    """Resize (cover) + centre-crop to the bucket; return a [3, H, W] tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        bucket_w, bucket_h = bucket
        resized_w, resized_h, left, top = cover_crop(image.width, image.height, bucket)
        if (resized_w, resized_h) != image.size:
            image = image.resize((resized_w, resized_h), Image.Resampling.LANCZOS)
        image = image.crop((left, top, left + bucket_w, top + bucket_h))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def encode_latents(vae, pixels, generator, scale: float):
    """One sample of the VAE's latent distribution of `pixels` [n, 3, H, W], times the family's latent `scale`;
    the noise comes from `generator` (drawn on its device)."""
    import torch

    distribution = vae.encode(pixels.to(vae.dtype)).latent_dist
    noise = torch.randn(distribution.mean.shape, generator=generator, device=generator.device).to(pixels.device)
    return ((distribution.mean + distribution.std * noise) * scale).float()


@dataclass
class BucketLatents:
    """The latents of each bucket's images (× flip variants): `rows[bucket]` holds them cached
    (train.cache_latents: true, the recipe), or holds the images' pixels and `vae` encodes the rows a step
    takes, a fresh sample each time (cache_latents: false, as kohya without --cache_latents)."""

    rows: list
    vae: object = None
    scale: float = 0.0  # the latents' scale, for rows encoded at each step

    def take(self, bucket_id: int, row_indices, generator, chunk: int):
        chosen = self.rows[bucket_id].index_select(0, row_indices)
        if self.vae is None:
            return chosen
        import torch

        with torch.no_grad():  # in chunks of the micro-batch: the out-of-memory fallback shrinks both
            return torch.cat([encode_latents(self.vae, chosen[start:start + chunk], generator, self.scale)
                              for start in range(0, len(chosen), chunk)]).float()


@dataclass
class TrainingImage:
    path: Path
    bucket: tuple[int, int]
    size: tuple[int, int]  # (width, height) as stored


def list_training_images(dataset_toml: Path, settings: TrainSettings) -> tuple[list[TrainingImage], list[int]]:
    """Images and their per-epoch repeat counts, from a kohya dataset config."""
    from PIL import Image

    images, repeats = [], []
    for subset in read_dataset_toml(dataset_toml):
        for path in subset["images"]:
            with Image.open(path) as image:
                bucket = bucket_resolution(image.width, image.height, **settings_bucket(settings))
                images.append(TrainingImage(path=path, bucket=bucket, size=(image.width, image.height)))
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


@dataclass
class TrainingData:
    """Everything the loop reads, resident on the device."""
    images: list[TrainingImage]
    repeats: list[int]
    prompts: list[str]
    prompt_ids: list  # per tokenizer: [prompts, max_length] token ids
    prompt_for_sample: Callable[[int, int], int]  # (image index, random pick) -> prompt row
    num_variants: int  # 2 with flip_aug (the mirrored image is a second latent)
    image_slots: list[tuple[int, int]]  # (bucket id, index inside the bucket) per image
    bucket_latents: BucketLatents  # per bucket: [images x variants, 4, h, w] (or their pixels, uncached)
    bucket_sizes: list  # per bucket: [images x variants, 6] long (original h, w, crop top, left, target h, w)


def training_prompts(images: list[TrainingImage], settings: TrainSettings, subject: str, token_strings: list[str],
                     log: Callable[[str], None]) -> tuple[list[str], Callable[[int, int], int]]:
    """The prompts and which one a sample uses: a template drawn at random (kohya's object/style templates),
    or in caption mode the image's own caption. Returns (prompts, (image index, random pick) -> prompt row)."""
    prompt_token = " ".join(token_strings)
    if settings.template == "caption":
        prompts = caption_prompts(images, subject, prompt_token, log)
        return prompts, lambda image_index, random_pick: image_index
    prompts = [template.format(prompt_token) for template in TEMPLATES[settings.template]]
    return prompts, lambda image_index, random_pick: random_pick % len(prompts)


def prepare_data(dataset_toml: Path, settings: TrainSettings, subject: str, token_strings: list[str], family,
                 components, device, stats: dict, log: Callable[[str], None]) -> TrainingData:
    """Phase 3: images, their latents encoded once per bucket (or, with cache_latents false, their pixels),
    their sizes, and the prompts tokenised by every tokenizer of the family."""
    import torch

    images, repeats = list_training_images(dataset_toml, settings)
    num_variants = 2 if settings.flip_aug else 1
    prompts, prompt_for_sample = training_prompts(images, settings, subject, token_strings, log)
    prompt_ids = [ids.to(device) for ids in family.tokenize(components, prompts)]

    started = time.perf_counter()
    vae = components.vae
    scale = family.scaling_factor(vae)
    buckets = sorted({image.bucket for image in images})
    image_slots: list[tuple[int, int]] = []
    latents_per_bucket: list[list] = [[] for _ in buckets]
    sizes_per_bucket: list[list] = [[] for _ in buckets]
    latent_generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    with torch.no_grad():
        for image in images:
            bucket_id = buckets.index(image.bucket)
            image_slots.append((bucket_id, len(latents_per_bucket[bucket_id]) // num_variants))
            pixels = load_image_tensor(image.path, image.bucket)
            batch = torch.stack([pixels, pixels.flip(-1)][:num_variants]).to(device, dtype=torch.float32)
            if settings.cache_latents:
                batch = encode_latents(vae, batch, latent_generator, scale)
            latents_per_bucket[bucket_id].extend(batch)
            for variant in range(num_variants):
                size = sample_sizes(*image.size, image.bucket, flipped=variant == 1)
                sizes_per_bucket[bucket_id].append([*size.original, *size.crop_top_left, *size.target])
    bucket_sizes = [torch.tensor(rows, dtype=torch.long, device=device) for rows in sizes_per_bucket]
    if settings.cache_latents:
        bucket_latents = BucketLatents([torch.stack(rows).float().contiguous() for rows in latents_per_bucket])
        vae.to("cpu")
    else:  # pixels stay on the device with the VAE; every step encodes the rows it takes
        bucket_latents = BucketLatents([torch.stack(rows).contiguous() for rows in latents_per_bucket], vae, scale)
    stats["cache_latents_s"] = time.perf_counter() - started
    log(f"{'cached latents' if settings.cache_latents else 'loaded pixels (cache_latents: false)'} of "
        f"{len(images)} image(s) x {num_variants} variant(s) in {len(buckets)} bucket(s) "
        f"{buckets} in {stats['cache_latents_s']:.1f} s")
    return TrainingData(images, repeats, prompts, prompt_ids, prompt_for_sample, num_variants, image_slots,
                        bucket_latents, bucket_sizes)


def dataset_fingerprint(images: list[TrainingImage]) -> str:
    return hashlib.sha256("".join(sha256_file(image.path) for image in images).encode()).hexdigest()


