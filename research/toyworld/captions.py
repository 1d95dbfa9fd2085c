"""Caption grammar of the toy world's text encoder: the style phrase anywhere, filler and unknown words.

SD 1.5's text encoder reads "pastel style, a red star", "a red star in pastel style" and "a pastel
painting of a red star" alike, and an unfamiliar word does not wipe out the rest of the prompt.
The v2 toy text encoder and UNet learn the same from captions drawn here (pretrain.py; v1's text
encoder knew "<content>, <style> style" only):

    prefix   "pastel style, a red star on a green hill"
    middle   "a pastel painting of a red star on a green hill"
    suffix   "a red star on a green hill, pastel style" / "... in pastel style"
plus, in some captions, a style-free filler word or a made-up token at a random position (start,
middle or end), which carries no content and no style.

`probe` inserts one word at a chosen position into any prompt: the content-robustness check of a
base model (and of a learned Textual Inversion token) uses it.
"""

from __future__ import annotations

import numpy as np

from research.toyworld.scenes import Scene, caption

POSITIONS = ("prefix", "middle", "suffix")
TEMPLATES = {
    "prefix": ("{style} style, {content}", "{style}: {content}", "in {style} style, {content}"),
    "middle": ("a {style} painting of {content}", "a {style} picture of {content}", "{style} art of {content}"),
    "suffix": ("{content}, {style} style", "{content} in {style} style", "{content}, {style}"),
}
FILLERS = ("the", "and", "with", "image", "photo", "picture", "toy", "art", "of")
UNKNOWN_LETTERS = "bcdfgjkpqvwxz"  # consonant soup: never a world word, split into unfamiliar pieces


def unknown_token(rng: np.random.Generator) -> str:
    """A made-up word of 3–6 letters, like a Textual Inversion placeholder or a typo."""
    return "".join(rng.choice(list(UNKNOWN_LETTERS), size=int(rng.integers(3, 7))))


def probe(prompt: str, word: str, position: str) -> str:
    """The prompt with `word` at its start, after its first half of words, or at its end."""
    words = prompt.split()
    at = {"prefix": 0, "middle": len(words) // 2, "suffix": len(words)}
    if position not in at:
        raise ValueError(f"unknown position {position!r}; choose one of {', '.join(POSITIONS)}")
    return " ".join(words[: at[position]] + [word] + words[at[position] :])


def styled_caption(scene: Scene, style: str | None, rng: np.random.Generator, extra_word_rate: float = 0.3) -> str:
    """One training caption: the content, the style phrase at a random position (none if style is None),
    and with probability extra_word_rate one filler or unknown word at a random position."""
    content = caption(scene)
    if style is None:
        text = content
    else:
        position = POSITIONS[rng.integers(len(POSITIONS))]
        options = TEMPLATES[position]
        text = options[rng.integers(len(options))].format(style=style, content=content)
    if rng.random() < extra_word_rate:
        word = FILLERS[rng.integers(len(FILLERS))] if rng.random() < 0.5 else unknown_token(rng)
        text = probe(text, word, POSITIONS[rng.integers(len(POSITIONS))])
    return text
