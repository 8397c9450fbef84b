"""Concept recovery on SDXL: on the tiny SDXL model taught as the demo's SD1.5 model is (tifactory.demo.taught with
family sdxl: each concept's hidden embedding is one [5, 768] tensor for CLIP-L and one [5, 1280] for bigG, and the
UNet is taught through the family's own conditioning: both encoders' penultimate states, the pooled output at the
end-of-text token, the size time ids), textual inversion through the real training function (`train_embedding`)
moves BOTH encoders' vectors toward the hidden concept v* whose held-out images it sees.

One seed, two runs from the init word "person": one on 6 held-out images of v* ("sun"), a control on images of
v** ("checker"); both judged against v* on the sun images (recovery_figures: per encoder, its own columns of the
hidden states at the placeholder tokens; the pooled embedding; the denoising loss).

Measured (taught TEACH_STEPS 50 steps, seed 0; STEPS 5 training steps; CPU, fp32, one thread), seed 1234 | seed 7:
  per encoder (CLIP-L / bigG), conditioning distance to v* over distance to v**
    target run   0.82 / 0.86 | 0.80 / 0.82     control run  1.22 / 1.17 | 1.19 / 1.14
    (the init word's: 1.05 / 1.04)
  cosine of the conditioning's displacement with the way from the init word's to v*'s
    target run   0.46 / 0.40 | 0.44 / 0.46     control run  -0.15 / -0.12 | -0.01 / 0.09
  the same for the pooled embedding: target 0.37 | 0.45, control -0.27 | -0.10
  loss on the sun images: init word 0.1359, target run 0.1344 | 0.1349, control run 0.1396 | 0.1382
  (10 training steps give the same picture: 0.85 / 0.89 | 0.84 / 0.85 against 1.21 / 1.17 | 1.19 / 1.15)
What it cannot show: after 50 teaching steps v*'s own loss on its images is only 0.15 % below the init word's, so
the share of that gap closed (asserted for SD1.5) is a ratio of noise here; taught 100 steps (twice the teaching
CPU time) the gap is 3 % and a 10-step target run closes 1.2 of it (control -1.9 | -1.3), with the same
conditioning figures. Nor does it test the pooling: the tiny SDXL UNet (1-2 channels per group norm group)
all but erases the time embedding that carries the pooled embedding, so the taught model learns the concepts
through cross-attention; the gradient on bigG's vectors through the pooled embedding is ~1e-5 of ~5e-3, and a
trainer that pools at argmax(id) passes this test (tests/training/test_sdxl_textbook_gradient.py catches it);
pooled_cos_target follows bigG's vectors. With learning rate 0 it fails. The cosine in vector space stays near 0
(0.05-0.08 against -0.12 to -0.16 for the control; not asserted). Departures from the recipe (config.yaml
`train:`): 5 steps, min_bucket_reso 64 and the images' resolution, as in the SD1.5 test
(tests/demo/test_concept_recovery.py).

Cost on one thread (as each pytest-xdist worker of a 2-core CI runs): teaching about 44 CPU seconds (once; cached
in .pytest_cache, keyed by the builder's fingerprint), each training run about 6 (a step runs 15 samples through
both text encoders forward and backward), each recovery_figures about 6.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from support.recovery import cached_taught_model, train_on_concept  # noqa: E402
from tifactory.demo.taught import recovery_figures  # noqa: E402

pytestmark = pytest.mark.slow

FAMILY = "sdxl"
TEACH_STEPS = 50
TARGET, CONTROL = "sun", "checker"
INIT_WORD = "person"
SEED = 1234
STEPS = 5


@pytest.fixture(scope="module")
def taught_sdxl_model(request, repo_config) -> Path:
    """The tiny SDXL model taught TEACH_STEPS steps, built once and cached in pytest's cache folder."""
    settings = {"family": FAMILY, "num_vectors": repo_config["train"]["num_vectors"], "steps": TEACH_STEPS, "seed": 0}
    return cached_taught_model(request.config.cache, settings)


def test_the_taught_model_hides_one_embedding_per_encoder(taught_sdxl_model, repo_config):
    from tifactory.demo.taught import CONCEPTS, read_concepts, read_taught_info

    num_vectors = repo_config["train"]["num_vectors"]
    assert read_taught_info(taught_sdxl_model)["family"] == FAMILY
    concepts = read_concepts(taught_sdxl_model, 2)
    assert sorted(concepts) == sorted(CONCEPTS)
    assert all([tuple(t.shape) for t in vectors] == [(num_vectors, 768), (num_vectors, 1280)]
               for vectors in concepts.values())


@pytest.fixture(scope="module")
def figures(taught_sdxl_model, repo_config, tmp_path_factory) -> dict:
    """recovery_figures toward TARGET of the run on TARGET's images and of the control run on CONTROL's."""
    runs = {concept: train_on_concept(taught_sdxl_model, concept, seed=SEED, root=tmp_path_factory.mktemp(concept),
                                      recipe=repo_config["train"], steps=STEPS, init_word=INIT_WORD)
            for concept in (TARGET, CONTROL)}
    images = runs[TARGET][1]
    return {name: recovery_figures(taught_sdxl_model, runs[concept][0], target=TARGET, other=CONTROL,
                                   init_word=INIT_WORD, images=images)
            for name, concept in (("target", TARGET), ("control", CONTROL))}


def test_both_encoders_vectors_move_to_the_concept_they_see(figures):
    on_target, control = figures["target"], figures["control"]
    print(on_target, control)
    assert len(on_target["encoders"]) == 2  # CLIP-L and bigG
    for encoder, (mine, theirs) in enumerate(zip(on_target["encoders"], control["encoders"])):
        # each encoder's conditioning moved toward the concept its run saw, not toward the other one
        assert mine["cond_dist_target"] < 0.95 * mine["cond_dist_other"], encoder
        assert theirs["cond_dist_other"] < 0.95 * theirs["cond_dist_target"], encoder
        # its displacement points toward the target far more than the control run's does
        assert mine["cond_cos_target"] > theirs["cond_cos_target"] + 0.2, encoder
    # the pooled embedding (bigG at the end-of-text token) as well
    assert on_target["pooled_cos_target"] > control["pooled_cos_target"] + 0.2
    # the target run's vectors explain the sun images better than the init word's, and than the control run's
    assert on_target["loss_trained"] < on_target["loss_init"]
    assert on_target["loss_trained"] < control["loss_trained"]
