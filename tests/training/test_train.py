"""Training on the tiny model (CPU): contract, only-new-vectors, determinism, resume, NaN, diffusers loading."""

from __future__ import annotations

import pytest
import torch

from tifactory.training.embedding import checkpoint_name, load_embedding
from support.datasets import astronaut_dataset
from support.models import sd15_spec
from tifactory.training.settings import TrainSettings
from tifactory.training.train import TrainingError, train_embedding

BUCKET = {"enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 2048, "bucket_reso_steps": 64,
          "bucket_no_upscale": True}


@pytest.fixture(scope="module")
def dataset_toml(tmp_path_factory):
    """Two real crops from the astronaut photo (no detector needed: fixed boxes)."""
    return astronaut_dataset(tmp_path_factory.mktemp("ds"), [((100, 0, 356, 256), (256, 256)),
                                                             ((120, 10, 376, 266), (256, 256))],
                             resolution=256, bucket=BUCKET)


@pytest.fixture
def params(repo_config):
    recipe = dict(repo_config["train"])
    recipe.update(init_word="woman", max_train_steps=4, save_every_n_steps=2, gradient_accumulation_steps=3,
                  micro_batch_size=3, resolution=256, device="cpu")
    return recipe


def run(tmp_path, name, dataset_toml, tiny_model_dir, params, **kwargs):
    out = tmp_path / name
    final = out / "eva-ti.safetensors"
    train_embedding(dataset_toml=dataset_toml, model=sd15_spec(tiny_model_dir), subject="eva",
                    settings=TrainSettings.from_config(params), final_path=final, checkpoint_dir=out / "checkpoints",
                    loss_tsv=out / "loss.tsv",
                    state_dir=out / "state", log=kwargs.get("log", lambda message: None))
    return out, final


def test_embedding_contract_and_only_new_vectors_train(tmp_path, dataset_toml, tiny_model_dir, params):
    from support.models import load_sd15

    out, final = run(tmp_path, "a", dataset_toml, tiny_model_dir, params)
    vectors, metadata = load_embedding(final)
    assert tuple(vectors.shape) == (5, 768) and vectors.dtype == torch.bfloat16
    for key in ["modelspec.architecture", "modelspec.title", "modelspec.resolution", "modelspec.date",
                "modelspec.prediction_type", "tifactory.recipe", "tifactory.seed", "tifactory.step",
                "tifactory.base_model_sha256", "tifactory.dataset_sha256", "tifactory.package_versions"]:
        assert metadata[key], key
    assert metadata["modelspec.title"] == "eva-ti" and metadata["tifactory.step"] == "4"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [checkpoint_name("eva", 2),
                                                                       checkpoint_name("eva", 4)]
    loss_lines = (out / "loss.tsv").read_text().splitlines()
    assert len(loss_lines) == 5 and all(float(line.split("\t")[1]) > 0 for line in loss_lines[1:])
    # the vectors moved away from the init word's embedding
    components = load_sd15(tiny_model_dir)
    woman = components.tokenizer("woman", add_special_tokens=False).input_ids[0]
    init = components.text_encoder.get_input_embeddings().weight[woman].detach()
    assert not torch.allclose(vectors.float(), init.expand(5, -1), atol=1e-3)
    step2, _ = load_embedding(out / "checkpoints" / checkpoint_name("eva", 2))
    assert not torch.equal(step2, vectors)


@pytest.mark.slow  # two or more full training runs (10-18 s on 2 cores): the fast lane keeps one
def test_same_inputs_give_byte_identical_embedding(tmp_path, dataset_toml, tiny_model_dir, params):
    _, first = run(tmp_path, "a", dataset_toml, tiny_model_dir, params)
    _, second = run(tmp_path, "b", dataset_toml, tiny_model_dir, params)
    assert first.read_bytes() == second.read_bytes()
    _, other_seed = run(tmp_path, "c", dataset_toml, tiny_model_dir, dict(params, seed=7))
    assert other_seed.read_bytes() != first.read_bytes()


@pytest.mark.slow  # two or more full training runs (10-18 s on 2 cores): the fast lane keeps one
def test_resume_after_crash_is_byte_identical(tmp_path, dataset_toml, tiny_model_dir, params):
    params = dict(params, max_train_steps=6)
    _, reference = run(tmp_path, "ref", dataset_toml, tiny_model_dir, params)

    def crash_after_step_2(message):
        if message.startswith("step 2/"):
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "crash", dataset_toml, tiny_model_dir, params, log=crash_after_step_2)
    out = tmp_path / "crash"
    assert (out / "state" / "state.pt").exists() and not (out / "eva-ti.safetensors").exists()
    import shutil
    shutil.rmtree(out / "checkpoints")  # Snakemake clears declared outputs before the rerun
    messages = []
    _, resumed = run(tmp_path, "crash", dataset_toml, tiny_model_dir, params, log=messages.append)
    assert any("resuming from step 2" in m for m in messages)
    assert resumed.read_bytes() == reference.read_bytes()
    for step in (2, 4, 6):
        assert (out / "checkpoints" / checkpoint_name("eva", step)).read_bytes() == \
            (tmp_path / "ref" / "checkpoints" / checkpoint_name("eva", step)).read_bytes()
    assert not (out / "state" / "state.pt").exists()


@pytest.mark.slow  # two or more full training runs (10-18 s on 2 cores): the fast lane keeps one
def test_sequential_and_fused_batches_match(tmp_path, dataset_toml, tiny_model_dir, params):
    _, fused = run(tmp_path, "fused", dataset_toml, tiny_model_dir, params)
    _, sequential = run(tmp_path, "seq", dataset_toml, tiny_model_dir, dict(params, micro_batch_size=1))
    fused_vectors, _ = load_embedding(fused)
    sequential_vectors, _ = load_embedding(sequential)
    torch.testing.assert_close(fused_vectors.float(), sequential_vectors.float(), atol=2e-2, rtol=0)


@pytest.mark.slow  # two or more full training runs (10-18 s on 2 cores): the fast lane keeps one
def test_uncached_latents_are_encoded_at_every_step(tmp_path, dataset_toml, tiny_model_dir, params, monkeypatch):
    """cache_latents: false -> the VAE encodes the images the step takes (a fresh latent sample each time),
    not once per image: it trains, reruns give the same bytes, and the vectors differ from the cached run."""
    from diffusers import AutoencoderKL

    encoded: list[int] = []  # images per VAE encode call
    original = AutoencoderKL.encode

    def counting_encode(self, pixels, *args, **kwargs):
        encoded.append(pixels.shape[0])
        return original(self, pixels, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    _, cached = run(tmp_path, "cached", dataset_toml, tiny_model_dir, params)
    assert encoded == [1, 1]  # the two images, once each, at cache time
    encoded.clear()
    uncached_params = dict(params, cache_latents=False)
    _, first = run(tmp_path, "uncached-a", dataset_toml, tiny_model_dir, uncached_params)
    samples = params["train_batch_size"] * params["gradient_accumulation_steps"]
    assert sum(encoded) == params["max_train_steps"] * samples  # every sample of every step, encoded then
    _, second = run(tmp_path, "uncached-b", dataset_toml, tiny_model_dir, uncached_params)
    assert first.read_bytes() == second.read_bytes()
    uncached_vectors, cached_vectors = load_embedding(first)[0], load_embedding(cached)[0]
    assert torch.isfinite(uncached_vectors.float()).all() and not torch.equal(uncached_vectors, cached_vectors)


def test_nan_loss_stops_with_step_and_no_final(tmp_path, dataset_toml, tiny_model_dir, params):
    with pytest.raises(TrainingError, match=r"at step \d+"):
        run(tmp_path, "nan", dataset_toml, tiny_model_dir, dict(params, learning_rate=float("1e30")))
    assert not (tmp_path / "nan" / "eva-ti.safetensors").exists()


def test_embedding_loads_in_diffusers_pipeline(tmp_path, dataset_toml, tiny_model_dir, params):
    from diffusers import StableDiffusionPipeline

    _, final = run(tmp_path, "a", dataset_toml, tiny_model_dir, params)
    vectors, _ = load_embedding(final)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.load_textual_inversion(str(final), token="eva")
    tokens = ["eva"] + [f"eva_{index}" for index in range(1, 5)]
    ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    loaded = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
    torch.testing.assert_close(loaded.float(), vectors.float())
    image = pipe("a photo of eva", num_inference_steps=2, width=64, height=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_subject_named_like_a_word_trains_under_a_derived_token(tmp_path, dataset_toml, tiny_model_dir, params):
    """'photo' is a token of the tiny tokenizer: it used to fail when training started; now it trains under
    'photo-ti', 'photo-ti1', ... (logged and in the metadata), and the file is still photo-ti.safetensors."""
    import json

    messages = []
    out = tmp_path / "photo"
    final = out / "photo-ti.safetensors"
    train_embedding(dataset_toml=dataset_toml, model=sd15_spec(tiny_model_dir), subject="photo",
                    settings=TrainSettings.from_config(params, max_train_steps=2), final_path=final,
                    checkpoint_dir=out / "checkpoints",
                    loss_tsv=out / "loss.tsv", state_dir=out / "state", log=messages.append)
    vectors, metadata = load_embedding(final)
    assert tuple(vectors.shape) == (5, 768)
    assert json.loads(metadata["tifactory.training_tokens"]) == ["photo-ti"] + [f"photo-ti{i}" for i in range(1, 5)]
    assert metadata["modelspec.title"] == "photo-ti"
    assert any("'photo' is already a word of the tokenizer" in m and "'photo-ti'" in m for m in messages)
    assert any("tokens ['photo-ti', 'photo-ti1'" in m for m in messages)


@pytest.mark.slow  # two or more full training runs (10-18 s on 2 cores): the fast lane keeps one
def test_progress_lines_and_loss_table_as_training_goes(tmp_path, dataset_toml, tiny_model_dir, params):
    """A person watching the log sees steps, rate, loss and ETA, and loss.tsv grows during the run."""
    params = dict(params, max_train_steps=20, save_every_n_steps=20)
    out = tmp_path / "p"
    seen_rows = []
    messages = []

    def log(message):
        messages.append(message)
        if message.startswith("step ") and (out / "loss.tsv").exists():
            seen_rows.append(len((out / "loss.tsv").read_text().splitlines()) - 1)

    train_embedding(dataset_toml=dataset_toml, model=sd15_spec(tiny_model_dir), subject="eva",
                    settings=TrainSettings.from_config(params), final_path=out / "eva-ti.safetensors",
                    checkpoint_dir=out / "checkpoints",
                    loss_tsv=out / "loss.tsv", state_dir=out / "state", log=log, progress_every_s=1e-6)
    progress = [m for m in messages if m.startswith("step ")]
    # a line at every loss read-back (every 10 steps and the first), each with rate, loss and ETA
    assert [m.split()[1] for m in progress][:2] == ["1/20:", "10/20:"]
    assert all("samples/s" in m and "loss" in m and "ETA" in m for m in progress)
    # loss.tsv was on disk and growing while training ran, before the final write
    assert seen_rows[:2] == [1, 10]
    assert len((out / "loss.tsv").read_text().splitlines()) == 21
