"""Fast unit tests of the taught tiny model's pieces: concept images, the closed-form VAE, the demo dataset."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tifactory.demo.taught import CONCEPTS, HELD_OUT_START, concept_image, other_concept

torch = pytest.importorskip("torch")


def test_concept_images_are_deterministic_families():
    for concept in CONCEPTS:
        first = concept_image(concept, 0, 64)
        assert first.shape == (64, 64, 3) and first.dtype == np.uint8
        assert np.array_equal(first, concept_image(concept, 0, 64))
        assert not np.array_equal(first, concept_image(concept, 1, 64))  # a family, not one picture
    means = [concept_image(c, 0, 64).reshape(-1, 3).mean(0) for c in CONCEPTS]
    assert min(np.abs(a - b).max() for i, a in enumerate(means) for b in means[i + 1:]) > 40  # distinct palettes
    with pytest.raises(ValueError):
        concept_image("dog", 0, 64)
    assert other_concept(CONCEPTS[-1]) == CONCEPTS[0]


def test_demo_concept_dataset_is_held_out_images_of_sun(repo_root):
    """resources/demo_concepts/sun is the prepared demo dataset: exactly the held-out sun images."""
    folder = repo_root / "resources" / "demo_concepts" / "sun" / "10_sun person"
    paths = sorted(folder.glob("*.png"))
    assert len(paths) == 6
    for number, path in enumerate(paths):
        with Image.open(path) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), concept_image("sun", HELD_OUT_START + number, 64))


def test_closed_form_vae_encodes_block_colours_exactly():
    from tifactory.demo.taught import block_means, closed_form_vae, images_to_pixels

    images = [concept_image(c, i, 64) for c in CONCEPTS for i in range(6)]
    pixels = images_to_pixels(images)
    raw = block_means(pixels)
    mean, std = raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3))
    vae = closed_form_vae(mean, std, 0.18215)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean * vae.config.scaling_factor
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    assert posterior.std.max() < 1e-6  # deterministic posterior
    torch.testing.assert_close(latents.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(latents.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-3, rtol=0)
    blocks = torch.nn.functional.interpolate(raw[:, :3], scale_factor=8, mode="nearest")
    torch.testing.assert_close(decoded, blocks, atol=1e-3, rtol=0)  # paints the 8x8 block colours back


def test_a_taught_folder_is_reused_only_when_this_code_built_it_so(tmp_path):
    """is_taught_as: same code and settings -> reuse; other steps, seed or code -> build anew."""
    import json

    from tifactory.demo.taught import TAUGHT_FILE, build_taught_model, is_taught_as

    folder = build_taught_model(tmp_path / "taught", family="sd15", num_vectors=2, steps=1, log=lambda message: None)
    assert is_taught_as(folder, family="sd15", num_vectors=2, steps=1, seed=0)
    assert not is_taught_as(folder, family="sd15", num_vectors=2, steps=2, seed=0)
    assert not is_taught_as(folder, family="sd15", num_vectors=3, steps=1, seed=0)
    assert not is_taught_as(folder, family="sd15", num_vectors=2, steps=1, seed=1)
    assert not is_taught_as(folder, family="sdxl", num_vectors=2, steps=1, seed=0)  # another family's
    with pytest.raises(ValueError, match="no tiny model to teach"):
        build_taught_model(tmp_path / "other", family="sd2", num_vectors=2, steps=1, log=lambda message: None)
    assert not is_taught_as(tmp_path / "nothing", family="sd15", num_vectors=2, steps=1, seed=0)
    info = json.loads((folder / TAUGHT_FILE).read_text())
    (folder / TAUGHT_FILE).write_text(json.dumps({**info, "builder": "0" * 64}))  # built by other code
    assert not is_taught_as(folder, family="sd15", num_vectors=2, steps=1, seed=0)
    (folder / TAUGHT_FILE).write_text(json.dumps({**info, "learning_rate": 1.0}))  # other build settings
    assert not is_taught_as(folder, family="sd15", num_vectors=2, steps=1, seed=0)
