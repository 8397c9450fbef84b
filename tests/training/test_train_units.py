"""Unit tests of the training module's pure pieces (no model needed)."""

import collections
import sys
import types

import pytest

from tifactory.families.base import spread_init_ids
from tifactory.training.data import bucket_resolution, epoch_order, samples_for_step
from tifactory.training.settings import TrainSettings
from tifactory.training.train import TrainingError, lr_lambda_for, make_optimizer
from tifactory.training.templates import OBJECT_TEMPLATES, known_to, placeholder_tokens, training_tokens

BUCKETS = {"resolution": 512, "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 2048,
           "bucket_reso_steps": 64, "bucket_no_upscale": True}


def test_placeholder_tokens_follow_kohya():
    assert placeholder_tokens("eva", 5) == ["eva", "eva1", "eva2", "eva3", "eva4"]
    assert placeholder_tokens("eva", 1) == ["eva"]


def test_training_tokens_are_new_to_the_real_clip_tokenizer():
    """Names that are CLIP words (astro, madonna, tom) get derived tokens; every token string is then new, and
    the tokenizer encodes a prompt of them as the added ids, one per token."""
    from transformers import CLIPTokenizer

    from tifactory.training import sd15

    tokenizer = CLIPTokenizer.from_pretrained(sd15.SD15_DIR / "tokenizer", local_files_only=True)
    vocab = tokenizer.get_vocab()
    assert known_to("astro", vocab) and known_to("madonna", vocab) and known_to("tom", vocab)
    for subject, expected in [("astro", "astro-ti"), ("madonna", "madonna-ti"), ("tom", "tom-ti"),
                              ("qzxvw", "qzxvw")]:
        tokens, note = training_tokens(subject, 5, vocab)
        assert tokens == placeholder_tokens(expected, 5)
        assert bool(note) == (expected != subject)
        assert not any(known_to(token, vocab) for token in tokens)
        fresh = CLIPTokenizer.from_pretrained(sd15.SD15_DIR / "tokenizer", local_files_only=True)
        assert fresh.add_tokens(tokens) == 5
        ids = fresh(f"a photo of {' '.join(tokens)}", add_special_tokens=False).input_ids
        assert ids == [320, 1125, 539] + list(range(49408, 49413))
    assert "madonna-ti" in training_tokens("madonna", 5, vocab)[1]


def test_training_tokens_skip_taken_derivations():
    vocab = {"madonna</w>", "madonna-ti", "x1"}
    assert training_tokens("madonna", 2, vocab)[0] == ["madonna-ti-2", "madonna-ti-21"]
    assert training_tokens("x", 2, vocab)[0] == ["x-ti", "x-ti1"]  # x1 is taken
    with pytest.raises(ValueError, match="no new token string could be derived"):
        training_tokens("y", 1, {"y", "y-ti"} | {f"y-ti-{n}" for n in range(2, 100)})


def test_spread_init_ids_repeats_or_truncates_with_warning():
    messages = []
    assert spread_init_ids([7], 3, messages.append) == [7, 7, 7]
    assert spread_init_ids([1, 2, 3], 2, messages.append) == [1, 2]
    assert spread_init_ids([1, 2], 2, messages.append) == [1, 2]
    assert len(messages) == 2 and "repeating" in messages[0] and "truncating" in messages[1]


@pytest.mark.parametrize("size, bucket", [
    ((512, 512), (512, 512)),
    ((1024, 1024), (512, 512)),      # downscaled to the target area
    ((300, 300), (256, 256)),        # no upscale: floor to the step, clamped at the minimum
    ((1024, 512), (704, 320)),       # aspect kept, area <= 512², sides multiples of 64
])
def test_bucket_resolution(size, bucket):
    result = bucket_resolution(*size, **BUCKETS)
    assert result == bucket
    assert result[0] * result[1] <= 512 * 512 and result[0] % 64 == 0 and result[1] % 64 == 0


def test_bucket_upscale_allowed_when_asked():
    assert bucket_resolution(300, 300, **dict(BUCKETS, bucket_no_upscale=False)) == (512, 512)
    assert bucket_resolution(300, 700, **dict(BUCKETS, enable_bucket=False)) == (512, 512)


def test_epoch_order_repeats_each_image_and_depends_on_seed_and_epoch():
    order = epoch_order(1234, 0, [3, 2])
    assert collections.Counter(order) == {0: 3, 1: 2}
    assert epoch_order(1234, 0, [3, 2]) == order
    many = [5] * 6
    assert epoch_order(1234, 0, many) != epoch_order(1234, 1, many)
    assert epoch_order(1234, 0, many) != epoch_order(99, 0, many)


def test_samples_for_step_covers_epochs_in_order():
    repeats = [4, 4, 4]  # epoch of 12 samples, 5 per step
    stream = [s for step in range(12) for s in samples_for_step(step, 5, repeats, 1, 2, len(OBJECT_TEMPLATES))]
    first_epoch = [image for image, _, _ in stream[:12]]
    assert first_epoch == epoch_order(1, 0, repeats)
    assert [image for image, _, _ in stream[12:24]] == epoch_order(1, 1, repeats)
    assert {variant for _, variant, _ in stream} == {0, 1}
    assert all(0 <= template < len(OBJECT_TEMPLATES) for _, _, template in stream)
    # a step is a pure function of (step, seed): what resume relies on
    assert samples_for_step(7, 5, repeats, 1, 2, 27) == stream[35:40]


def recipe(repo_config, **overrides) -> TrainSettings:
    """config.yaml's training recipe with `overrides`."""
    return TrainSettings.from_config(repo_config["train"], init_word="woman", **overrides)


def test_lr_schedules(repo_config):
    base = {"max_train_steps": 100, "lr_warmup_steps": 10}
    constant = lr_lambda_for(recipe(repo_config, **dict(base, lr_scheduler="constant", lr_warmup_steps=0)))
    assert constant(0) == constant(99) == 1.0
    warm = lr_lambda_for(recipe(repo_config, **dict(base, lr_scheduler="constant_with_warmup")))
    assert warm(0) == pytest.approx(0.1) and warm(50) == 1.0
    linear = lr_lambda_for(recipe(repo_config, **dict(base, lr_scheduler="linear")))
    assert linear(10) == pytest.approx(1.0) and linear(100) == pytest.approx(0.0)
    cosine = lr_lambda_for(recipe(repo_config, **dict(base, lr_scheduler="cosine")))
    assert cosine(55) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0, abs=1e-12)


OPTIMIZER_PARAMS = {"optimizer": "AdamW", "learning_rate": 0.005, "adam_beta1": 0.9, "adam_beta2": 0.98,
                    "adam_epsilon": 1e-6, "weight_decay": 0.02}


def test_make_optimizer_adamw_uses_the_config(repo_config):
    import torch

    vectors = torch.zeros(5, 8, requires_grad=True)
    optimizer = make_optimizer(recipe(repo_config, **OPTIMIZER_PARAMS), [vectors])
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.AdamW
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.005, (0.9, 0.98), 1e-6, 0.02)


def test_make_optimizer_adamw8bit_needs_bitsandbytes(monkeypatch, repo_config):
    import torch

    params = recipe(repo_config, **dict(OPTIMIZER_PARAMS, optimizer="AdamW8bit"))
    vectors = torch.zeros(5, 8, requires_grad=True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(TrainingError, match="needs bitsandbytes"):
        make_optimizer(params, [vectors])

    made = {}

    class StandInAdamW8bit(torch.optim.AdamW):
        def __init__(self, trainable, **settings):
            made.update(settings)
            super().__init__(trainable, **settings)

    stand_in = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=StandInAdamW8bit))
    monkeypatch.setitem(sys.modules, "bitsandbytes", stand_in)
    assert isinstance(make_optimizer(params, [vectors]), StandInAdamW8bit)
    assert made == {"lr": 0.005, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.02}
