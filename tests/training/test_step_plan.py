"""The step plan as the training loop runs it (issue 19 §3), for every model family: over many steps the loop's
own per-step code (`build_step_plan` + `accumulate_step_gradient`) draws timesteps uniformly over the whole
noise schedule, shows every image exactly as often as its repeats say (each flip variant about half the time),
and draws the prompt templates as kohya does (uniformly, independently for each sample).

A recording model call stands in for the text encoder + UNet: it sees exactly the timesteps, token ids and
per-sample sizes the loop hands the real one. The images are identified through their size rows (the sizes a
family such as SDXL conditions on), which travel with the latent rows through the plan."""

from __future__ import annotations

import collections

import pytest
import torch

from tifactory.families import FAMILIES, family_named
from tifactory.training.data import BucketLatents, TrainingData, TrainingImage, build_step_plan, training_prompts
from tifactory.training.settings import TrainSettings
from tifactory.training.templates import TEMPLATES
from tifactory.training.train import accumulate_step_gradient

REPEATS = [5, 4, 6]  # one epoch = 15 samples = one optimizer step (train_batch_size 1 x accumulation 15)
BUCKET_OF_IMAGE = [0, 1, 0]  # two buckets: the loop groups each step's samples by bucket
STEPS = 400
CHI2_999 = {9: 27.88, 26: 54.05, 1: 10.83}  # chi-square quantile at p = 0.999, by degrees of freedom


def chi_square(counts: list[int]) -> float:
    expected = sum(counts) / len(counts)
    return sum((count - expected) ** 2 / expected for count in counts)


def record_loop(family_name: str, repo_config) -> tuple[list, list, list]:
    """Run the loop's per-step code for STEPS steps; returns per step the (timestep, image, variant, prompt row)
    of every sample, as the model call saw them."""
    family = family_named(family_name)
    settings = TrainSettings.from_config(repo_config["train"], init_word="woman", flip_aug=True, seed=1234,
                                         train_batch_size=1, gradient_accumulation_steps=15, micro_batch_size=4)
    num_variants = 2
    images = [TrainingImage(path=None, bucket=(64, 64) if bucket == 0 else (64, 128), size=(64, 64))
              for bucket in BUCKET_OF_IMAGE]
    prompts, prompt_for_sample = training_prompts(images, settings, "zqx", ["zqx"], lambda message: None)
    image_slots, latents, sizes = [], [[], []], [[], []]
    for index, bucket in enumerate(BUCKET_OF_IMAGE):
        image_slots.append((bucket, len(latents[bucket]) // num_variants))
        for variant in range(num_variants):
            latents[bucket].append(torch.zeros(4, 2, 2))
            sizes[bucket].append([index, variant, 0, 0, 0, 0])  # the size row names its image and variant here
    data = TrainingData(
        images=images, repeats=REPEATS, prompts=prompts,
        prompt_ids=[torch.arange(len(prompts)).unsqueeze(1)],  # prompt row r tokenises to [r]
        prompt_for_sample=prompt_for_sample, num_variants=num_variants, image_slots=image_slots,
        bucket_latents=BucketLatents([torch.stack(rows) for rows in latents]),
        bucket_sizes=[torch.tensor(rows) for rows in sizes])
    alphas_cumprod = family.noise_scheduler(None).alphas_cumprod.float()
    weight = torch.nn.Parameter(torch.ones(()))
    seen: list = []

    def model_call(noisy_latents, timesteps, inputs):
        ids_per_encoder, chunk_sizes = inputs
        seen.extend(zip(timesteps.tolist(), chunk_sizes[:, 0].tolist(), chunk_sizes[:, 1].tolist(),
                        ids_per_encoder[0][:, 0].tolist()))
        return noisy_latents * weight

    plan = build_step_plan(0, STEPS, settings.samples_per_step, REPEATS, settings.seed, num_variants, images,
                           image_slots, prompt_for_sample, torch.device("cpu"))
    grad_scaler = torch.amp.GradScaler("cpu", enabled=False)
    per_step = []
    for step in range(STEPS):
        seen.clear()
        accumulate_step_gradient(step, plan.groups[step], plan, data, model_call, alphas_cumprod, grad_scaler,
                                 settings, torch.device("cpu"), settings.micro_batch_size)
        per_step.append(list(seen))
    return per_step, prompts, alphas_cumprod


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def recorded(request):
    import yaml

    from tifactory import REPO_ROOT

    with open(REPO_ROOT / "config.yaml", encoding="utf-8") as handle:
        repo_config = yaml.safe_load(handle)
    return record_loop(request.param, repo_config)


def test_timesteps_are_uniform_over_the_whole_schedule(recorded):
    per_step, _, alphas_cumprod = recorded
    timesteps = [sample[0] for step in per_step for sample in step]
    num_timesteps = len(alphas_cumprod)
    assert num_timesteps == 1000 and len(timesteps) == 15 * STEPS
    assert min(timesteps) >= 0 and max(timesteps) < num_timesteps
    assert min(timesteps) < num_timesteps // 100 and max(timesteps) >= num_timesteps - num_timesteps // 100
    tenths = collections.Counter(t * 10 // num_timesteps for t in timesteps)
    assert chi_square([tenths[bin_] for bin_ in range(10)]) < CHI2_999[9], tenths
    # a step's timesteps are drawn afresh (not one timestep per step)
    assert sum(len({sample[0] for sample in step}) > 1 for step in per_step) == STEPS


def test_every_image_is_seen_as_its_repeats_say(recorded):
    per_step, _, _ = recorded
    for step in per_step:  # one step = one epoch here: each image exactly `repeats` times
        counts = collections.Counter(sample[1] for sample in step)
        assert [counts[image] for image in range(len(REPEATS))] == REPEATS
    variants = collections.Counter(sample[2] for step in per_step for sample in step)
    assert set(variants) == {0, 1} and chi_square([variants[0], variants[1]]) < CHI2_999[1], variants


def test_templates_are_drawn_uniformly_and_independently_of_the_image(recorded):
    per_step, prompts, _ = recorded
    assert prompts == [template.format("zqx") for template in TEMPLATES["object"]]
    rows = [sample[3] for step in per_step for sample in step]
    counts = collections.Counter(rows)
    assert chi_square([counts[row] for row in range(len(prompts))]) < CHI2_999[len(prompts) - 1], counts
    for image in range(len(REPEATS)):  # each image meets every template, not a fixed one
        assert len({sample[3] for step in per_step for sample in step if sample[1] == image}) == len(prompts)
