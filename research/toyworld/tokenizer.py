"""A CLIPTokenizer over the toy world's words, built the way CLIP's own vocabulary is laid out.

Like openai/clip: 256 byte symbols, the same 256 with the end-of-word marker, then one entry per
merge, then the two special tokens. The merges are learned (plain BPE) on the world's words until
every word is a single token, while any other text still tokenizes (into pieces and letters).
"""

from __future__ import annotations

from transformers import CLIPTokenizer

from research.toyworld.scenes import BACKGROUNDS, COLOURS, SHAPES
from research.toyworld.styles import STYLES

MODEL_MAX_LENGTH = 24  # longest toy prompt ("an orange heart on a sandy beach, comic style" + trigger) is ~14 tokens
# Words beyond the scene grammar, so ordinary prompt phrasing ("a painting of …, in pastel style") stays cheap.
EXTRA_WORDS = ("a", "an", "on", "in", "of", "the", "and", "with", "style", "painting", "picture", "photo", "image", "art", "sks", "toy")


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte→printable-character map (byte-level BPE).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def world_words() -> list[str]:
    words = [*SHAPES, *COLOURS, *(w for b in BACKGROUNDS for w in b.split()), *STYLES, *EXTRA_WORDS]
    return list(dict.fromkeys(words))


def build_tokenizer() -> CLIPTokenizer:
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    # Train BPE on the word list: merging the most frequent pair until every word is one token.
    # Applying merges in the order learned reproduces this segmentation, so encoding agrees.
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in world_words()]
    merges: list[tuple[str, str]] = []
    while any(len(w) > 1 for w in words):
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=lambda pair: (counts[pair], pair))  # ties broken by the pair itself: deterministic
        merges.append(best)
        vocab_list.append(best[0] + best[1])
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i : i + 2] = [best[0] + best[1]]
                i += 1
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)
    for word in world_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        # A merge chain of one word can be pre-empted by a lower-ranked pair of another: catch it here.
        assert len(ids) == 1, f"toy vocabulary splits {word!r} into {tokenizer.convert_ids_to_tokens(ids)}"
    return tokenizer
