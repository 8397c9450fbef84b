"""Prompt templates for textual inversion (the "object" and "style" families of the TI paper)."""

from tifactory.training.embedding import TRIGGER_SUFFIX

OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


WORD_END = "</w>"  # CLIP's BPE marks a word-final token with it: "madonna</w>" is the word madonna
DERIVED_SUFFIX = TRIGGER_SUFFIX  # as the embedding's file name (the trigger people type): madonna-ti


def placeholder_tokens(subject: str, num_vectors: int) -> list[str]:
    """kohya's token names: S, S1, ..., S{n-1}."""
    return [subject] + [f"{subject}{index}" for index in range(1, num_vectors)]


def known_to(token: str, vocab) -> bool:
    """Whether a tokenizer vocabulary (token strings) already has `token`, as a piece or as a whole word."""
    return token in vocab or token + WORD_END in vocab


def training_tokens(subject: str, num_vectors: int, vocab) -> tuple[list[str], str]:
    """The token strings a subject trains under, and a note ('' when the subject's own name is used).

    People trigger the embedding by its file name (`photo of madonna-ti`), so inside training the tokens only
    have to be new to the tokenizer. They are kohya's `S, S1 ... S{n-1}` when none of those is known to
    `vocab` (any container of token strings, e.g. vocab.json's keys); otherwise they are derived from the
    trigger, `madonna-ti, madonna-ti1, ...` (then `madonna-ti-2, ...`): still recognisable in metadata."""
    candidates = [subject, subject + DERIVED_SUFFIX] + [f"{subject}{DERIVED_SUFFIX}-{n}" for n in range(2, 100)]
    for base in candidates:
        tokens = placeholder_tokens(base, num_vectors)
        taken = [token for token in tokens if known_to(token, vocab)]
        if not taken:
            if base == subject:
                return tokens, ""
            return tokens, (f"subject {subject!r}: {subject!r} is already a word of the tokenizer, so it trains "
                            f"under the new token(s) {tokens[0]!r}…; the trigger stays the file name "
                            f"{subject}{DERIVED_SUFFIX}")
    raise ValueError(f"subject {subject!r}: no new token string could be derived (tried {candidates[0]!r} to "
                     f"{candidates[-1]!r}); rename the subject")
