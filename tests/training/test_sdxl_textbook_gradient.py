"""The textbook gradient for SDXL: tifactory's loss of a batch and its gradient on both encoders' trainable vectors
equal a naive reference written the way kohya's sdxl_train_textual_inversion.py computes them.

The reference: two stock encoders (`CLIPTextModel`, `CLIPTextModelWithProjection`) whose token-embedding matrices
are resized and whose new rows hold the vectors (the gradients are read off those rows), the new tokens added to
both tokenizers, the penultimate hidden state of each encoder concatenated (2048 wide), encoder 2's final-normed
state at the end-of-text token through its projection as `text_embeds` (kohya's pool_workaround), the six size
numbers as `time_ids`, one sample at a time, each sample's loss divided by the accumulation and back-propagated
on its own. tifactory's side is the SDXL family (placeholders, tokenize, encode_text, extra_conditioning,
predict_noise) and `denoising_loss` on micro-batches, as the training loop calls them.

The same reference pooling at argmax(token id) -- what transformers does when the config says eos_token_id 2, as
the published SDXL configs do -- must NOT match: that is a placeholder's position once new tokens exist."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tifactory.families import ModelSpec, family_named  # noqa: E402
from tifactory.training.templates import OBJECT_TEMPLATES, placeholder_tokens  # noqa: E402
from tifactory.training.train import denoising_loss  # noqa: E402

SUBJECT = "zqx"
NUM_VECTORS = 3
INIT_WORD = "person"
ACCUMULATION = 6
# per sample: original (h, w), crop top-left (top, left), target (h, w), as tifactory.training.data records them
SIZES = [[64, 64, 0, 0, 64, 64], [96, 64, 16, 0, 64, 64], [64, 128, 0, 32, 64, 96], [128, 128, 8, 8, 64, 64],
         [80, 64, 0, 0, 64, 64], [64, 96, 0, 16, 64, 64]]


def fixed_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((ACCUMULATION, 4, 8, 8), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([999, 0, 500, 37, 850, 260])
    prompts = [OBJECT_TEMPLATES[index * 4].format(" ".join(placeholder_tokens(SUBJECT, NUM_VECTORS)))
               for index in range(ACCUMULATION)]
    return prompts, latents, noise, timesteps, torch.tensor(SIZES)


def start_vectors(tables, tokenizer, seed: int = 1):
    """Per encoder (its token table): the init word's row plus a small offset, so every row differs."""
    init_id = tokenizer(INIT_WORD, add_special_tokens=False).input_ids[0]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for table in tables:
        base = table[init_id].detach()
        out.append(base.repeat(NUM_VECTORS, 1) + 0.02 * torch.randn((NUM_VECTORS, base.shape[0]), generator=generator))
    return out


def tifactory_loss_and_grads(model_dir, prompts, latents, noise, timesteps, sizes, *, micro_batch, min_snr_gamma):
    family = family_named("sdxl")
    components = family.load(ModelSpec(path=model_dir, family="sdxl"))
    for module in (*components.text_encoders, components.unet):
        module.requires_grad_(False).eval()
    trainable = family.add_placeholders(components, placeholder_tokens(SUBJECT, NUM_VECTORS), INIT_WORD,
                                        lambda message: None)
    tables = [encoder.get_input_embeddings().base_weight for encoder in components.text_encoders]
    for tensor, start in zip(trainable, start_vectors(tables, components.tokenizer)):
        tensor.data.copy_(start)
    ids_per_encoder = family.tokenize(components, prompts)
    alphas_cumprod = components.noise_scheduler.alphas_cumprod.float()

    def predict_noise(noisy_latents, steps, inputs):
        ids, chunk_sizes = inputs
        conditioning = family.extra_conditioning(family.encode_text(components, ids), chunk_sizes)
        return family.predict_noise(components.unet, noisy_latents, steps, conditioning)

    total = torch.zeros(())
    for start in range(0, len(prompts), micro_batch):
        chunk = slice(start, start + micro_batch)
        loss = denoising_loss(predict_noise, latents[chunk], noise[chunk], timesteps[chunk],
                              ([ids[chunk] for ids in ids_per_encoder], sizes[chunk]), alphas_cumprod,
                              divisor=len(prompts), min_snr_gamma=min_snr_gamma)
        loss.backward()
        total += loss.detach()
    return total, [tensor.grad.clone() for tensor in trainable]


def kohya_reference(model_dir, prompts, latents, noise, timesteps, sizes, *, pooling, min_snr_gamma):
    """kohya's SDXL loop, plainly (pooling "eos": its pool_workaround; "argmax": transformers' stock pooling)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(model_dir / name) for name in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval(),
                CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder_2").eval()]
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    tokens = placeholder_tokens(SUBJECT, NUM_VECTORS)
    vectors = start_vectors([encoder.get_input_embeddings().weight for encoder in encoders], tokenizers[0])
    ids = None
    for tokenizer, encoder, rows in zip(tokenizers, encoders, vectors):
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        encoder.resize_token_embeddings(len(tokenizer))
        with torch.no_grad():
            encoder.get_input_embeddings().weight[ids] = rows
        encoder.requires_grad_(False)
        encoder.get_input_embeddings().requires_grad_(True)
    unet.requires_grad_(False)
    all_snr = scheduler.alphas_cumprod / (1.0 - scheduler.alphas_cumprod)

    total = 0.0
    for index, prompt in enumerate(prompts):
        input_ids = [tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                               return_tensors="pt").input_ids for tokenizer in tokenizers]
        hidden_1 = encoders[0](input_ids[0], output_hidden_states=True).hidden_states[-2]
        output_2 = encoders[1](input_ids[1], output_hidden_states=True)
        if pooling == "eos":
            position = (input_ids[1][0] == tokenizers[1].eos_token_id).nonzero()[0, 0]
        else:
            position = input_ids[1][0].argmax()
        pooled = encoders[1].text_projection(output_2.last_hidden_state[0, position])[None]
        hidden = torch.cat([hidden_1, output_2.hidden_states[-2]], dim=-1)
        time_ids = sizes[index: index + 1].float()
        step = timesteps[index: index + 1]
        sample_noise = noise[index: index + 1]
        noisy = scheduler.add_noise(latents[index: index + 1], sample_noise, step)
        prediction = unet(noisy, step, hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), sample_noise, reduction="none").mean([1, 2, 3])
        if min_snr_gamma:
            snr = all_snr[step]
            loss = loss * torch.minimum(snr, torch.ones_like(snr) * min_snr_gamma) / snr
        loss = loss.mean() / ACCUMULATION
        loss.backward()
        total += loss.item()
    return total, [encoder.get_input_embeddings().weight.grad[ids].clone() for encoder in encoders]


def matches(loss, grads, ref_loss, ref_grads) -> bool:
    if abs(loss.item() - ref_loss) > 1e-5 * max(1.0, abs(ref_loss)):
        return False
    return all(torch.allclose(grad, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
               for grad, ref in zip(grads, ref_grads))


CASES = {"fused": (6, 0.0), "sequential": (1, 0.0), "min_snr": (4, 5.0)}  # micro-batch, min_snr_gamma


@pytest.mark.parametrize("case", sorted(CASES))
def test_sdxl_loss_and_gradients_equal_kohya_reference(case, tiny_sdxl_model_dir):
    micro_batch, gamma = CASES[case]
    batch = fixed_batch()
    loss, grads = tifactory_loss_and_grads(tiny_sdxl_model_dir, *batch, micro_batch=micro_batch, min_snr_gamma=gamma)
    ref_loss, ref_grads = kohya_reference(tiny_sdxl_model_dir, *batch, pooling="eos", min_snr_gamma=gamma)
    assert [tuple(grad.shape) for grad in grads] == [(NUM_VECTORS, 768), (NUM_VECTORS, 1280)]
    assert all(ref.abs().max() > 0 for ref in ref_grads), "a reference gradient is zero"
    assert matches(loss, grads, ref_loss, ref_grads)
    for grad, ref in zip(grads, ref_grads):
        assert torch.nn.functional.cosine_similarity(grad.flatten(), ref.flatten(), dim=0) > 0.99999


def test_pooling_at_argmax_id_would_not_match(tiny_sdxl_model_dir):
    """The reference pooled where transformers pools with eos_token_id 2 (argmax(id) = the last placeholder):
    tifactory must not agree with it, so the test above can tell the two poolings apart."""
    batch = fixed_batch()
    loss, grads = tifactory_loss_and_grads(tiny_sdxl_model_dir, *batch, micro_batch=6, min_snr_gamma=0.0)
    ref_loss, ref_grads = kohya_reference(tiny_sdxl_model_dir, *batch, pooling="argmax", min_snr_gamma=0.0)
    assert not matches(loss, grads, ref_loss, ref_grads)
