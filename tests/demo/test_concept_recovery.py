"""Concept recovery: on the taught tiny model (tifactory.demo.taught), textual inversion through the real training
function (`train_embedding`) moves toward the hidden embedding v* of the concept whose held-out images it sees.

Per seed, two runs from the init word "person": one on 6 held-out images of v* ("sun"), a control on images
of v** ("checker"); both judged against v* on the sun images (recovery_figures).

Measured (taught model with the build defaults and config.yaml's teach_steps 250, seed 0; 25 steps; CPU, fp32),
seed 1234 | seed 7:
  conditioning distance to v* / to v** (target run)      34.4 / 38.7 (0.89) | 39.9 / 45.5 (0.88)
    (the init word's distance to v* is 28.4: the embedding overshoots; its output moves past v*'s)
  cosine of conditioning displacement with the way to v*  target 0.46, control 0.19 | target 0.39, control 0.25
  cosine in vector space                                  target 0.06, control 0.02 | 0.07, 0.05 (not asserted)
  loss on the sun images: init 0.0663, v* 0.0639
  share of that gap closed                                target 1.29, control 0.11 | target 1.28, control 0.76
(The same test on a model taught 500 steps gave conditioning ratios 0.91 / 0.85 and gap closed 2.6 vs -6.7 /
2.4 vs -5.7, with a loss gap of only 1 %.)

Departures from the recipe (config.yaml `train:`), and why:
- 25 steps, not 1000: four CPU runs must fit in a test; the direction is set within the first 25 steps.
- min_bucket_reso 64: the taught model knows 64 px images (8x8 latents); kohya's default floor of 256 would
  upscale them to a size the model was never taught; resolution (recorded in the embedding's metadata) is the
  images' 64 px, not config's auto. Learning rate, optimizer, batch and accumulation are the recipe's.
What the taught model cannot show: the init word's loss on v*'s images is only ~4% above v*'s (its UNet
infers most of a concept from the noisy latents, the conditioning adds little), so "gap closed" is a ratio of
small numbers (the trained embedding fits these six images better than v* itself), and the trained vectors
do not converge onto v* (distance grows with steps). Uses the demo's taught model when the same code built it with
the same settings (CI runs the demo first), else builds it once (cached in .pytest_cache, about 1.5 CPU
minutes); each run is under a CPU minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from support.recovery import cached_taught_model, train_on_concept  # noqa: E402
from tifactory.demo.taught import recovery_figures  # noqa: E402
from tifactory.roster import DEMO_MODEL_FAMILY  # noqa: E402

pytestmark = pytest.mark.slow

TARGET, CONTROL = "sun", "checker"
INIT_WORD = "person"
SEEDS = (1234, 7)
STEPS = 25  # a departure from the recipe (config.yaml train:), see the module docstring


@pytest.fixture(scope="session")
def taught_model(request, repo_root) -> Path:
    """The taught tiny model as config.yaml's demo_model builds it: the demo's own folder when this code built it
    with these settings (CI runs the demo first), else built once and cached in pytest's cache folder."""
    import yaml

    config = yaml.safe_load((repo_root / "config.yaml").read_text(encoding="utf-8"))
    settings = {"family": DEMO_MODEL_FAMILY, "num_vectors": config["train"]["num_vectors"],
                "steps": config["demo_model"]["teach_steps"], "seed": 0}
    return cached_taught_model(request.config.cache, settings,
                               reuse=(repo_root / "resources" / "models" / "demo-tiny",))


@pytest.fixture(scope="module", params=SEEDS)
def runs(request, taught_model, repo_config, tmp_path_factory):
    seed = request.param
    trained = {}
    for concept in (TARGET, CONTROL):
        trained[concept] = train_on_concept(taught_model, concept, seed=seed, root=tmp_path_factory.mktemp(
            f"{concept}{seed}"), recipe=repo_config["train"], steps=STEPS, init_word=INIT_WORD)
    return seed, trained


def test_embedding_moves_to_the_concept_it_sees(runs, taught_model):
    seed, trained = runs
    target_vectors, target_images = trained[TARGET]
    control_vectors, _ = trained[CONTROL]
    on_target = recovery_figures(taught_model, target_vectors, target=TARGET, other=CONTROL, init_word=INIT_WORD,
                                 images=target_images)
    control_toward_target = recovery_figures(taught_model, control_vectors, target=TARGET, other=CONTROL,
                                             init_word=INIT_WORD, images=target_images)
    print(seed, on_target, control_toward_target)
    # the conditioning moved toward the target concept, not toward the second concept
    assert on_target["cond_dist_target"] < 0.96 * on_target["cond_dist_other"]
    # its displacement points toward the target more than the control run's does
    assert on_target["cond_cos_target"] > control_toward_target["cond_cos_target"] + 0.08
    # the loss on the target images closes (at least most of) the gap from the init word to the target's
    # embedding; the control run's embedding does not close it, and closes far less of it
    assert on_target["gap_closed"] > 0.8
    assert control_toward_target["gap_closed"] < 1.0
    assert on_target["gap_closed"] > control_toward_target["gap_closed"] + 0.3
