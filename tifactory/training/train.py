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
import time
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
    import torch

    class PlaceholderEmbedding(torch.nn.Module):
        def __init__(self):
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

    return PlaceholderEmbedding()


def spread_init_ids(init_ids: list[int], num_vectors: int, log: Callable[[str], None]) -> list[int]:
    """Map the init word's token ids onto num_vectors vectors (repeat or truncate, with a warning)."""
    if len(init_ids) == num_vectors:
        return list(init_ids)
    log(f"warning: init word has {len(init_ids)} token(s) for {num_vectors} vector(s); "
        f"{'repeating' if len(init_ids) < num_vectors else 'truncating'} its tokens")
    return [init_ids[index % len(init_ids)] for index in range(num_vectors)]


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
        prompts.append(" ".join(token_text if word.strip(",.;:!?()") == subject else word
                                for word in caption.split()).replace(f"{subject},", f"{token_text},"))
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


# ----------------------------------------------------------------------------- the training run

@dataclass
class TrainingResult:
    final_path: Path
    stats: dict


def train_embedding(*, dataset_toml: str | os.PathLike, base_model: str, base_model_config: str = "",
                    vae: str = "", subject: str, params: dict, final_path: str | os.PathLike,
                    checkpoint_dir: str | os.PathLike, loss_tsv: str | os.PathLike,
                    state_dir: str | os.PathLike, log: Callable[[str], None] = print,
                    components=None) -> TrainingResult:
    """Train one subject's embedding. `components` (preloaded models) is for benchmarks; else loaded."""
    import torch

    from tifactory.training.models import load_components, model_fingerprint

    started = time.perf_counter()
    stats: dict = {}
    final_path, checkpoint_dir, state_dir = Path(final_path), Path(checkpoint_dir), Path(state_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    seed = params["seed"]
    torch.manual_seed(seed)

    # -- device, precision
    device = pick_device(params["device"])
    compute_dtype = pick_compute_dtype(device, params["mixed_precision"])
    use_autocast = compute_dtype != torch.float32
    if device.type == "cpu":  # bit-exact reruns and resumes (some CPU kernels otherwise vary with load)
        torch.use_deterministic_algorithms(True, warn_only=True)
    log(f"device {device}, compute dtype {compute_dtype} (asked: {params['mixed_precision']}), "
        f"save precision {params['save_precision']}")
    if device.type == "cuda":  # which physical GPU this job got (see tifactory.gpu_slots)
        log(f"CUDA device {torch.cuda.current_device()} of {torch.cuda.device_count()} visible: "
            f"{torch.cuda.get_device_name()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")

    # -- model
    if components is None:
        components = load_components(base_model, vae=vae or None, config_dir=base_model_config or None)
        base_model_hash = model_fingerprint(base_model)
    else:
        base_model_hash = "in-memory"
    tokenizer, text_encoder, vae_model, unet = (components.tokenizer, components.text_encoder,
                                                components.vae, components.unet)
    noise_scheduler = components.noise_scheduler
    for module in (text_encoder, vae_model, unet):
        module.requires_grad_(False)
        module.eval()
    stats["load_s"] = time.perf_counter() - started
    log(f"loaded {base_model} in {stats['load_s']:.1f} s")

    # -- placeholder tokens, initialised from the init word
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
    del base_embedding
    trainable_vectors = embedding.vectors

    weight_dtype = compute_dtype
    unet.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    embedding.vectors.data = embedding.vectors.data.float()  # the trained vectors stay fp32
    vae_model.to(device, dtype=torch.float32)  # the VAE only encodes latents, in fp32 (no_half_vae)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    if params["attention"] == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as error:  # noqa: BLE001 - report the library's reason plainly
            raise TrainingError(f"attention: xformers asked for but unusable here ({error}); "
                                "use attention: sdpa") from None

    # -- data: images, latents per bucket (cached or encoded per step), tokenised prompts (on the device)
    images, repeats = list_training_images(Path(dataset_toml), params)
    dataset_hash = hashlib.sha256("".join(sha256_file(image.path) for image in images).encode()).hexdigest()
    num_variants = 2 if params["flip_aug"] else 1
    prompt_token = " ".join(token_strings)
    if params["template"] == "caption":
        prompts = caption_prompts(images, subject, prompt_token, log)
        prompt_for_sample = lambda image_index, random_pick: image_index  # noqa: E731
    else:
        prompts = [template.format(prompt_token) for template in TEMPLATES[params["template"]]]
        prompt_for_sample = lambda image_index, random_pick: random_pick % len(prompts)  # noqa: E731
    prompt_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids.to(device)

    cache_started = time.perf_counter()
    buckets = sorted({image.bucket for image in images})
    image_slots: list[tuple[int, int]] = []  # (bucket id, index inside the bucket) per image
    latents_per_bucket: list[list] = [[] for _ in buckets]
    latent_generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for image in images:
            bucket_id = buckets.index(image.bucket)
            image_slots.append((bucket_id, len(latents_per_bucket[bucket_id]) // num_variants))
            pixels = load_image_tensor(image.path, image.bucket)
            batch = torch.stack([pixels, pixels.flip(-1)][:num_variants]).to(device, dtype=torch.float32)
            if params["cache_latents"]:
                batch = encode_latents(vae_model, batch, latent_generator)
            latents_per_bucket[bucket_id].extend(batch)
    if params["cache_latents"]:
        bucket_latents = BucketLatents([torch.stack(rows).float().contiguous() for rows in latents_per_bucket])
        vae_model.to("cpu")
    else:  # pixels stay on the device with the VAE; every step encodes the rows it takes
        bucket_latents = BucketLatents([torch.stack(rows).contiguous() for rows in latents_per_bucket], vae_model)
    stats["cache_latents_s"] = time.perf_counter() - cache_started
    log(f"{'cached latents' if params['cache_latents'] else 'loaded pixels (cache_latents: false)'} of "
        f"{len(images)} image(s) x {num_variants} variant(s) in {len(buckets)} bucket(s) "
        f"{buckets} in {stats['cache_latents_s']:.1f} s")

    # -- optimizer and schedule
    optimizer = make_optimizer(params, [trainable_vectors])
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(params))
    grad_scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)
    samples_per_step = params["train_batch_size"] * params["gradient_accumulation_steps"]
    max_steps, save_every = params["max_train_steps"], params["save_every_n_steps"]
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device, dtype=torch.float32)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    snr = alphas_cumprod / (1 - alphas_cumprod)
    min_snr_gamma = params["min_snr_gamma"]

    # -- resume
    fingerprint = run_fingerprint(params, dataset_hash, base_model_hash)
    state = load_state(state_dir, fingerprint, log)
    loss_rows: list[tuple[int, float, float, float]] = []
    saved_vectors: dict[int, object] = {}
    date = reproducible_date()
    start_step = 0
    if state is not None:
        trainable_vectors.data.copy_(state["vectors"].to(device))
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        grad_scaler.load_state_dict(state["grad_scaler"])
        loss_rows = [tuple(row) for row in state["loss_rows"]]
        saved_vectors = dict(state["saved_vectors"])
        date, start_step = state["date"], state["step"]
        log(f"resuming from step {start_step} (state in {state_dir})")

    def metadata_for(step: int) -> dict[str, str]:
        return build_metadata(subject=subject, step=step, resolution=params["resolution"], date=date,
                              recipe=params, base_model=base_model, base_model_hash=base_model_hash,
                              dataset_hash=dataset_hash, tokens=token_strings)

    for step, vectors in sorted(saved_vectors.items()):  # Snakemake cleared the checkpoint folder
        save_embedding(checkpoint_dir / checkpoint_name(subject, step), vectors, metadata_for(step),
                       params["save_precision"])

    plan = build_step_plan(start_step, max_steps, samples_per_step, repeats, seed, num_variants, images,
                           image_slots, prompt_for_sample, device)

    # -- the model call: text encoder + UNet, optionally compiled (inductor caches compiled graphs on disk)
    def predict_noise(noisy_latents, timesteps, input_ids):
        with torch.autocast(device.type, dtype=compute_dtype, enabled=use_autocast):
            encoder_hidden_states = text_encoder(input_ids)[0]
            return unet(noisy_latents.to(weight_dtype), timesteps, encoder_hidden_states).sample

    compile_mode = params["compile"]  # auto | false | true | a torch.compile mode name
    if compile_mode == "auto":
        # on CUDA compiling pays off from the first subject of a roster on (inductor caches graphs on disk:
        # later jobs start in seconds); on CPU it costs more than it saves. A compile failure falls back to
        # eager with a warning instead of failing the job.
        compile_mode = device.type == "cuda"
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
    uses_cuda_graphs = device.type == "cuda" and compile_mode in ("reduce-overhead", "max-autotune")
    if compile_mode:
        predict_noise = torch.compile(predict_noise, dynamic=False,
                                      mode=None if compile_mode is True else compile_mode)

    micro_batch = params["micro_batch_size"]
    log(f"training {max_steps} steps x {samples_per_step} samples (micro-batch {micro_batch}), "
        f"{len(images)} image(s), repeats {repeats[0]}, {len(prompts)} prompt(s), tokens {token_strings}, "
        f"init {params['init_word']!r}, compile {compile_mode} (asked: {params['compile']})")

    def accumulate_step_gradient(step: int, micro_batch: int):
        """Forward + backward of every sample of one optimizer step; returns the step's mean loss."""
        step_generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
        # noise and timesteps are drawn per bucket group before chunking: any micro-batch size sees the
        # same samples, so sequential (1) and fused (15) micro-batches compute the same gradient
        timesteps = torch.randint(0, num_train_timesteps, (samples_per_step,), generator=step_generator,
                                  device=device)
        step_loss = torch.zeros((), device=device)
        for bucket_id, start, end in plan.groups[step - start_step]:
            group_latents = bucket_latents.take(bucket_id, plan.latent_rows[start:end], step_generator, micro_batch)
            group_noise = torch.randn(group_latents.shape, generator=step_generator, device=device)
            if params["noise_offset"]:
                group_noise = group_noise + params["noise_offset"] * torch.randn(
                    (end - start, group_latents.shape[1], 1, 1), generator=step_generator, device=device)
            group_timesteps = timesteps.index_select(0, plan.positions[start:end])
            group_ids = prompt_ids.index_select(0, plan.prompt_rows[start:end])
            for chunk_start in range(0, end - start, micro_batch):
                chunk = slice(chunk_start, chunk_start + micro_batch)
                latents, noise, chunk_timesteps = group_latents[chunk], group_noise[chunk], group_timesteps[chunk]
                alpha_bar = alphas_cumprod[chunk_timesteps].view(-1, 1, 1, 1)
                noisy_latents = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
                if device.type == "cuda":
                    noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
                if uses_cuda_graphs:  # a new replay: the previous one's outputs are no longer read
                    torch.compiler.cudagraph_mark_step_begin()
                noise_pred = predict_noise(noisy_latents, chunk_timesteps, group_ids[chunk])
                per_sample = ((noise_pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
                if min_snr_gamma:
                    chunk_snr = snr[chunk_timesteps]
                    per_sample = per_sample * torch.clamp(chunk_snr, max=min_snr_gamma) / chunk_snr
                loss = per_sample.sum() / samples_per_step  # mean over the whole accumulated batch
                grad_scaler.scale(loss).backward()
                step_loss += loss.detach()
        return step_loss

    pending_losses: list = []  # device tensors, read back in one sync every few steps
    flush_times: list[tuple[int, float]] = []
    loop_started = time.perf_counter() - (loss_rows[-1][3] if loss_rows else 0.0)

    def flush_losses(up_to_step: int) -> None:
        if not pending_losses:
            return
        values = torch.stack(pending_losses).float().tolist()  # the loop's only host sync
        first_step = up_to_step - len(values) + 1
        seconds = time.perf_counter() - loop_started
        flush_times.append((up_to_step, time.perf_counter()))
        for offset, value in enumerate(values):
            step_number = first_step + offset
            if not math.isfinite(value):
                raise TrainingError(f"loss became {value} at step {step_number}; stopping "
                                    "(no final embedding written). Lower the learning rate or check the data.")
            loss_rows.append((step_number, value, lr_scheduler.get_last_lr()[0], round(seconds, 3)))
        pending_losses.clear()

    for step in range(start_step, max_steps):
        while True:
            try:
                step_loss = accumulate_step_gradient(step, micro_batch)
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
            torch.nn.utils.clip_grad_norm_([trainable_vectors], params["max_grad_norm"])
        grad_scaler.step(optimizer)
        grad_scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        pending_losses.append(step_loss)

        done = step + 1
        if done == start_step + 1:  # first step: includes compilation and kernel autotuning
            flush_losses(done)
            stats["first_step_s"] = time.perf_counter() - loop_started
        if done % 10 == 0 or done % save_every == 0 or done == max_steps:
            flush_losses(done)
            if not torch.isfinite(trainable_vectors).all():
                raise TrainingError(f"embedding vectors became non-finite by step {done}; stopping")
        if done % save_every == 0 or done == max_steps:
            if done % save_every == 0:
                saved_vectors[done] = trainable_vectors.detach().float().cpu().clone()
                save_embedding(checkpoint_dir / checkpoint_name(subject, done), saved_vectors[done],
                               metadata_for(done), params["save_precision"])
            save_state(state_dir, {
                "fingerprint": fingerprint, "step": done, "date": date,
                "vectors": trainable_vectors.detach().float().cpu().clone(),
                "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "grad_scaler": grad_scaler.state_dict(), "loss_rows": loss_rows,
                "saved_vectors": saved_vectors})
            last = loss_rows[-1]
            log(f"step {done}/{max_steps}: loss {last[1]:.4f}, lr {last[2]:.2e}, {last[3]:.1f} s")

    # -- outputs: loss table, final embedding; then the resume state is no longer needed
    table = "step\tloss\tlr\tseconds\n" + "".join(
        f"{step}\t{loss:.6g}\t{lr:.6g}\t{seconds:.3f}\n" for step, loss, lr, seconds in loss_rows)
    write_text_atomic(loss_tsv, table)
    save_embedding(final_path, trainable_vectors.detach().float().cpu(), metadata_for(max_steps),
                   params["save_precision"])
    (state_dir / "state.pt").unlink(missing_ok=True)
    if len(flush_times) >= 2:
        (first_step, first_time), (last_step, last_time) = flush_times[1], flush_times[-1]
        if last_step > first_step:
            stats["steady_ms_per_step"] = 1000 * (last_time - first_time) / (last_step - first_step)
    stats.update(total_s=time.perf_counter() - started, micro_batch_size=micro_batch,
                 samples_per_step=samples_per_step, steps=max_steps - start_step)
    if device.type == "cuda":
        stats["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    log(f"wrote {final_path} after {stats['total_s']:.1f} s; stats {json.dumps(stats)}")
    return TrainingResult(final_path=final_path, stats=stats)
