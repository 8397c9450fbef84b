"""SDXL's pooled text embedding at the end-of-text token, not at argmax(token id)."""

from __future__ import annotations

import pytest
import torch

from tifactory.families.sdxl_text import eos_positions, pooled_at_eos

BOS, EOS, PAD = 48, 49, 0


def encoder(eos_token_id: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=8, hidden_act="gelu", projection_dim=24,
                            bos_token_id=BOS, eos_token_id=eos_token_id, pad_token_id=PAD)
    model = CLIPTextModelWithProjection(config).eval()
    model.resize_token_embeddings(51)  # a placeholder token, id 50: above <|endoftext|>
    return model


def test_pooling_at_eos_differs_from_transformers_argmax_pooling_with_a_new_token():
    """With the published SDXL config's eos_token_id 2, transformers pools at argmax(id) = the new token."""
    model = encoder(eos_token_id=2)
    ids = torch.tensor([[BOS, 5, 50, EOS, PAD, PAD], [BOS, 50, 7, 9, EOS, PAD]])
    with torch.no_grad():
        out = model(ids)
        ours = pooled_at_eos(out.last_hidden_state, ids, EOS, model.text_projection)
    expected = model.text_projection(out.last_hidden_state[torch.arange(2), torch.tensor([3, 4])])
    assert torch.allclose(ours, expected)
    at_new_token = model.text_projection(out.last_hidden_state[torch.arange(2), torch.tensor([2, 1])])
    assert torch.allclose(out.text_embeds, at_new_token)  # what transformers does
    assert not torch.allclose(ours, out.text_embeds, atol=1e-3)


def test_with_the_real_eos_id_transformers_agrees():
    """With eos_token_id = <|endoftext|>'s id (the shipped resources/sdxl/ config), both pool at the first EOS."""
    model = encoder(eos_token_id=EOS)
    ids = torch.tensor([[BOS, 5, 50, EOS, EOS, EOS]])
    with torch.no_grad():
        out = model(ids)
        assert torch.allclose(pooled_at_eos(out.last_hidden_state, ids, EOS, model.text_projection), out.text_embeds)


def test_first_eos_is_taken_and_a_row_without_one_is_named():
    assert eos_positions(torch.tensor([[1, 9, 9, 9], [1, 2, 9, 0]]), 9).tolist() == [1, 2]
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        eos_positions(torch.tensor([[1, 9], [1, 2]]), 9)
