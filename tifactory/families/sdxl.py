"""Stable Diffusion XL (base and finetunes sharing its architecture: Pony, Illustrious, ...): SD1.5's trainer
with two text encoders and size conditioning, as kohya's `sdxl_train_textual_inversion.py` subclasses its SD1
trainer.

What differs from `SD15` (everything else is inherited):

* the text side: CLIP ViT-L/14 (`text_encoder`, 768 wide) and OpenCLIP ViT-bigG/14 (`text_encoder_2`, a
  CLIPTextModelWithProjection, 1280 wide), each with its tokenizer; tokenizer_2 pads with "!";
* conditioning: the UNet cross-attends to concat(penultimate hidden state of each encoder) [n, 77, 2048], and
  takes `added_cond_kwargs` `text_embeds` = encoder 2's final-normed state *at the end-of-text token* through
  its projection (tifactory.families.sdxl_text.pooled_at_eos; not transformers' argmax(id), which is a
  placeholder's position once new tokens exist) and `time_ids` = (original h, w, crop top, left, target h, w)
  per sample, from its bucket (tifactory.training.data.sample_sizes);
* latent scale 0.13025, native resolution 1024 (the VAE encodes in fp32, as for SD1.5: SDXL's is NaN in fp16);
* the single file in the original layout (tifactory.families.sdxl_checkpoint), described by resources/sdxl/;
* sampling through StableDiffusionXLPipeline with the family's own prompt embeddings (A1111 weights, pooling
  at the end-of-text token) and the pipeline's size conditioning (original = target = the image size);
* the file: exactly `clip_l` [n, 768] + `clip_g` [n, 1280] (checked by tifactory.families.sdxl_embedding).

Import cost: no torch at import time.
"""

from __future__ import annotations

from pathlib import Path

from tifactory.families.base import Components, Conditioning
from tifactory.families.loading import ModelLoadError, Placement
from tifactory.families.sd15 import SD15
from tifactory.families import sdxl_embedding, sdxl_resources


class SDXL(SD15):
    name = "sdxl"
    architecture = sdxl_embedding.ARCHITECTURE
    title = "Stable Diffusion XL"
    native_resolution = 1024
    latent_scale = sdxl_resources.LATENT_SCALE
    text_folders = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    # SDXL's training noise schedule is SD1.5's (scaled-linear 0.00085-0.012, 1000 steps, epsilon)

    # ------------------------------------------------------------------ loading

    def shipped_config_dir(self) -> Path:
        try:
            return sdxl_resources.config_dir()
        except sdxl_resources.SDXLResourceError as error:
            raise ModelLoadError(str(error)) from None

    def text_encoder_class(self, index: int):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return (CLIPTextModel, CLIPTextModelWithProjection)[index]

    def load_single_file(self, path: Path, config_dir: str, *, skip_vae: bool, place: Placement) -> dict:
        """An original-layout SDXL file, its tensors converted and released part by part
        (tifactory.families.sdxl_checkpoint), described by `config_dir` or resources/sdxl/."""
        from tifactory.families.sdxl_checkpoint import load_sdxl_single_file

        folder = self.resolve_config_dir(config_dir, path)
        modules = load_sdxl_single_file(path, folder, device=place.device, unet_dtype=place.unet_dtype,
                                        skip_vae=skip_vae)
        return {"tokenizers": modules.tokenizers, "text_encoders": modules.text_encoders, "unet": modules.unet,
                "vae": modules.vae, "vae_config": modules.vae_config, "scheduler_config": modules.scheduler_config}

    # ------------------------------------------------------------------ conditioning and the UNet call

    def text_states(self, components: Components, ids_per_encoder: list):
        """(concat of both encoders' penultimate hidden states [n, 77, 2048], encoder 2's pooled output at
        the end-of-text token [n, 1280])."""
        import torch

        from tifactory.families.sdxl_text import pooled_at_eos

        first, second = components.text_encoders
        hidden_1 = first(ids_per_encoder[0], output_hidden_states=True).hidden_states[-2]
        output_2 = second(ids_per_encoder[1], output_hidden_states=True)
        pooled = pooled_at_eos(output_2.last_hidden_state, ids_per_encoder[1],
                               components.tokenizers[1].eos_token_id, second.text_projection)
        return torch.cat([hidden_1, output_2.hidden_states[-2]], dim=-1), pooled

    def encode_text(self, components: Components, ids_per_encoder: list) -> Conditioning:
        return Conditioning(*self.text_states(components, ids_per_encoder))

    def extra_conditioning(self, conditioning: Conditioning, sizes) -> Conditioning:
        """time_ids [n, 6] = the samples' (original h, w, crop top, left, target h, w), in the text's dtype."""
        return conditioning._replace(time_ids=sizes.to(conditioning.pooled.dtype))

    def predict_noise(self, unet, noisy_latents, timesteps, conditioning: Conditioning):
        return unet(noisy_latents, timesteps, conditioning.hidden_states,
                    added_cond_kwargs={"text_embeds": conditioning.pooled.to(noisy_latents.dtype),
                                       "time_ids": conditioning.time_ids.to(noisy_latents.dtype)}).sample

    # ------------------------------------------------------------------ sampling

    def pipeline(self, components: Components, scheduler):
        from diffusers import StableDiffusionXLPipeline

        first, second = components.text_encoders
        return StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=first, text_encoder_2=second, tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1], unet=components.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=False, add_watermarker=False)

    def prompt_embeddings(self, components: Components, ids_per_encoder: list, weights) -> dict:
        """A1111's weights on the 2048-wide hidden states; the pooled output at the end-of-text token (as
        A1111/Forge and ComfyUI pool), unweighted. The pipeline adds its size conditioning."""
        from tifactory.sampling.prompts import apply_weights

        hidden, pooled = self.text_states(components, ids_per_encoder)
        return {"prompt_embeds": apply_weights(hidden, weights.to(hidden.dtype)), "pooled_prompt_embeds": pooled}

    # ------------------------------------------------------------------ the embedding file

    def embedding_tensors(self, vectors: list) -> dict:
        return sdxl_embedding.embedding_tensors(vectors)

    def read_vectors(self, path) -> list:
        return sdxl_embedding.read_sdxl_embedding(path)[0]
