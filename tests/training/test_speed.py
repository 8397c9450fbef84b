"""Speed paths (issue 15) that CPU tests can check: weights read straight into their dtype (the UNet in the
compute dtype, the rest float32) on the device path, one torch.compile cache folder for every job, regional
compilation."""

from __future__ import annotations

import os

import pytest
import torch

from tifactory.families.base import Components
from tifactory.families.loading import Placement
from tifactory.families.sd15 import SD15
from tifactory.jobs import COMPILE_CACHE_ENV, share_compile_cache
from support.models import load_sd15
from tifactory.demo.tinymodel import save_single_file
from tifactory.training.train import compile_repeated_blocks


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_sd15(tiny_model_dir)


def assert_loaded(components, reference, unet_dtype):
    assert {p.dtype for p in components.unet.parameters()} == {unet_dtype}
    assert {p.dtype for p in components.text_encoder.parameters()} == {torch.float32}
    assert {p.dtype for p in components.vae.parameters()} == {torch.float32}
    for ours, theirs in ((components.unet, reference.unet), (components.text_encoder, reference.text_encoder),
                         (components.vae, reference.vae)):
        expected = theirs.state_dict()
        for key, tensor in ours.state_dict().items():
            want = expected[key].to(tensor.dtype) if tensor.is_floating_point() else expected[key]
            assert torch.equal(tensor, want), key


def test_folder_loads_unet_in_its_dtype_through_the_device_path(tiny_model_dir, reference):
    # the path a GPU job takes (device_map: each weight materialised where it goes), here with the CPU as device
    place = Placement(device=torch.device("cpu"), unet_dtype=torch.bfloat16)
    loaded = SD15().load_folder(tiny_model_dir, skip_vae=False, place=place)
    components = Components(tokenizers=loaded["tokenizers"], text_encoders=loaded["text_encoders"],
                            vae=loaded["vae"], unet=loaded["unet"], noise_scheduler=None)
    assert_loaded(components, reference, torch.bfloat16)


def test_single_file_loads_unet_in_its_dtype(tiny_model_dir, reference, tmp_path):
    path = save_single_file(tiny_model_dir, tmp_path / "tiny.safetensors")
    components = load_sd15(path, config_dir=tiny_model_dir, device="cpu", unet_dtype=torch.float16)
    assert_loaded(components, reference, torch.float16)


def test_default_load_is_float32_on_the_cpu(tiny_model_dir, reference):
    components = load_sd15(tiny_model_dir, device=None)
    assert_loaded(components, reference, torch.float32)
    assert {p.device.type for p in components.unet.parameters()} == {"cpu"}


def test_compile_cache_comes_from_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    environ = {COMPILE_CACHE_ENV: "/tmp/torchinductor_someone"}  # e.g. left by a parent that imported diffusers
    assert share_compile_cache("cache/torch_compile", environ) == str(tmp_path / "cache" / "torch_compile")
    assert environ[COMPILE_CACHE_ENV] == str(tmp_path / "cache" / "torch_compile")
    assert os.path.isabs(share_compile_cache("~/tc", {}))


def test_compile_repeated_blocks_compiles_each_block_and_keeps_outputs(tiny_model_dir):
    components = load_sd15(tiny_model_dir)
    unet, text_encoder = components.unet, components.text_encoder
    ids = torch.tensor([[1, 2, 3, 4]])
    latents = torch.randn(2, unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        before = unet(latents, torch.tensor([10, 500]), hidden.expand(2, -1, -1)).sample
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    layers = [m for m in text_encoder.modules() if type(m).__name__ == "CLIPEncoderLayer"]
    assert blocks and layers
    assert compile_repeated_blocks([unet, text_encoder], backend="eager", dynamic=False) == len(blocks) + len(layers)
    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in blocks + layers)
    with torch.no_grad():
        after = unet(latents, torch.tensor([10, 500]), text_encoder(ids)[0].expand(2, -1, -1)).sample
    torch.testing.assert_close(after, before)
