"""Prompts file parsing, A1111 weights and the weighted-prompt encoder (tiny model)."""

from __future__ import annotations

import pytest
import torch

from tifactory.sampling.prompts import PromptEncoder, PromptError, apply_weights, parse_prompt_line, parse_weights, read_prompts


def test_weights_syntax():
    assert parse_weights("photo of (S:0.8)") == [("photo of ", 1.0), ("S", 0.8)]
    pieces = dict((text, weight) for text, weight in parse_weights("((a)) [b] (c (d):1.5) \\(e\\)"))
    assert pieces["a"] == pytest.approx(1.21)
    assert pieces["b"] == pytest.approx(1 / 1.1)
    assert pieces["c "] == pytest.approx(1.5) and pieces["d"] == pytest.approx(1.65)
    assert pieces[" (e)"] == 1.0
    for bad in ("(a", "a)", "[a)"):
        with pytest.raises(PromptError):
            parse_weights(bad)


def test_prompt_line_options_and_errors(tmp_path):
    prompt = parse_prompt_line("a photo of {token}, (smiling) --n blurry, dark --d 7 --s 12 --l 6.5 --w 256 --h 320")
    assert prompt.text == "a photo of {token}, (smiling)" and prompt.negative == "blurry, dark"
    assert (prompt.seed, prompt.steps, prompt.guidance_scale, prompt.width, prompt.height) == (7, 12, 6.5, 256, 320)
    assert parse_prompt_line("photo of {token} --x y").text == "photo of {token} --x y"
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\na photo of {token}\n\nportrait of {token} --w 100\n")
    with pytest.raises(PromptError, match=r"line 4: --w 100 must be a multiple of 8"):
        read_prompts(path)
    path.write_text("a photo of {token}\nno placeholder here\n")
    with pytest.raises(PromptError, match="line 2: prompt has no {token}"):
        read_prompts(path)
    path.write_text("a photo of {token} --s many\n")
    with pytest.raises(PromptError, match="--s needs a number"):
        read_prompts(path)


def test_apply_weights_keeps_mean():
    hidden = torch.randn(1, 5, 8) + 0.3
    weights = torch.tensor([1.0, 1.3, 0.5, 1.0, 1.0])
    out = apply_weights(hidden, weights)
    assert out.mean() == pytest.approx(hidden.mean(), rel=1e-4)
    ratio = (out[0, 1] / hidden[0, 1]) / (out[0, 0] / hidden[0, 0])
    assert torch.allclose(ratio, torch.full_like(ratio, 1.3), rtol=1e-4)
    assert apply_weights(hidden, torch.ones(5)) is hidden


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    from support.models import load_sd15
    from tifactory.families import family_named

    return PromptEncoder(family_named("sd15"), load_sd15(tiny_model_dir))


def test_encoder_embeddings_weights_and_combination(encoder):
    text_encoder = encoder.components.text_encoder
    vocab = text_encoder.get_input_embeddings().weight.shape[0]
    eva = torch.randn(3, 768)
    encoder.set("eva", [eva])
    encoder.set("neg", [torch.randn(2, 768)])
    ids, weights = encoder.token_ids("a photo of (eva:0.8) and neg, eva-like")
    placeholders = [i for i in ids if i >= vocab]
    assert placeholders == [vocab, vocab + 1, vocab + 2, vocab + 3, vocab + 4]  # eva's 3 + neg's 2; eva-like is text
    assert weights[ids.index(vocab)] == pytest.approx(0.8) and weights[ids.index(vocab + 3)] == 1.0
    table = text_encoder.get_input_embeddings().weight
    assert torch.allclose(table[vocab:vocab + 3], eva)

    def embeds(text):
        [(key, value)] = encoder.encode(text).items()  # SD1.5: the one prompt_embeds tensor
        assert key == "prompt_embeds"
        return value

    plain = embeds("a photo of eva")
    assert plain.shape == (1, 77, 768)
    assert torch.allclose(embeds("a photo of (eva:1.0)"), plain)
    assert not torch.allclose(embeds("a photo of (eva:1.4)"), plain)
    encoder.set("eva", [torch.randn(3, 768)])  # a new checkpoint: same slots, new vectors
    assert text_encoder.get_input_embeddings().weight.shape[0] == vocab + 5
    assert not torch.allclose(embeds("a photo of eva"), plain)
    with pytest.raises(PromptError, match="shape"):
        encoder.set("bad", [torch.randn(2, 64)])
    with pytest.raises(PromptError, match="this model has 1"):
        encoder.set("two", [torch.randn(2, 768), torch.randn(2, 768)])
