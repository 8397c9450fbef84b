"""Concept recovery on a taught tiny model (tifactory.demo.taught), shared by the per-family recovery tests: the
taught model kept in pytest's cache, and real textual inversion (`train_embedding`, through the family seam) on
held-out images of one concept."""

from __future__ import annotations

import copy
from pathlib import Path

from tifactory.demo.taught import (
    build_taught_model,
    builder_fingerprint,
    is_taught_as,
    read_taught_info,
    write_concept_dataset,
)
from tifactory.families import ModelSpec, family_named
from tifactory.training.settings import TrainSettings
from tifactory.training.train import train_embedding

SUBJECT = "zqx"
IMAGES = 6  # held-out images of the concept in the dataset
REPEATS = 10
# the taught models know 64 px images (8x8 latents); kohya's default floor of 256 would upscale them to a size the
# models were never taught
MIN_BUCKET_RESO = 64


def cached_taught_model(cache, settings: dict, reuse: tuple[Path, ...] = ()) -> Path:
    """The taught model `build_taught_model(**settings)` builds: one of `reuse` when this code built it with these
    settings, else built once into pytest's cache folder (`cache` = request.config.cache), named by the family's
    builder fingerprint, and reused while the code and settings stay the same."""
    for folder in reuse:
        if is_taught_as(folder, **settings):
            return folder
    fingerprint = builder_fingerprint(settings["family"])[:16]
    folder = Path(cache.mkdir(f"taught-{settings['family']}-model-{fingerprint}")) / "model"
    if not is_taught_as(folder, **settings):
        build_taught_model(folder, log=lambda message: None, **settings)
    return folder


def train_on_concept(taught_model: Path, concept: str, *, seed: int, root: Path, recipe: dict, steps: int,
                     init_word: str, **overrides) -> tuple[list, list[Path]]:
    """train_embedding on a prepared dataset of IMAGES held-out images of `concept` (config's recipe less the
    departures: `steps` steps, the images' own resolution, MIN_BUCKET_RESO, CPU, no compile, `overrides`);
    returns (the final vectors per encoder, as the family reads them back, and the images)."""
    info = read_taught_info(taught_model)
    params = copy.deepcopy(recipe)
    params.update(seed=seed, init_word=init_word, max_train_steps=steps, save_every_n_steps=steps,
                  resolution=info["image_size"], min_bucket_reso=MIN_BUCKET_RESO, device="cpu", compile=False,
                  **overrides)
    bucket = {key: params[key] for key in ("enable_bucket", "min_bucket_reso", "max_bucket_reso",
                                           "bucket_reso_steps", "bucket_no_upscale")}
    toml = write_concept_dataset(concept, root / "dataset", subject=SUBJECT, class_word=init_word, count=IMAGES,
                                 size=info["image_size"], repeats=REPEATS, bucket=bucket)
    spec = ModelSpec(path=taught_model, family=info["family"])
    result = train_embedding(dataset_toml=toml, model=spec, subject=SUBJECT,
                             settings=TrainSettings.from_config(params),
                             final_path=root / f"{SUBJECT}-ti.safetensors", checkpoint_dir=root / "checkpoints",
                             loss_tsv=root / "loss.tsv", state_dir=root / "state", log=lambda message: None)
    vectors = [tensor.float() for tensor in family_named(info["family"]).read_vectors(result.final_path)]
    return vectors, sorted((root / "dataset").glob("*/*.png"))
