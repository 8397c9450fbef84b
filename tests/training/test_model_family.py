"""Which family a base model is, at DAG time, from safetensors headers and diffusers configs only: SD1.5 and
SDXL (base and finetunes) accepted, everything else refused with a message naming the config key and the
tensor or config entry that tells. The files here are bare safetensors headers with tiny tensors."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from tifactory.families import sdxl_resources
from tifactory.training import model_check, sd15

SDXL_BASE = {
    "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [1, 2048],
    "model.diffusion_model.label_emb.0.0.weight": [1, 2816],
    "first_stage_model.encoder.conv_in.weight": [1, 3, 3, 3],
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": [1, 768],
    "conditioner.embedders.1.model.token_embedding.weight": [1, 1280],
    "conditioner.embedders.1.model.text_projection": [1, 1],
}
SD15 = {
    "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [1, 768],
    "first_stage_model.encoder.conv_in.weight": [1, 3, 3, 3],
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [1, 768],
}


def write_header(path, shapes: dict, metadata: dict | None = None):
    """A valid safetensors file: header + zero-filled F16 data for the given shapes."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2
        for dim in shape:
            size *= dim
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode("utf-8")
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(offset))
    return str(path)


def family_of(tmp_path, shapes, metadata=None, name="model.safetensors"):
    return model_check.check_model_family(write_header(tmp_path / name, shapes, metadata), "base_model")


def refused(result, *fragments):
    family, problems = result
    assert family is None and len(problems) == 1, result
    for fragment in ("base_model: ", *fragments):
        assert fragment in problems[0], (fragment, problems[0])
    return problems[0]


# --------------------------------------------------------------------------------------------- single files

def test_sdxl_base_is_sdxl(tmp_path):
    assert family_of(tmp_path, SDXL_BASE) == ("sdxl", [])


def test_an_sdxl_finetune_is_sdxl(tmp_path):
    """Pony, Illustrious & co. are SDXL's architecture with other weights and their own metadata."""
    metadata = {"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.title": "ponyDiffusionV6XL"}
    assert family_of(tmp_path, SDXL_BASE, metadata) == ("sdxl", [])


def test_sd15_is_sd15(tmp_path):
    assert family_of(tmp_path, SD15) == ("sd15", [])


def test_the_refiner_is_refused_for_lacking_clip_l(tmp_path):
    shapes = {k: v for k, v in SDXL_BASE.items() if not k.startswith("conditioner.")}
    shapes["conditioner.embedders.0.model.token_embedding.weight"] = [1, 1280]
    refused(family_of(tmp_path, shapes), "refiner", "conditioner.embedders.0", "CLIP-L")


def test_sdxl_inpainting_is_refused_for_9_input_channels(tmp_path):
    shapes = {**SDXL_BASE, "model.diffusion_model.input_blocks.0.0.weight": [320, 9, 3, 3]}
    refused(family_of(tmp_path, shapes), "inpainting", "model.diffusion_model.input_blocks.0.0.weight", "9 input")


def test_v_prediction_sdxl_is_refused_for_its_v_pred_key(tmp_path):
    refused(family_of(tmp_path, {**SDXL_BASE, "v_pred": [0]}), "v-prediction", "v_pred key")


def test_v_prediction_sdxl_is_refused_for_its_modelspec(tmp_path):
    refused(family_of(tmp_path, SDXL_BASE, {"modelspec.prediction_type": "v"}), "modelspec.prediction_type = v")


def test_edm_models_such_as_playground_are_refused_for_edm_mean(tmp_path):
    refused(family_of(tmp_path, {**SDXL_BASE, "edm_mean": [1, 4, 1, 1], "edm_std": [1, 4, 1, 1]}),
            "EDM", "Playground v2.5", "edm_mean")


def test_sd2_is_refused(tmp_path):
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [1, 1024],
        "first_stage_model.encoder.conv_in.weight": [1, 3, 3, 3],
        "cond_stage_model.model.token_embedding.weight": [1, 1024],
    }
    refused(family_of(tmp_path, shapes), "2.x", "cond_stage_model.model", "1024 wide")


def test_an_sdxl_file_of_other_widths_is_refused(tmp_path):
    shapes = {**SDXL_BASE, "conditioner.embedders.1.model.token_embedding.weight": [1, 1024]}
    refused(family_of(tmp_path, shapes), "conditioner.embedders.1.model.token_embedding.weight", "1024 wide")


def test_an_sdxl_file_without_vae_asks_for_one(tmp_path):
    shapes = {k: v for k, v in SDXL_BASE.items() if not k.startswith("first_stage_model.")}
    refused(family_of(tmp_path, shapes), "first_stage_model", "set vae")
    path = write_header(tmp_path / "novae.safetensors", shapes)
    assert model_check.check_model_family(path, "base_model", has_vae_override=True) == ("sdxl", [])


def test_detection_reads_headers_only(tmp_path):
    """A file whose tensor data is cut off is still classified: nothing but the header is read."""
    path = tmp_path / "cut.safetensors"
    write_header(path, SDXL_BASE)
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8 + length + 8])
    assert model_check.check_model_family(str(path), "base_model") == ("sdxl", [])


# --------------------------------------------------------------------------------------------- diffusers folders

@pytest.fixture
def sdxl_folder(tmp_path):
    """A diffusers SDXL folder's configs (resources/sdxl/ is one, without weights)."""
    folder = tmp_path / "sdxl"
    shutil.copytree(sdxl_resources.SDXL_DIR, folder)
    (folder / "vae").mkdir(exist_ok=True)
    return folder


def edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_sdxl_folder_is_sdxl(sdxl_folder):
    assert model_check.check_model_family(str(sdxl_folder), "base_model") == ("sdxl", [])


def test_sd15_folder_is_sd15():
    assert model_check.check_model_family(str(sd15.SD15_DIR), "base_model") == ("sd15", [])


def test_refiner_folder_is_refused_for_lacking_text_encoder(sdxl_folder):
    shutil.rmtree(sdxl_folder / "text_encoder")
    shutil.rmtree(sdxl_folder / "tokenizer")
    refused(model_check.check_model_family(str(sdxl_folder), "base_model"), "refiner", "text_encoder/", "CLIP-L")


def test_inpainting_folder_is_refused_for_unet_in_channels(sdxl_folder):
    edit(sdxl_folder / "unet" / "config.json", in_channels=9)
    refused(model_check.check_model_family(str(sdxl_folder), "base_model"), "inpainting",
            "unet/config.json in_channels = 9")


def test_v_prediction_folder_is_refused_for_scheduler_prediction_type(sdxl_folder):
    edit(sdxl_folder / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    refused(model_check.check_model_family(str(sdxl_folder), "base_model"),
            "scheduler/scheduler_config.json prediction_type = v_prediction")


def test_edm_folder_is_refused_for_its_scheduler(sdxl_folder):
    edit(sdxl_folder / "scheduler" / "scheduler_config.json", _class_name="EDMDPMSolverMultistepScheduler")
    refused(model_check.check_model_family(str(sdxl_folder), "base_model"), "EDM", "_class_name")


def test_sd2_folder_is_refused(tmp_path):
    folder = tmp_path / "sd2"
    shutil.copytree(sd15.SD15_DIR, folder)
    edit(folder / "unet" / "config.json", cross_attention_dim=1024)
    edit(folder / "text_encoder" / "config.json", hidden_size=1024)
    refused(model_check.check_model_family(str(folder), "base_model"), "2.x", "cross_attention_dim = 1024")
