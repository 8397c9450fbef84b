"""SDXL's pooled text embedding, taken at the end-of-text token.

The UNet's `text_embeds` input is text_encoder_2's (OpenCLIP bigG's) final-layer-normed hidden state at
the end-of-text token, through its projection. transformers' CLIPTextModelWithProjection finds that
token as argmax(input_ids) when the config says `eos_token_id: 2` (what the published SDXL configs say):
right for CLIP's own vocabulary, where <|endoftext|> has the highest id, and wrong once placeholder tokens
are added above it, because it then pools at the placeholder. kohya pools at the end-of-text token on
purpose, as A1111/Forge and ComfyUI do at inference; `pooled_at_eos` does the same whatever the config.

Import cost: standard library only at import time.
"""

from __future__ import annotations


def eos_positions(input_ids, eos_token_id: int):
    """Per row of `input_ids` [batch, length], the position of the first `eos_token_id`; a row without one
    is a ValueError (a prompt tokenized without its end-of-text token)."""
    import torch

    is_eos = input_ids == eos_token_id
    missing = (~is_eos.any(dim=-1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"rows {missing} of input_ids have no end-of-text token (id {eos_token_id})")
    return is_eos.to(torch.int8).argmax(dim=-1)


def pooled_at_eos(last_hidden_state, input_ids, eos_token_id: int, text_projection):
    """text_projection(last_hidden_state[row, first end-of-text position]) for every row: SDXL's `text_embeds`.

    `last_hidden_state` [batch, length, width] is the encoder's output after its final layer norm
    (CLIPTextModelWithProjection's `last_hidden_state`); `text_projection` is its projection module
    (`encoder.text_projection`, a bias-free Linear) or any callable on [batch, width]."""
    import torch

    positions = eos_positions(input_ids.to(last_hidden_state.device), eos_token_id)
    rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
    return text_projection(last_hidden_state[rows, positions])
