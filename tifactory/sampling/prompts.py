"""Sample prompts: the prompts file (kohya-style per-line options), A1111-style weights, text encoding.

Prompts file: one prompt per line, blank lines and `#` comments skipped, each with a `{token}` placeholder
(replaced by the subject's trigger, or by the init word for step 0). Options follow the prompt, kohya
sd-scripts style: ` --n <negative prompt>`, ` --d <seed>`, ` --s <steps>`, ` --l <CFG scale>`, ` --w <width>`,
` --h <height>`; anything not given comes from config.

Weights (AUTOMATIC1111 syntax): `(text)` multiplies the attention to `text` by 1.1, `[text]` divides it by
1.1, `(text:0.8)` sets the multiplier; brackets nest (multipliers multiply); `\\(` `\\)` `\\[` `\\]` are
literal brackets. The weights scale the text encoder's output per token, then the whole tensor is
rescaled so its mean stays that of the unweighted encoding (A1111's method). The model family
(tifactory.families) says which encoder outputs make the pipeline's prompt embeddings.

Embeddings: any textual-inversion trigger word in the table (the subject's `{token}`, extra embeddings such
as a negative embedding) becomes its vectors in place; several can be combined with plain words. The files
are read by tifactory.training.embedding (the format's owner).

Parse-time cheap: torch is imported inside the functions that need it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from tifactory.errors import TifactoryError

ATTENTION_STEP = 1.1
OPTION_FLAGS = {"n": "negative", "d": "seed", "s": "steps", "l": "guidance_scale", "w": "width", "h": "height"}
_OPTION_SPLIT = re.compile(r"\s+--(?=[ndslwh](?:\s|$))")


class PromptError(TifactoryError, ValueError):
    """The sample prompts file (or one prompt in it) is unusable."""


@dataclass(frozen=True)
class SamplePrompt:
    """One line of the prompts file; None = take the value from config."""

    text: str
    negative: str = ""
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    line: int = 0


def parse_prompt_line(line: str, *, where: str = "prompt") -> SamplePrompt:
    """`a photo of {token} --n blurry --d 7 --s 20 --l 6 --w 512 --h 768` -> SamplePrompt."""
    parts = _OPTION_SPLIT.split(line.strip())
    text = parts[0].strip()
    values: dict = {}
    for part in parts[1:]:
        flag, _, value = part.partition(" ")
        value = value.strip()
        name = OPTION_FLAGS[flag]
        if name in values:
            raise PromptError(f"{where}: option --{flag} given twice")
        if name == "negative":
            values[name] = value
            continue
        try:
            number = float(value) if name == "guidance_scale" else int(value)
        except ValueError:
            raise PromptError(f"{where}: option --{flag} needs a number, got {value!r}") from None
        if name in ("width", "height") and (number < 64 or number % 8):
            raise PromptError(f"{where}: --{flag} {number} must be a multiple of 8, at least 64")
        if name == "steps" and number < 1 or name in ("seed", "guidance_scale") and number < 0:
            raise PromptError(f"{where}: --{flag} {value} is out of range")
        values[name] = number
    if "{token}" not in text:
        raise PromptError(f"{where}: prompt has no {{token}} placeholder: {text!r}")
    parse_weights(text.replace("{token}", "x"), where=where)
    parse_weights(values.get("negative", ""), where=where)
    return SamplePrompt(text=text, **values)


def read_prompts(path: str | os.PathLike) -> list[SamplePrompt]:
    """Every prompt of a prompts file; a bad line fails with the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"sample prompts file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        prompts.append(replace(parse_prompt_line(line, where=f"{path}, line {number}"), line=number))
    if not prompts:
        raise PromptError(f"{path}: no prompts")
    return prompts


def parse_weights(text: str, *, where: str = "prompt") -> list[tuple[str, float]]:
    """A1111 attention syntax -> [(text, weight)], neighbouring pieces of equal weight merged."""
    pieces: list[tuple[str, float]] = []
    stack: list[tuple[str, int]] = []  # (bracket, index into pieces where it opened)
    buffer: list[str] = []

    def flush():
        if buffer:
            pieces.append(("".join(buffer), 1.0))
            buffer.clear()

    def apply(start: int, factor: float):
        for index in range(start, len(pieces)):
            piece, weight = pieces[index]
            pieces[index] = (piece, weight * factor)

    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in "()[]\\":
            buffer.append(text[i + 1])
            i += 2
            continue
        if char in "([":
            flush()
            stack.append((char, len(pieces)))
        elif char == ")":
            if not stack or stack[-1][0] != "(":
                raise PromptError(f"{where}: unbalanced ')' at character {i + 1} of {text!r}")
            explicit = re.search(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$", "".join(buffer))
            factor = ATTENTION_STEP
            if explicit:
                factor = float(explicit.group(1))
                del buffer[len(buffer) - len(explicit.group(0)):]
            flush()
            apply(stack.pop()[1], factor)
        elif char == "]":
            if not stack or stack[-1][0] != "[":
                raise PromptError(f"{where}: unbalanced ']' at character {i + 1} of {text!r}")
            flush()
            apply(stack.pop()[1], 1 / ATTENTION_STEP)
        else:
            buffer.append(char)
        i += 1
    if stack:
        raise PromptError(f"{where}: unclosed {stack[-1][0]!r} in {text!r}")
    flush()
    merged: list[tuple[str, float]] = []
    for piece, weight in pieces:
        if merged and abs(merged[-1][1] - weight) < 1e-9:
            merged[-1] = (merged[-1][0] + piece, weight)
        elif piece:
            merged.append((piece, weight))
    return merged


@dataclass
class PromptEncoder:
    """Turns weighted prompt text into the sampling pipeline's prompt embeddings, with textual-inversion vectors,
    through the model family (tifactory.families): SD1.5 `prompt_embeds` [1, 77, 768].

    `components` is the loaded model; a trigger word's vectors (one [n, dim] tensor per text encoder) go into
    new rows of every encoder's token table with `set`, which may be called again to swap a checkpoint's in.
    """

    family: object
    components: object
    embeddings: dict = field(default_factory=dict)  # trigger -> its vectors, one tensor per encoder
    _slots: dict = field(default_factory=dict, init=False)  # trigger -> first placeholder id

    def set(self, trigger: str, vectors: list) -> None:
        """Install (or replace) the vectors of one trigger word: one [n, dim] tensor per text encoder."""
        import torch

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", trigger):
            raise PromptError(f"embedding trigger {trigger!r} must be one word")
        encoders = self.components.text_encoders
        vectors = [torch.as_tensor(tensor).detach() for tensor in vectors]
        if len(vectors) != len(encoders):
            raise PromptError(f"embedding {trigger!r} has vectors for {len(vectors)} text encoder(s); this model has "
                              f"{len(encoders)}")
        widths = [encoder.get_input_embeddings().weight.shape[1] for encoder in encoders]
        counts = {tensor.shape[0] if tensor.ndim == 2 else -1 for tensor in vectors}
        if any(tensor.ndim != 2 or tensor.shape[1] != width for tensor, width in zip(vectors, widths)) \
                or len(counts) != 1:
            raise PromptError(f"embedding {trigger!r} has shape(s) {[tuple(tensor.shape) for tensor in vectors]}; "
                              f"this model needs {' and '.join(f'[n, {width}]' for width in widths)}")
        count = vectors[0].shape[0]
        previous = self.embeddings.get(trigger)
        if previous is None or previous[0].shape[0] != count:
            self._slots[trigger] = encoders[0].get_input_embeddings().weight.shape[0]
            for encoder in encoders:
                encoder.resize_token_embeddings(self._slots[trigger] + count)
        start = self._slots[trigger]
        with torch.no_grad():
            for encoder, tensor in zip(encoders, vectors):
                table = encoder.get_input_embeddings()
                table.weight[start:start + count] = tensor.to(table.weight.device, table.weight.dtype)
        self.embeddings[trigger] = vectors

    def token_ids(self, text: str, *, where: str = "prompt") -> tuple[list[int], list[float]]:
        """Token ids (without BOS/EOS) and one weight per token (the family's tokenizers share a vocabulary)."""
        tokenizer = self.components.tokenizers[0]
        ids: list[int] = []
        weights: list[float] = []
        pattern = (re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(self._slots, key=len, reverse=True)))
                              + r")(?![\w-])") if self._slots else None)
        for piece, weight in parse_weights(text, where=where):
            parts = pattern.split(piece) if pattern else [piece]
            for index, part in enumerate(parts):
                if index % 2:  # a trigger word
                    count = self.embeddings[part][0].shape[0]
                    new = list(range(self._slots[part], self._slots[part] + count))
                else:
                    new = tokenizer(part, add_special_tokens=False).input_ids if part.strip() else []
                ids += new
                weights += [weight] * len(new)
        return ids, weights

    def encode(self, text: str, *, where: str = "prompt", log=None) -> dict:
        """The pipeline's prompt-embedding arguments for one weighted prompt (truncated to one CLIP window),
        as the family builds them (SD1.5: {"prompt_embeds": [1, 77, 768]})."""
        import torch

        ids, weights = self.token_ids(text, where=where)
        first = self.components.tokenizers[0]
        room = first.model_max_length - 2
        if len(ids) > room:
            if log:
                log(f"{where}: {len(ids)} tokens, truncated to {room}")
            ids, weights = ids[:room], weights[:room]
        full_weights = [1.0] + weights + [1.0]
        full_weights += [1.0] * (room + 2 - len(full_weights))
        ids_per_encoder = []
        for tokenizer, encoder in zip(self.components.tokenizers, self.components.text_encoders):
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            full = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
            full += [pad] * (room + 2 - len(full))
            ids_per_encoder.append(torch.tensor([full], device=encoder.get_input_embeddings().weight.device))
        device = ids_per_encoder[0].device
        with torch.no_grad():
            return self.family.prompt_embeddings(self.components, ids_per_encoder,
                                                 torch.tensor(full_weights, device=device))


def apply_weights(hidden, weights):
    """Scale each token's encoding by its weight, keeping the overall mean (A1111's normalisation)."""
    if bool((weights == 1).all()):
        return hidden
    original_mean = hidden.float().mean()
    weighted = hidden * weights.reshape(1, -1, 1)
    new_mean = weighted.float().mean()
    if float(new_mean.detach()) == 0.0:
        return weighted
    return weighted * (original_mean / new_mean).to(hidden.dtype)
