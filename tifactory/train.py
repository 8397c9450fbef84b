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

from tifactory.dataset import read_dataset_toml
from tifactory.embedding import build_metadata, reproducible_date, save_embedding
from tifactory.fileio import atomic_path, sha256_file, write_text_atomic
from tifactory.templates import TEMPLATES, placeholder_tokens

STATE_FORMAT_VERSION = 1


class TrainingError(RuntimeError):
    """A training problem the user must act on (bad token, NaN loss, no images...)."""


def checkpoint_name(subject: str, step: int) -> str:
    return f"{subject}-ti-step{step:08d}.safetensors"


# ----------------------------------------------------------------------------- device and precision

def pick_device(requested: str):
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {requested!r} asked for, but no CUDA device is available")
    return device


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


# ----------------------------------------------------------------------------- the training run

def train_embedding(*, dataset_toml: str | os.PathLike, base_model: str, base_model_config: str = "",
                    vae: str = "", subject: str, params: dict, final_path: str | os.PathLike,
                    checkpoint_dir: str | os.PathLike, loss_tsv: str | os.PathLike,
                    state_dir: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    import torch

    from tifactory.models import load_components, model_fingerprint

    started = time.perf_counter()
    final_path, checkpoint_dir, state_dir = Path(final_path), Path(checkpoint_dir), Path(state_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    seed = params["seed"]
    torch.manual_seed(seed)

    # -- device, precision
    device = pick_device(params["device"])
    compute_dtype = pick_compute_dtype(device, params["mixed_precision"])
    use_autocast = compute_dtype != torch.float32
    log(f"device {device}, compute dtype {compute_dtype} (asked: {params['mixed_precision']}), "
        f"save precision {params['save_precision']}")

    # -- model
    components = load_components(base_model, vae=vae or None, config_dir=base_model_config or None)
    tokenizer, text_encoder, vae_model, unet = (components.tokenizer, components.text_encoder,
                                                components.vae, components.unet)
    noise_scheduler = components.noise_scheduler
    for module in (text_encoder, vae_model, unet):
        module.requires_grad_(False)
        module.eval()
    base_model_hash = model_fingerprint(base_model)
    log(f"loaded {base_model} in {time.perf_counter() - started:.1f} s")

    # -- placeholder tokens, initialised from the init word
    token_strings = placeholder_tokens(subject, params["num_vectors"])
    clashes = [token for token in token_strings if token in tokenizer.get_vocab()]
    if clashes:
        raise TrainingError(f"token(s) {clashes} already exist in the tokenizer's vocabulary; "
                            "rename the subject so its trigger token is new")
    if tokenizer.add_tokens(token_strings) != len(token_strings):
        raise TrainingError(f"could not add tokens {token_strings} to the tokenizer")
    placeholder_ids = tokenizer.convert_tokens_to_ids(token_strings)
    if placeholder_ids != list(range(placeholder_ids[0], placeholder_ids[0] + len(placeholder_ids))):
        raise TrainingError(f"placeholder token ids are not contiguous: {placeholder_ids}")
    init_ids = tokenizer(params["init_word"], add_special_tokens=False).input_ids
    if not init_ids:
        raise TrainingError(f"init word {params['init_word']!r} encodes to no tokens")
    init_ids = spread_init_ids(init_ids, params["num_vectors"], log)
    text_encoder.resize_token_embeddings(len(tokenizer))
    base_embedding = text_encoder.get_input_embeddings()
    initial_vectors = base_embedding.weight[init_ids].detach().clone().float()
    embedding = make_placeholder_embedding(base_embedding, placeholder_ids[0], initial_vectors)
    text_encoder.set_input_embeddings(embedding)
    trainable_vectors = embedding.vectors

    weight_dtype = compute_dtype
    unet.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    embedding.vectors.data = embedding.vectors.data.float()  # the trained vectors stay fp32
    vae_model.to(device, dtype=torch.float32)

    # -- data: images, cached latents, tokenised prompts (all resident on the device)
    images, repeats = list_training_images(Path(dataset_toml), params)
    dataset_hash = hashlib.sha256("".join(sha256_file(image.path) for image in images).encode()).hexdigest()
    num_variants = 2 if params["flip_aug"] else 1
    if params["template"] not in TEMPLATES:
        raise TrainingError(f"template {params['template']!r} is not supported by this trainer yet")
    templates = TEMPLATES[params["template"]]
    prompt_token = " ".join(token_strings)
    prompts = [template.format(prompt_token) for template in templates]
    prompt_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids.to(device)

    cache_started = time.perf_counter()
    latent_generator = torch.Generator(device="cpu").manual_seed(seed)
    latents_by_image: list[list] = []
    with torch.no_grad():
        for image in images:
            pixels = load_image_tensor(image.path, image.bucket)
            variants = [pixels, pixels.flip(-1)][:num_variants]
            batch = torch.stack(variants).to(device, dtype=torch.float32)
            distribution = vae_model.encode(batch).latent_dist
            noise = torch.randn(distribution.mean.shape, generator=latent_generator).to(device)
            latents = (distribution.mean + distribution.std * noise) * vae_model.config.scaling_factor
            latents_by_image.append([latent.to(weight_dtype) for latent in latents])
    vae_model.to("cpu")
    log(f"cached latents of {len(images)} image(s) x {num_variants} variant(s) in "
        f"{time.perf_counter() - cache_started:.1f} s")

    # -- optimizer and schedule
    optimizer = torch.optim.AdamW([trainable_vectors], lr=params["learning_rate"],
                                  betas=(params["adam_beta1"], params["adam_beta2"]),
                                  eps=params["adam_epsilon"], weight_decay=params["weight_decay"])
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(params))
    grad_scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)
    samples_per_step = params["train_batch_size"] * params["gradient_accumulation_steps"]
    max_steps, save_every = params["max_train_steps"], params["save_every_n_steps"]
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device, dtype=torch.float32)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps

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
                              dataset_hash=dataset_hash)

    for step, vectors in sorted(saved_vectors.items()):  # Snakemake cleared the checkpoint folder
        save_embedding(checkpoint_dir / checkpoint_name(subject, step), vectors, metadata_for(step),
                       params["save_precision"])

    log(f"training {max_steps} steps x {samples_per_step} samples "
        f"(micro-batch {params['micro_batch_size']}), {len(images)} image(s), repeats {repeats[0]}, "
        f"{len(prompts)} templates, tokens {token_strings}, init {params['init_word']!r}")
    pending_losses: list = []  # device tensors, read back in one sync every few steps
    loop_started = time.perf_counter() - (loss_rows[-1][3] if loss_rows else 0.0)

    def flush_losses(up_to_step: int) -> None:
        if not pending_losses:
            return
        values = torch.stack(pending_losses).float().tolist()
        first_step = up_to_step - len(values) + 1
        seconds = time.perf_counter() - loop_started
        for offset, value in enumerate(values):
            step_number = first_step + offset
            if not math.isfinite(value):
                raise TrainingError(f"loss became {value} at step {step_number}; stopping "
                                    "(no final embedding written). Lower the learning rate or check the data.")
            loss_rows.append((step_number, value, lr_scheduler.get_last_lr()[0], round(seconds, 3)))
        pending_losses.clear()

    for step in range(start_step, max_steps):
        step_generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
        samples = samples_for_step(step, samples_per_step, repeats, seed, num_variants, len(prompts))
        # noise and timesteps are drawn per bucket group, before chunking: any micro-batch size sees
        # the same samples, so sequential (1) and fused (15) micro-batches compute the same gradient
        timesteps = torch.randint(0, num_train_timesteps, (samples_per_step,), generator=step_generator,
                                  device=device)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for position, (image_index, _, _) in enumerate(samples):
            by_bucket.setdefault(images[image_index].bucket, []).append(position)
        step_loss = torch.zeros((), device=device)
        for positions in by_bucket.values():
            group_latents = torch.stack([latents_by_image[samples[p][0]][samples[p][1]] for p in positions]).float()
            group_noise = torch.randn(group_latents.shape, generator=step_generator, device=device)
            if params["noise_offset"]:
                group_noise = group_noise + params["noise_offset"] * torch.randn(
                    (len(positions), group_latents.shape[1], 1, 1), generator=step_generator, device=device)
            group_timesteps = timesteps[positions]
            group_ids = prompt_ids[[samples[p][2] for p in positions]]
            for start in range(0, len(positions), params["micro_batch_size"]):
                chunk = slice(start, start + params["micro_batch_size"])
                latents, noise, chunk_timesteps = group_latents[chunk], group_noise[chunk], group_timesteps[chunk]
                alpha_bar = alphas_cumprod[chunk_timesteps].view(-1, 1, 1, 1)
                noisy_latents = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
                with torch.autocast(device.type, dtype=compute_dtype, enabled=use_autocast):
                    encoder_hidden_states = text_encoder(group_ids[chunk])[0]
                    noise_pred = unet(noisy_latents.to(weight_dtype), chunk_timesteps, encoder_hidden_states).sample
                per_sample = ((noise_pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
                loss = per_sample.sum() / samples_per_step  # mean over the whole accumulated batch
                grad_scaler.scale(loss).backward()
                step_loss += loss.detach()
        if params["max_grad_norm"]:
            grad_scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([trainable_vectors], params["max_grad_norm"])
        grad_scaler.step(optimizer)
        grad_scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        pending_losses.append(step_loss)

        done = step + 1
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
    log(f"wrote {final_path} after {time.perf_counter() - started:.1f} s")
    return final_path
