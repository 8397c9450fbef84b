"""Textual-inversion training: the published kohya recipe, read top to bottom.

Only the subject's new token vectors train (one tensor per text encoder); everything else is frozen. Every
random choice (data order, templates, noise, timesteps) is derived from (seed, epoch) or (seed, step), so a
run resumed from its last saved state ends byte-identical to an uninterrupted one on CPU.

`train_embedding` runs the phases in order: device and precision; the model (loaded by its family,
tifactory.families) and the placeholder tokens; the data (tifactory.training.data); the model call, optimizer
and resume; the loop; the outputs. What differs between model families (text encoders, conditioning, the
UNet call, the file's tensors) is asked of the family.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tifactory.device import pick_device
from tifactory.families import ModelSpec, family_named
from tifactory.families.base import PlaceholderError
from tifactory.fileio import atomic_path, write_text_atomic
from tifactory.training.data import (
    StepPlan,
    TrainingData,
    TrainingError,
    build_step_plan,
    dataset_fingerprint,
    prepare_data,
)
from tifactory.training.embedding import (TRIGGER_SUFFIX, build_metadata, checkpoint_name, reproducible_date,
                                          save_embedding)
from tifactory.training.settings import TrainSettings
from tifactory.training.templates import training_tokens

STATE_FORMAT_VERSION = 2  # 2: the vectors are a list, one tensor per text encoder


# ----------------------------------------------------------------------------- precision

def pick_compute_dtype(device, mixed_precision: str):
    """bf16 where supported, fp16 (with loss scaling) where bf16 is missing, fp32 on CPU."""
    import torch

    if device.type != "cuda" or mixed_precision == "no":
        return torch.float32
    if mixed_precision == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


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


# ----------------------------------------------------------------------------- optimizer schedule

def make_optimizer(settings: TrainSettings, trainable: list):
    """AdamW (torch) or AdamW8bit (bitsandbytes, when installed) with the config's betas, eps, decay."""
    import torch

    options = dict(lr=settings.learning_rate, betas=(settings.adam_beta1, settings.adam_beta2),
                   eps=settings.adam_epsilon, weight_decay=settings.weight_decay)
    if settings.optimizer == "AdamW":
        return torch.optim.AdamW(trainable, **options)
    try:
        import bitsandbytes
    except ImportError:
        raise TrainingError("optimizer AdamW8bit needs bitsandbytes (pip install bitsandbytes, CUDA only); "
                            "or set train.optimizer: AdamW") from None
    return bitsandbytes.optim.AdamW8bit(trainable, **options)


def lr_lambda_for(settings: TrainSettings) -> Callable[[int], float]:
    warmup, total, kind = settings.lr_warmup_steps, settings.max_train_steps, settings.lr_scheduler

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

def run_fingerprint(settings: TrainSettings, dataset_hash: str, base_model_hash: str) -> str:
    payload = json.dumps({"params": settings.as_dict(), "dataset": dataset_hash, "base_model": base_model_hash,
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


# ----------------------------------------------------------------------------- the loss of a batch

def denoising_loss(predict_noise: Callable, latents, noise, timesteps, inputs, alphas_cumprod, *,
                   divisor: int, min_snr_gamma: float = 0.0, noise_offset: float = 0.0, offset_noise=None):
    """The training loss of one batch: kohya's epsilon MSE, summed over the samples and divided by `divisor`.

    `noise` is the per-sample Gaussian noise; with `noise_offset` the per-channel `offset_noise` [n, C, 1, 1]
    is added to it (kohya's --noise_offset). The latents are noised to `timesteps` with the schedule's
    `alphas_cumprod` (as DDPMScheduler.add_noise does) and `predict_noise(noisy_latents, timesteps,
    inputs)` is the text encoder(s) + UNet (`inputs`: whatever the conditioning needs, passed as it is). Each sample's mean squared error is weighted by
    min(SNR, gamma) / SNR when `min_snr_gamma` is set. Called once per micro-batch with
    divisor = batch size x gradient accumulation, the gradients add up to those of kohya's loop.
    """
    import torch

    if noise_offset:
        noise = noise + noise_offset * offset_noise
    alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy_latents = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    noise_pred = predict_noise(noisy_latents, timesteps, inputs)
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


def choose_precision(settings: TrainSettings, log: Callable[[str], None]) -> Precision:
    """Phase 1: the device and the dtype the frozen models run in."""
    import torch

    device = pick_device(settings.device)
    compute_dtype = pick_compute_dtype(device, settings.mixed_precision)
    if device.type == "cpu":  # bit-exact reruns and resumes (some CPU kernels otherwise vary with load)
        torch.use_deterministic_algorithms(True, warn_only=True)
    log(f"device {device}, compute dtype {compute_dtype} (asked: {settings.mixed_precision}), "
        f"save precision {settings.save_precision}")
    if device.type == "cuda":  # which physical GPU this job got (see tifactory.gpu_slots)
        log(f"CUDA device {torch.cuda.current_device()} of {torch.cuda.device_count()} visible: "
            f"{torch.cuda.get_device_name()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return Precision(device, compute_dtype, compute_dtype != torch.float32 and settings.autocast)


def load_frozen_models(spec: ModelSpec, family, precision: Precision, components, stats: dict,
                       log: Callable[[str], None]):
    """Phase 2a: the base model's parts, frozen, loaded by its family; weights read straight onto the device,
    the UNet in the compute dtype. `components`: models already loaded (a benchmark, the GPU worker)."""
    started = time.perf_counter()
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401 - timed apart from the weights
    from transformers import CLIPTextModel  # noqa: F401
    stats["import_s"] = time.perf_counter() - started
    if components is None:
        components = family.load(spec, device=precision.device, unet_dtype=precision.compute_dtype)
    for module in (*components.text_encoders, components.vae, components.unet):
        module.requires_grad_(False)
        module.eval()
    stats["load_s"] = time.perf_counter() - started
    log(f"loaded {spec.name} ({family.name}) in {stats['load_s']:.1f} s (of which {stats['import_s']:.1f} s "
        "importing diffusers and transformers)")
    return components


def add_placeholder_tokens(family, components, subject: str, settings: TrainSettings,
                           log: Callable[[str], None]) -> tuple[list[str], list]:
    """Phase 2b: the subject's new tokens in every tokenizer, their vectors initialised from the init word.
    Returns (token strings, the trainable fp32 vectors: one tensor per text encoder)."""
    try:
        token_strings, token_note = training_tokens(subject, settings.num_vectors,
                                                    components.tokenizers[0].get_vocab())
        if token_note:
            log(token_note)
        return token_strings, family.add_placeholders(components, token_strings, settings.init_word, log)
    except (ValueError, PlaceholderError) as error:
        raise TrainingError(str(error)) from None


def place_models(family, components, precision: Precision, settings: TrainSettings) -> None:
    """Phase 2c: frozen weights in the compute dtype on the device; the trained vectors stay fp32."""
    import torch

    device, dtype = precision.device, precision.compute_dtype
    components.unet.to(device, dtype=dtype)
    for text_encoder, vectors in zip(components.text_encoders, family.placeholder_vectors(components)):
        text_encoder.to(device, dtype=dtype)
        vectors.data = vectors.data.float()
    components.vae.to(device, dtype=family.vae_dtype(dtype))  # the VAE only encodes latents
    if device.type == "cuda":
        components.unet.to(memory_format=torch.channels_last)
    if settings.gradient_checkpointing:  # recomputed in the backward pass: the same gradient, less memory
        components.unet.enable_gradient_checkpointing()
    if settings.attention == "xformers":
        try:
            components.unet.enable_xformers_memory_efficient_attention()
        except Exception as error:  # noqa: BLE001 - report the library's reason plainly
            raise TrainingError(f"attention: xformers asked for but unusable here ({error}); "
                                "use attention: sdpa") from None


def make_model_call(family, components, precision: Precision, settings: TrainSettings) -> tuple[Callable, str]:
    """Phase 4a: text encoder(s) + UNet as one call, `model_call(noisy_latents, timesteps, (ids per encoder,
    sizes))`, compiled on CUDA (inductor caches compiled graphs on disk). Returns (call, a description of the
    compile setting)."""
    import torch

    device, dtype = precision.device, precision.compute_dtype
    unet = components.unet

    def predict_noise(noisy_latents, timesteps, inputs):
        ids_per_encoder, sizes = inputs
        with torch.autocast(device.type, dtype=dtype, enabled=precision.autocast):
            conditioning = family.extra_conditioning(family.encode_text(components, ids_per_encoder), sizes)
            return family.predict_noise(unet, noisy_latents.to(dtype), timesteps, conditioning)

    compile_mode = settings.compile  # auto | false | true | a torch.compile mode name
    if compile_mode == "auto":
        # on CUDA compiling pays off from the first subject of a roster on (later jobs load the cached
        # graphs); on CPU it costs more than it saves. A compile failure falls back to eager.
        compile_mode = device.type == "cuda"
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
    uses_cuda_graphs = device.type == "cuda" and compile_mode in ("reduce-overhead", "max-autotune")
    if compile_mode:
        options = dict(dynamic=False, mode=None if compile_mode is True else compile_mode)
        if settings.compile_scope == "blocks":
            blocks = compile_repeated_blocks([unet, *components.text_encoders], **options)
            compile_mode = f"{compile_mode}: {blocks} blocks"
        else:
            predict_noise = torch.compile(predict_noise, **options)

    def model_call(noisy_latents, timesteps, inputs):
        if device.type == "cuda":
            noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
        if uses_cuda_graphs:  # a new replay: the previous one's outputs are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        return predict_noise(noisy_latents, timesteps, inputs)

    described = (f"compile {compile_mode} (asked: {settings.compile}, scope {settings.compile_scope}, cache "
                 f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR') or 'torch default'}), autocast {precision.autocast}")
    return model_call, described


@dataclass
class RunState:
    """What a resumed run continues from (also what `save_state` writes)."""
    step: int
    date: str
    loss_rows: list  # (step, loss, lr, seconds since the loop began)
    saved_vectors: dict  # step -> the checkpoint's vectors, one tensor per encoder (CPU, fp32)


def make_optimization(settings: TrainSettings, vectors: list, precision: Precision):
    """Phase 4b: AdamW (or 8-bit), the lr schedule, and loss scaling for fp16."""
    import torch

    optimizer = make_optimizer(settings, vectors)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(settings))
    grad_scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.compute_dtype == torch.float16)
    return optimizer, lr_scheduler, grad_scaler


def resume_or_start(state_dir: Path, fingerprint: str, vectors: list, optimization,
                    log: Callable[[str], None]) -> RunState:
    """Phase 4c: continue from the saved state when it belongs to this very run, else start at step 0."""
    state = load_state(state_dir, fingerprint, log)
    if state is None:
        return RunState(step=0, date=reproducible_date(), loss_rows=[], saved_vectors={})
    optimizer, lr_scheduler, grad_scaler = optimization
    for tensor, saved in zip(vectors, state["vectors"], strict=True):
        tensor.data.copy_(saved.to(tensor.device))
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    grad_scaler.load_state_dict(state["grad_scaler"])
    log(f"resuming from step {state['step']} (state in {state_dir})")
    return RunState(step=state["step"], date=state["date"], loss_rows=[tuple(row) for row in state["loss_rows"]],
                    saved_vectors=dict(state["saved_vectors"]))


def accumulate_step_gradient(step: int, plan_groups, plan: StepPlan, data: TrainingData, model_call: Callable,
                             alphas_cumprod, grad_scaler, settings: TrainSettings, device, micro_batch: int):
    """Forward + backward of every sample of one optimizer step; returns the step's mean loss (on device)."""
    import torch

    samples_per_step = settings.samples_per_step
    step_generator = torch.Generator(device=device).manual_seed(settings.seed * 1_000_003 + step)
    # noise and timesteps are drawn per bucket group before chunking: any micro-batch size sees the same
    # samples, so sequential (1) and fused (15) micro-batches compute the same gradient
    timesteps = torch.randint(0, len(alphas_cumprod), (samples_per_step,), generator=step_generator, device=device)
    step_loss = torch.zeros((), device=device)
    for bucket_id, start, end in plan_groups:
        rows = plan.latent_rows[start:end]
        latents = data.bucket_latents.take(bucket_id, rows, step_generator, micro_batch)
        noise = torch.randn(latents.shape, generator=step_generator, device=device)
        offset = torch.randn((end - start, latents.shape[1], 1, 1), generator=step_generator,
                             device=device) if settings.noise_offset else None
        group_timesteps = timesteps.index_select(0, plan.positions[start:end])
        group_ids = [ids.index_select(0, plan.prompt_rows[start:end]) for ids in data.prompt_ids]
        group_sizes = data.bucket_sizes[bucket_id].index_select(0, rows)
        for chunk_start in range(0, end - start, micro_batch):
            chunk = slice(chunk_start, chunk_start + micro_batch)
            inputs = ([ids[chunk] for ids in group_ids], group_sizes[chunk])
            loss = denoising_loss(  # summed over the chunk / samples_per_step: the accumulated batch's mean
                model_call, latents[chunk], noise[chunk], group_timesteps[chunk], inputs, alphas_cumprod,
                divisor=samples_per_step, min_snr_gamma=settings.min_snr_gamma, noise_offset=settings.noise_offset,
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
        self.progress_step: int | None = None  # the step of the last progress line
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
        """One line a person can watch (in the log and, in a job, on the console), and loss.tsv as it stands (for
        the loss plot). Once per step: a checkpoint step that also fell due for a timed line prints one."""
        if self.progress_step == done:
            return
        self.progress_step = done
        self.last_progress = time.perf_counter()
        elapsed = time.perf_counter() - self.started
        steps_here = done - self.first_step
        rate = steps_here / max(elapsed - self.resumed_at_s, 1e-9)  # steps per second in this process
        recent = [row[1] for row in self.rows[-10:]]
        eta = (self.max_steps - done) / rate if rate > 0 else float("inf")
        line = (f"step {done}/{self.max_steps}: {rate * self.samples_per_step:.1f} samples/s, loss "
                f"{sum(recent) / len(recent):.4f} (mean of last {len(recent)}), lr {self.rows[-1][2]:.2e}, "
                f"{elapsed:.0f} s, ETA {eta:.0f} s")
        self.log(line)
        from tifactory.jobs import console

        console(line)
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


@functools.lru_cache(maxsize=16)
def _fingerprint_cached(path: str, version: tuple) -> str:
    from tifactory.families.loading import model_fingerprint

    return model_fingerprint(path)


def model_hash(spec: ModelSpec, preloaded: bool) -> str:
    """The base model's sha256 (tifactory.families.loading.model_fingerprint), cached per version of its files
    (each file's size and mtime), so a long-lived process hashes each model once. A model handed over in memory
    with no file behind it (a benchmark's random model) is "in-memory"."""
    path = Path(spec.path)
    if preloaded and not path.exists():
        return "in-memory"
    files = [path] if path.is_file() else sorted(file for file in path.rglob("*") if file.is_file())
    version = tuple((str(file), file.stat().st_size, file.stat().st_mtime_ns) for file in files)
    return _fingerprint_cached(str(path), version)


def train_embedding(*, dataset_toml: str | os.PathLike, model: ModelSpec, subject: str, settings: TrainSettings,
                    final_path: str | os.PathLike, checkpoint_dir: str | os.PathLike, loss_tsv: str | os.PathLike,
                    state_dir: str | os.PathLike, log: Callable[[str], None] = print,
                    progress_every_s: float | None = None, components=None,
                    trigger: str | None = None) -> TrainingResult:
    """Train one subject's embedding on `model`, phase by phase. `trigger`: the word people type, the
    embedding's title (the roster's output_name; None = `<subject>-ti`). `progress_every_s`: a progress line (and
    loss.tsv rewritten) this often; None = only at checkpoints. `components`: `model` already loaded by its
    family (a benchmark, the GPU worker: a fresh copy of the tokenizers and text encoders, since the
    placeholder tokens change them)."""
    import torch

    started = time.perf_counter()
    stats: dict = {}
    final_path, checkpoint_dir, state_dir = Path(final_path), Path(checkpoint_dir), Path(state_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    family = family_named(model.family)

    # -- 1. device and precision
    precision = choose_precision(settings, log)
    device = precision.device

    # -- 2. model and tokens (the model's hash, needed only for resume and metadata, on a thread meanwhile)
    hasher = ThreadPoolExecutor(max_workers=1)
    base_model_hash = hasher.submit(model_hash, model, components is not None)
    components = load_frozen_models(model, family, precision, components, stats, log)
    token_strings, vectors = add_placeholder_tokens(family, components, subject, settings, log)
    place_models(family, components, precision, settings)

    # -- 3. data and latent cache
    data = prepare_data(Path(dataset_toml), settings, subject, token_strings, family, components, device, stats,
                        log)
    dataset_hash = hasher.submit(dataset_fingerprint, data.images)

    # -- 4. model call, optimizer, resume
    model_call, compile_note = make_model_call(family, components, precision, settings)
    optimization = make_optimization(settings, vectors, precision)
    optimizer, lr_scheduler, grad_scaler = optimization
    dataset_hash, base_model_hash = dataset_hash.result(), base_model_hash.result()
    hasher.shutdown()
    fingerprint = run_fingerprint(settings, dataset_hash, base_model_hash)
    run = resume_or_start(state_dir, fingerprint, vectors, optimization, log)

    def metadata_for(step: int) -> dict[str, str]:
        return build_metadata(subject=subject, title=trigger or f"{subject}{TRIGGER_SUFFIX}", step=step,
                              resolution=settings.resolution, date=run.date,
                              recipe=settings.as_dict(), architecture=family.architecture, base_model=model.name,
                              base_model_hash=base_model_hash, dataset_hash=dataset_hash, tokens=token_strings)

    def save_checkpoint(step: int, step_vectors: list) -> None:
        save_embedding(checkpoint_dir / checkpoint_name(subject, step), family.embedding_tensors(step_vectors),
                       metadata_for(step), settings.save_precision)

    def vectors_now() -> list:
        return [tensor.detach().float().cpu().clone() for tensor in vectors]

    for step, step_vectors in sorted(run.saved_vectors.items()):  # Snakemake cleared the checkpoint folder
        save_checkpoint(step, step_vectors)

    # -- 5. the loop
    samples_per_step = settings.samples_per_step
    max_steps, save_every = settings.max_train_steps, settings.save_every_n_steps
    micro_batch = settings.micro_batch_size
    plan = build_step_plan(run.step, max_steps, samples_per_step, data.repeats, settings.seed, data.num_variants,
                           data.images, data.image_slots, data.prompt_for_sample, device)
    alphas_cumprod = components.noise_scheduler.alphas_cumprod.to(device, dtype=torch.float32)
    losses = LossLog(run, max_steps=max_steps, samples_per_step=samples_per_step, loss_tsv=Path(loss_tsv),
                     lr_scheduler=lr_scheduler, progress_every_s=progress_every_s, log=log)
    log(f"training {max_steps} steps x {samples_per_step} samples (micro-batch {micro_batch}), "
        f"{len(data.images)} image(s), repeats {data.repeats[0]}, {len(data.prompts)} prompt(s), tokens "
        f"{token_strings}, init {settings.init_word!r}, {compile_note}")
    if device.type == "cuda":  # the weights, latents and vectors in place: the floor under the step's peak
        stats["memory_before_loop_gib"] = torch.cuda.memory_allocated(device) / 2**30
    loop_started = time.perf_counter()
    for step in range(run.step, max_steps):
        while True:
            try:
                step_loss = accumulate_step_gradient(step, plan.groups[step - run.step], plan, data, model_call,
                                                     alphas_cumprod, grad_scaler, settings, device, micro_batch)
                break
            except torch.OutOfMemoryError:
                if micro_batch == 1:
                    raise
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                micro_batch = max(1, micro_batch // 2)
                log(f"out of GPU memory at step {step + 1}: splitting the accumulated batch into "
                    f"micro-batches of {micro_batch} (same gradient, less memory)")
        if settings.max_grad_norm:
            grad_scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(vectors, settings.max_grad_norm)
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
            if not all(torch.isfinite(tensor).all() for tensor in vectors):
                raise TrainingError(f"embedding vectors became non-finite by step {done}; stopping")
        if done % save_every == 0 or done == max_steps:
            if done % save_every == 0:
                run.saved_vectors[done] = vectors_now()
                save_checkpoint(done, run.saved_vectors[done])
            save_state(state_dir, {
                "fingerprint": fingerprint, "step": done, "date": run.date, "vectors": vectors_now(),
                "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "grad_scaler": grad_scaler.state_dict(), "loss_rows": run.loss_rows,
                "saved_vectors": run.saved_vectors})
            losses.progress(done)

    # -- 6. outputs: loss table, final embedding; then the resume state is no longer needed
    losses.close()
    save_embedding(final_path, family.embedding_tensors(vectors_now()), metadata_for(max_steps),
                   settings.save_precision)
    (state_dir / "state.pt").unlink(missing_ok=True)
    if (steady := losses.steady_ms_per_step()) is not None:
        stats["steady_ms_per_step"] = steady
    stats.update(total_s=time.perf_counter() - started, micro_batch_size=micro_batch,
                 samples_per_step=samples_per_step, steps=max_steps - run.step)
    if device.type == "cuda":
        stats["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    log(f"wrote {final_path} after {stats['total_s']:.1f} s; stats {json.dumps(stats)}")
    return TrainingResult(final_path=final_path, stats=stats)
