"""The textbook gradient: tifactory's loss of a batch and its gradient on the trainable vectors equal a plain
reference written the way kohya's train_textual_inversion.py computes them.

The reference is deliberately naive: a stock `CLIPTextModel` whose token-embedding matrix is resized and whose
new rows are set to the vectors (the gradient is read off those rows), one sample at a time, noise added with
`DDPMScheduler.add_noise` from kohya's own scheduler settings, epsilon MSE per sample, min-SNR weight
min(SNR, gamma) / SNR, each sample's loss divided by the gradient accumulation and back-propagated on its own.
tifactory's side is the placeholder embedding (`make_placeholder_embedding`) and `denoising_loss`, called on
micro-batches as the training loop calls it. The batch (latents, noise, timesteps, prompts) is fixed; flipped
images, caption prompts and the noise offset enter it the way each side handles them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageOps

torch = pytest.importorskip("torch")

from support.models import load_sd15  # noqa: E402
from tifactory.training.templates import OBJECT_TEMPLATES, placeholder_tokens  # noqa: E402
from tifactory.families import family_named  # noqa: E402
from tifactory.training.data import TrainingImage, caption_prompts, load_image_tensor  # noqa: E402
from tifactory.training.train import denoising_loss  # noqa: E402

SUBJECT = "zqx"
NUM_VECTORS = 3
INIT_WORD = "person"
ACCUMULATION = 6  # train_batch_size 1 x gradient_accumulation_steps 6
SIZE = 64


@pytest.fixture(scope="module")
def batch_images(tmp_path_factory) -> list[Path]:
    """Six small distinct images (with captions for caption mode)."""
    import numpy as np

    folder = tmp_path_factory.mktemp("textbook")
    rng = np.random.default_rng(7)
    paths = []
    captions = [f"a photo of {SUBJECT} on a beach", f"{SUBJECT} wearing a red hat", "a close up portrait",
                f"{SUBJECT}, smiling, studio lighting", f"a painting of {SUBJECT}", f"{SUBJECT} at night"]
    for index, caption in enumerate(captions):
        gradient = np.linspace(0, 255, SIZE)[None, :, None] * rng.uniform(0.2, 1.0, 3)
        pixels = (gradient + rng.integers(0, 60, (SIZE, SIZE, 3))).clip(0, 255).astype(np.uint8)
        path = folder / f"img{index}.png"
        Image.fromarray(pixels).save(path)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def _fixed_batch(tiny_model_dir, images, *, flip: bool, seed: int = 0):
    """latents (from the model's VAE), noise, offset noise and timesteps for one accumulated batch."""
    vae = load_sd15(tiny_model_dir).vae
    generator = torch.Generator().manual_seed(seed)
    pixels = []
    for index, path in enumerate(images):
        image = load_image_tensor(path, (SIZE, SIZE))
        pixels.append(image.flip(-1) if flip and index % 2 else image)  # tifactory flips the loaded tensor
    with torch.no_grad():
        latents = vae.encode(torch.stack(pixels)).latent_dist.mean * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    offset = torch.randn((len(images), latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.tensor([999, 0, 500, 37, 850, 260])[: len(images)]
    return latents, noise, offset, timesteps


def _vectors(text_encoder, tokenizer, seed: int = 1):
    """Trainable vectors: the init word's embedding plus a small offset, so every row differs."""
    init_id = tokenizer(INIT_WORD, add_special_tokens=False).input_ids[0]
    base = text_encoder.get_input_embeddings().weight[init_id].detach()
    generator = torch.Generator().manual_seed(seed)
    return base.repeat(NUM_VECTORS, 1) + 0.02 * torch.randn((NUM_VECTORS, base.shape[0]), generator=generator)


def _tifactory_loss_and_grad(tiny_model_dir, prompts, latents, noise, offset, timesteps, *, noise_offset,
                             min_snr_gamma, micro_batch):
    """tifactory's path: the SD1.5 family adds the placeholders, tokenises, conditions and calls the UNet."""
    family = family_named("sd15")
    components = load_sd15(tiny_model_dir)
    for module in (*components.text_encoders, components.unet):
        module.requires_grad_(False).eval()
    tokens = placeholder_tokens(SUBJECT, NUM_VECTORS)
    [trainable] = family.add_placeholders(components, tokens, INIT_WORD, lambda message: None)
    vectors = _vectors(components.text_encoder, components.tokenizer)
    trainable.data.copy_(vectors)
    ids_per_encoder = family.tokenize(components, prompts)
    alphas_cumprod = components.noise_scheduler.alphas_cumprod.float()

    def predict_noise(noisy_latents, steps, ids):
        conditioning = family.extra_conditioning(family.encode_text(components, ids), None)
        return family.predict_noise(components.unet, noisy_latents, steps, conditioning)

    total = torch.zeros(())
    for start in range(0, len(prompts), micro_batch):
        chunk = slice(start, start + micro_batch)
        loss = denoising_loss(predict_noise, latents[chunk], noise[chunk], timesteps[chunk],
                              [ids[chunk] for ids in ids_per_encoder], alphas_cumprod, divisor=len(prompts),
                              min_snr_gamma=min_snr_gamma, noise_offset=noise_offset, offset_noise=offset[chunk])
        loss.backward()
        total += loss.detach()
    return total, trainable.grad.clone(), vectors


def _kohya_reference(tiny_model_dir, prompts, latents, noise, offset, timesteps, *, noise_offset, min_snr_gamma):
    """kohya's loop, plainly: resized embedding matrix, one sample at a time, add_noise, loss / accumulation."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
    # kohya's train_util: DDPMScheduler(beta_start=0.00085, beta_end=0.012, "scaled_linear", 1000, clip_sample=False)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    tokens = placeholder_tokens(SUBJECT, NUM_VECTORS)
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    vectors = _vectors(text_encoder, tokenizer)
    text_encoder.resize_token_embeddings(len(tokenizer))
    token_embeds = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        token_embeds[ids] = vectors
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    text_encoder.get_input_embeddings().requires_grad_(True)
    alphas_cumprod = scheduler.alphas_cumprod
    all_snr = (alphas_cumprod.sqrt() / (1.0 - alphas_cumprod).sqrt()) ** 2

    total = 0.0
    for index, prompt in enumerate(prompts):
        input_ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
        encoder_hidden_states = text_encoder(input_ids)[0]
        sample_noise = noise[index: index + 1]
        if noise_offset:  # kohya's apply_noise_offset
            sample_noise = sample_noise + noise_offset * offset[index: index + 1]
        step = timesteps[index: index + 1]
        noisy_latents = scheduler.add_noise(latents[index: index + 1], sample_noise, step)
        noise_pred = unet(noisy_latents, step, encoder_hidden_states).sample
        loss = torch.nn.functional.mse_loss(noise_pred.float(), sample_noise.float(), reduction="none")
        loss = loss.mean([1, 2, 3])
        if min_snr_gamma:  # kohya's apply_snr_weight
            snr = all_snr[step]
            loss = loss * torch.minimum(snr, torch.ones_like(snr) * min_snr_gamma) / snr
        loss = loss.mean() / ACCUMULATION  # accelerate divides by gradient_accumulation_steps
        loss.backward()
        total += loss.item()
    return total, token_embeds.grad[ids].clone()


def _caption_prompts_kohya(images) -> list[str]:
    """kohya's caption mode: the caption file as written, the subject word replaced by the token string."""
    token_string = " ".join(placeholder_tokens(SUBJECT, NUM_VECTORS))
    prompts = []
    for path in images:
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if SUBJECT not in caption.replace(",", " ").split():
            caption = f"{SUBJECT}, {caption}"
        prompts.append(caption.replace(SUBJECT, token_string))
    return prompts


CASES = {
    # name: (template, flip, noise_offset, min_snr_gamma, micro_batch)
    "object": ("object", False, 0.0, 0.0, 6),
    "object_sequential": ("object", False, 0.0, 0.0, 1),
    "caption": ("caption", False, 0.0, 0.0, 4),
    "flip": ("object", True, 0.0, 0.0, 3),
    "noise_offset": ("object", False, 0.1, 0.0, 6),
    "min_snr": ("object", False, 0.0, 5.0, 2),
    "all": ("caption", True, 0.05, 5.0, 5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradient_equal_kohya_reference(case, tiny_model_dir, batch_images):
    template, flip, noise_offset, min_snr_gamma, micro_batch = CASES[case]
    token_string = " ".join(placeholder_tokens(SUBJECT, NUM_VECTORS))
    if template == "caption":
        ours = caption_prompts([TrainingImage(path, (SIZE, SIZE), (SIZE, SIZE)) for path in batch_images], SUBJECT,
                               token_string, lambda message: None)
        theirs = _caption_prompts_kohya(batch_images)
    else:
        ours = theirs = [OBJECT_TEMPLATES[index * 4].format(token_string) for index in range(len(batch_images))]
    assert ours == theirs
    latents, noise, offset, timesteps = _fixed_batch(tiny_model_dir, batch_images, flip=flip)
    if flip:  # the reference mirrors the picture itself (PIL), before it becomes a tensor
        vae = load_sd15(tiny_model_dir).vae
        for index in range(1, len(batch_images), 2):
            mirrored = batch_images[index].with_name(f"mirrored{index}.png")
            with Image.open(batch_images[index]) as image:
                ImageOps.mirror(image.convert("RGB")).save(mirrored)
            with torch.no_grad():
                reference = vae.encode(load_image_tensor(mirrored, (SIZE, SIZE))[None]).latent_dist.mean
            torch.testing.assert_close(latents[index: index + 1], reference * vae.config.scaling_factor,
                                       rtol=0, atol=1e-5)

    loss, grad, _ = _tifactory_loss_and_grad(tiny_model_dir, ours, latents, noise, offset, timesteps,
                                             noise_offset=noise_offset, min_snr_gamma=min_snr_gamma,
                                             micro_batch=micro_batch)
    ref_loss, ref_grad = _kohya_reference(tiny_model_dir, theirs, latents, noise, offset, timesteps,
                                          noise_offset=noise_offset, min_snr_gamma=min_snr_gamma)
    assert grad.shape == (NUM_VECTORS, 768)
    assert ref_grad.abs().max() > 0, "the reference gradient is zero: the batch does not reach the tokens"
    assert abs(loss.item() - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4 * ref_grad.abs().max().item())
    cosine = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)
    assert cosine > 0.99999
