"""The SDXL family behind the seam (tifactory/families/sdxl.py): identity, detection into a ModelSpec at DAG time,
the one size setting, the text side (both tokenizers, the same placeholder ids, pooling at the end-of-text token
for training and sampling), a short training run and a sample grid on the tiny SDXL model (CPU, seconds)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tifactory.families import ModelSpec, family_named


def test_identity_constants():
    family = family_named("sdxl")
    assert (family.name, family.native_resolution, family.latent_scale) == ("sdxl", 1024, 0.13025)
    assert family.architecture == "stable-diffusion-xl-v1-base/textual-inversion"
    assert family.noise_schedule == family_named("sd15").noise_schedule  # SDXL trains on SD's schedule
    assert family.vae_dtype(torch.bfloat16) == torch.float32  # SDXL's VAE gives NaN in fp16


def test_model_specs_detect_sdxl_and_refuse_mixed_families(tiny_sdxl_model_dir, tiny_model_dir, tmp_path):
    from tifactory.families.sdxl_checkpoint import save_sdxl_single_file
    from tifactory.training.model_check import model_specs

    specs, problems = model_specs({"base_model": str(tiny_sdxl_model_dir), "base_model_config": "", "vae": "",
                                   "eval_models": [{"name": "sd15", "path": str(tiny_model_dir)}]},
                                  demo_model_dir="")
    assert specs["base"] == ModelSpec(path=str(tiny_sdxl_model_dir), family="sdxl")
    assert problems == [f"eval model sd15 ({tiny_model_dir}) is a sd15 model, the base model a sdxl one: an "
                        "embedding works only on models of its own family"]
    single = save_sdxl_single_file(tiny_sdxl_model_dir, tmp_path / "xl.safetensors", dtype=torch.float16)
    specs, problems = model_specs({"base_model": str(single), "base_model_config": "", "vae": ""}, demo_model_dir="")
    assert problems == [] and specs["base"].family == "sdxl"
    # base_model_config must describe the base model's family
    specs, problems = model_specs({"base_model": str(single), "base_model_config": str(tiny_model_dir), "vae": ""},
                                  demo_model_dir="")
    assert problems == [f"base_model_config: {tiny_model_dir} is not a usable diffusers SDXL config folder: "
                        "missing ['text_encoder_2/config.json', 'tokenizer_2']"]


def test_one_size_setting():
    from tifactory.roster import native_sizes
    from tifactory.training.settings import TrainSettings, TrainSettingsError

    assert native_sizes({"resolution": "auto", "seed": 1}, 1024, ("resolution",)) == {"resolution": 1024, "seed": 1}
    assert native_sizes({"width": 768, "height": "auto"}, 512, ("width", "height")) == {"width": 768, "height": 512}
    import yaml

    from tifactory import REPO_ROOT

    config = yaml.safe_load((REPO_ROOT / "config.yaml").read_text(encoding="utf-8"))
    assert "resolution" not in config["crop"] and config["train"]["resolution"] == "auto"
    with pytest.raises(TrainSettingsError, match="resolution must be a number of pixels"):
        TrainSettings.from_config(config["train"], init_word="woman")


def test_placeholders_share_ids_and_pool_at_the_end_of_text(tiny_sdxl_model_dir):
    from tifactory.families.sdxl_text import pooled_at_eos

    family = family_named("sdxl")
    components = family.load(ModelSpec(path=tiny_sdxl_model_dir, family="sdxl"))
    tokens = ["qzv", "qzv1"]
    vectors = family.add_placeholders(components, tokens, "woman", lambda message: None)
    assert [tuple(v.shape) for v in vectors] == [(2, 768), (2, 1280)]
    ids = [tokenizer.convert_tokens_to_ids(tokens) for tokenizer in components.tokenizers]
    assert ids[0] == ids[1]
    woman = components.tokenizer("woman", add_special_tokens=False).input_ids[0]
    for encoder, tensor in zip(components.text_encoders, vectors):
        assert torch.equal(tensor[0], encoder.get_input_embeddings().base_weight[woman].float())
    ids_per_encoder = family.tokenize(components, ["a photo of qzv qzv1"])
    assert ids_per_encoder[1][0, -1] == components.tokenizers[1].convert_tokens_to_ids("!")  # tokenizer_2 pads "!"
    conditioning = family.extra_conditioning(family.encode_text(components, ids_per_encoder),
                                             torch.tensor([[300, 200, 10, 0, 256, 192]]))
    assert conditioning.hidden_states.shape == (1, 77, 2048) and conditioning.pooled.shape == (1, 1280)
    assert conditioning.time_ids.tolist() == [[300, 200, 10, 0, 256, 192]]
    second = components.text_encoders[1]
    output = second(ids_per_encoder[1], output_hidden_states=True)
    expected = pooled_at_eos(output.last_hidden_state, ids_per_encoder[1], components.tokenizers[1].eos_token_id,
                             second.text_projection)
    assert torch.equal(conditioning.pooled, expected)
    at_argmax = second.text_projection(output.last_hidden_state[0, ids_per_encoder[1][0].argmax()])
    assert not torch.allclose(conditioning.pooled[0], at_argmax)
    # sampling: the family's prompt embeddings pool the same way, and weights scale the hidden states only
    plain = family.prompt_embeddings(components, ids_per_encoder, torch.ones(77))
    weighted = family.prompt_embeddings(components, ids_per_encoder, torch.tensor([1.0] * 4 + [1.5] + [1.0] * 72))
    assert sorted(plain) == ["pooled_prompt_embeds", "prompt_embeds"]
    assert torch.equal(plain["pooled_prompt_embeds"], expected) and torch.equal(plain["prompt_embeds"],
                                                                                conditioning.hidden_states)
    assert torch.equal(weighted["pooled_prompt_embeds"], expected)
    assert not torch.equal(weighted["prompt_embeds"], plain["prompt_embeds"])


def test_tiny_sdxl_trains_and_renders_a_grid(tiny_sdxl_model_dir, tmp_path, repo_config, monkeypatch):
    """train_embedding and render_sample_grid on the tiny SDXL folder: clip_l + clip_g written, read back by
    the family, a grid rendered by StableDiffusionXLPipeline from the family's prompt embeddings."""
    import pandas as pd
    from PIL import Image

    from tifactory.photos.dataset import build_dataset
    from tifactory.sampling.samples import SampleSettings, render_sample_grid
    from tifactory.training.settings import TrainSettings
    from tifactory.training.train import train_embedding

    crops = tmp_path / "crops"
    crops.mkdir()
    for index, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (64, 64), colour).save(crops / f"{index:03d}.png")
    pd.DataFrame([{"source": f"{i}.png", "status": "kept", "reason": "", "output": f"{i:03d}.png"}
                  for i in range(2)]).to_csv(crops / "manifest.tsv", sep="\t", index=False)
    recipe = dict(repo_config["train"], init_word="woman", resolution=64, min_bucket_reso=64, max_train_steps=2,
                  save_every_n_steps=1, gradient_accumulation_steps=2, micro_batch_size=1, device="cpu",
                  gradient_checkpointing=True)
    bucket = {key: recipe[key] for key in ("enable_bucket", "min_bucket_reso", "max_bucket_reso",
                                           "bucket_reso_steps", "bucket_no_upscale")}
    toml = build_dataset(crops_manifest=crops / "manifest.tsv", crops_dir=crops, dataset_dir=tmp_path / "dataset",
                         subject="qzv", class_word="woman", repeats=1, resolution=64, bucket=bucket)
    model = ModelSpec(path=tiny_sdxl_model_dir, family="sdxl")
    out = tmp_path / "out"
    result = train_embedding(dataset_toml=toml, model=model, subject="qzv", settings=TrainSettings.from_config(recipe),
                             final_path=out / "qzv-ti.safetensors", checkpoint_dir=out / "checkpoints",
                             loss_tsv=out / "loss.tsv", state_dir=out / "state", log=lambda message: None)
    family = family_named("sdxl")
    clip_l, clip_g = family.read_vectors(result.final_path)
    assert (tuple(clip_l.shape), tuple(clip_g.shape)) == ((5, 768), (5, 1280))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\tblurry\n")
    samples = dict(repo_config["samples"], seeds=[1], steps=1, width=64, height=64, device="cpu", batch_size=2,
                   init_word="woman")
    settings = SampleSettings.from_config({k: v for k, v in samples.items() if k not in ("prompts", "embeddings")})
    grid = render_sample_grid(model=model, settings=settings, subject="qzv", checkpoint_dir=out / "checkpoints",
                              prompts_file=prompts, out_dir=tmp_path / "grid", log=lambda message: None)
    assert grid.stat().st_size > 0
    rows = (tmp_path / "grid" / "images.tsv").read_text().splitlines()
    assert len(rows) == 1 + 3  # step 0 and the two checkpoints, one column
