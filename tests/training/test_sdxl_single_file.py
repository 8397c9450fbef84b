"""SDXL single files in the original layout: the key map at full size (meta tensors, no memory), a tiny
file's round trip, text_projection's orientation, the random-file writer and the loader's errors."""

from __future__ import annotations

import pytest

from tifactory.families import sdxl_checkpoint as checkpoint
from tifactory.families import sdxl_resources
from tifactory.training import model_check


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tifactory.demo.tinymodel_sdxl import build_tiny_sdxl_model

    return build_tiny_sdxl_model(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="module")
def tiny_file(tiny):
    return checkpoint.save_sdxl_single_file(tiny, tiny.parent / "tiny-sdxl.safetensors")


def folder_modules(folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2",
                                                                      local_files_only=True),
    }


def test_full_sdxl_key_map_round_trips_through_diffusers_converter():
    """SDXL base's 2515 original keys (names and shapes as in sd_xl_base_1.0.safetensors) map onto exactly the
    diffusers modules the shipped configs build, through diffusers' own converters."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    shapes = checkpoint.original_layout_shapes()
    assert len(shapes) == 2515
    expected = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
        "conditioner.embedders.1.model.ln_final.bias": (1280,),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.logit_scale": (),
    }
    assert {key: tuple(shapes[key].shape) for key in expected} == expected

    folder = sdxl_resources.config_dir()
    unet_config = dict(UNet2DConditionModel.load_config(folder / "unet"))
    vae_config = dict(AutoencoderKL.load_config(folder / "vae"))
    text_2_config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
    with init_empty_weights():
        modules = {"unet": UNet2DConditionModel.from_config(unet_config),
                   "vae": AutoencoderKL.from_config(vae_config),
                   "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
                   "text_encoder_2": CLIPTextModelWithProjection(text_2_config)}
    parts = checkpoint.original_to_diffusers(dict(shapes), unet_config, vae_config, text_2_config)
    for name, module in modules.items():
        state = module.state_dict()
        state = checkpoint.text_model_keys(state) if name.startswith("text") else state
        own = {k: tuple(v.shape) for k, v in state.items()}
        assert {k: tuple(v.shape) for k, v in parts[name].items()} == own, name
    assert model_check.detect_family_keys({k: tuple(v.shape) for k, v in shapes.items()}).family == "sdxl"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tiny_single_file_round_trips_to_the_same_weights(tiny, tmp_path, dtype):
    import torch

    path = checkpoint.save_sdxl_single_file(tiny, tmp_path / "tiny.safetensors", dtype=getattr(torch, dtype))
    loaded = checkpoint.load_sdxl_single_file(path, tiny)
    got = {"unet": loaded.unet, "vae": loaded.vae, "text_encoder": loaded.text_encoders[0],
           "text_encoder_2": loaded.text_encoders[1]}
    for name, module in folder_modules(tiny).items():
        spell = checkpoint.text_model_keys if name.startswith("text") else dict
        reference, state = spell(module.state_dict()), spell(got[name].state_dict())
        assert state.keys() == reference.keys(), name
        for key, tensor in reference.items():
            want = tensor.to(getattr(torch, dtype)).float() if tensor.is_floating_point() else tensor
            assert torch.equal(state[key].float() if tensor.is_floating_point() else state[key], want), (name, key)
    assert [t.pad_token for t in loaded.tokenizers] == ["<|endoftext|>", "!"]


def test_loader_equals_diffusers_from_single_file(tiny, tiny_file):
    """diffusers' own StableDiffusionXLPipeline.from_single_file (offline, configs from the tiny folder) builds
    the same four modules, weight for weight."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(str(tiny_file), config=str(tiny), local_files_only=True,
                                                      torch_dtype=torch.float32)
    ours = checkpoint.load_sdxl_single_file(tiny_file, tiny)
    pairs = {"unet": (pipe.unet, ours.unet), "vae": (pipe.vae, ours.vae),
             "text_encoder": (pipe.text_encoder, ours.text_encoders[0]),
             "text_encoder_2": (pipe.text_encoder_2, ours.text_encoders[1])}
    for name, (theirs, mine) in pairs.items():
        spell = checkpoint.text_model_keys if name.startswith("text") else dict
        want, got = spell(theirs.state_dict()), spell(mine.state_dict())
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[key], want[key]) for key in want), name


def test_text_projection_is_openclips_matrix_transposed(tiny, tiny_file):
    """The file's text_projection P is applied as x @ P (OpenCLIP); the loaded model's text_embeds equal that,
    and differ from x @ P.T, so a missing (or extra) transpose fails here."""
    import torch
    from safetensors.torch import load_file

    projection = load_file(str(tiny_file))[checkpoint.TEXT_2_PREFIX + "text_projection"]
    text_2 = checkpoint.load_sdxl_single_file(tiny_file, tiny).text_encoders[1]
    ids = torch.tensor([[49406 % text_2.config.vocab_size, 5, 9, text_2.config.eos_token_id, 0, 0]])
    with torch.no_grad():
        out = text_2(ids)
    pooled = out.last_hidden_state[0, 3]
    assert torch.allclose(out.text_embeds[0], pooled @ projection, atol=1e-5)
    assert not torch.allclose(out.text_embeds[0], pooled @ projection.T, atol=1e-3)


def test_a_linear_spelled_text_projection_loads_the_same(tiny, tiny_file, tmp_path):
    """`...text_projection.weight` (Linear orientation, as some tools save it) gives the same model."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_file))
    state[checkpoint.TEXT_2_PREFIX + "text_projection.weight"] = state.pop(
        checkpoint.TEXT_2_PREFIX + "text_projection").T.contiguous()
    save_file(state, str(tmp_path / "linear.safetensors"))
    got = checkpoint.load_sdxl_single_file(tmp_path / "linear.safetensors", tiny).text_encoders[1]
    want = checkpoint.load_sdxl_single_file(tiny_file, tiny).text_encoders[1]
    assert torch.equal(got.text_projection.weight, want.text_projection.weight)


def test_random_writer_makes_a_loadable_fp16_file(tiny, tmp_path):
    import torch

    path = checkpoint.write_random_sdxl_single_file(tmp_path / "random.safetensors", tiny, seed=3)
    header = model_check.read_safetensors_header(path)
    assert set(header.shapes) == set(checkpoint.original_layout_shapes(tiny))
    assert model_check.detect_family_keys(header.shapes).family == "sdxl"
    again = checkpoint.write_random_sdxl_single_file(tmp_path / "again.safetensors", tiny, seed=3)
    assert again.read_bytes() == path.read_bytes()
    loaded = checkpoint.load_sdxl_single_file(path, tiny, unet_dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16 and loaded.text_encoders[1].dtype == torch.float32
    with torch.no_grad():
        out = loaded.unet.float()(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 2048),
                                  added_cond_kwargs={"text_embeds": torch.randn(1, 1280),
                                                     "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]])}).sample
    assert torch.isfinite(out).all()


def test_a_file_the_configs_do_not_describe_is_named(tiny_file):
    with pytest.raises(checkpoint.SDXLCheckpointError, match="base_model_config|does not fit"):
        checkpoint.load_sdxl_single_file(tiny_file)  # the tiny file against SDXL base's configs


def test_a_file_without_the_second_encoder_is_named(tiny_file, tmp_path):
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(str(tiny_file)).items() if not k.startswith(checkpoint.TEXT_2_PREFIX)}
    save_file(state, str(tmp_path / "half.safetensors"))
    with pytest.raises(checkpoint.SDXLCheckpointError, match="conditioner.embedders.1.model"):
        checkpoint.load_sdxl_single_file(tmp_path / "half.safetensors", tiny_file.parent / "tiny-sdxl")
