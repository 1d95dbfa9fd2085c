"""Textual Inversion: learn a few new token embeddings; the UNet, the VAE and every existing
embedding row stay frozen.

The seed notebook trained the whole embedding matrix (and weight decay pulled every word toward
zero). Here the new rows are a separate ``nn.Parameter`` of ``num_vectors x dim``: the original
table is never handed to the optimizer, so neither gradients nor weight decay can touch it, and
the trainable-parameter count in the cost table is the real one.

Saved as ``learned_embeds.safetensors`` = ``{placeholder_token: [num_vectors, dim]}``, the file
diffusers' own textual_inversion example writes, so it loads with
``pipe.load_textual_inversion(path, token=placeholder_token)``. Its tokens follow diffusers'
multi-vector naming (``<style>``, ``<style>_1``, ...): the pipeline expands ``<style>`` in a prompt
to all of them, and the training loop tokenizes captions through the same expansion.

A method (see base.py): above the blocks, below the training loop.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from research.atomic import atomic_path
from research.errors import ConfigError
from research.methods.base import Components, Method

log = logging.getLogger("research")


class TokenEmbeddingWithNewRows(torch.nn.Module):
    """The text encoder's frozen token table plus a small trainable block for ids >= first_new_id."""

    def __init__(self, base: torch.nn.Embedding, first_new_id: int, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.new_rows = torch.nn.Parameter(init.detach().float().clone())  # fp32 even when the base is bf16/fp16

    @property
    def weight(self) -> torch.Tensor:  # code that reads `.weight` (dtype/device checks) sees the base table
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        old = self.base(input_ids.masked_fill(is_new, 0))
        new = F.embedding((input_ids - self.first_new_id).clamp(min=0), self.new_rows).to(old.dtype)
        return torch.where(is_new.unsqueeze(-1), new, old)


class TextualInversion(Method):
    name = "textual_inversion"
    weight_name = "learned_embeds.safetensors"
    # the text encoder is frozen, but its new token rows train: caption embeddings change every step
    caches_text_embeddings = False

    def token_names(self) -> list[str]:
        p = self.cfg.placeholder_token
        return [p] + [f"{p}_{i}" for i in range(1, self.cfg.num_vectors)]

    def setup(self, c: Components) -> list[dict]:
        for module in (c.unet, c.vae, c.text_encoder):
            module.requires_grad_(False)
        names = self.token_names()
        vocab = c.tokenizer.get_vocab()
        if any(n in vocab for n in names) or c.tokenizer.add_tokens(names) != len(names):
            raise ConfigError(f"--placeholder-token {self.cfg.placeholder_token!r} (or one of {names[1:]}) is already "
                              "a token of this tokenizer; choose a new word such as '<my-style>'.")
        ids = c.tokenizer.convert_tokens_to_ids(names)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise RuntimeError(f"placeholder ids {ids} are not contiguous")
        table = c.text_encoder.get_input_embeddings()
        init = self._initial_vector(c, table.weight.detach().float())
        c.text_encoder.set_input_embeddings(
            TokenEmbeddingWithNewRows(table, ids[0], init.unsqueeze(0).repeat(len(names), 1)))
        log.info("textual inversion: %d new token(s) %s, started from %r", len(names), names[0],
                 self.cfg.initializer_token)
        rows = c.text_encoder.get_input_embeddings().new_rows
        return [{"params": [rows], "lr": self.cfg.learning_rate}]

    def _initial_vector(self, c: Components, table: torch.Tensor) -> torch.Tensor:
        pieces = c.tokenizer.encode(self.cfg.initializer_token, add_special_tokens=False) if self.cfg.initializer_token else []
        pieces = [i for i in pieces if i < len(table)]
        if len(pieces) == 1:
            return table[pieces[0]]
        if pieces:  # a word the tokenizer splits still carries its meaning in the mean of its pieces
            log.warning("--initializer-token %r is %d tokens; starting from the mean of their embeddings",
                        self.cfg.initializer_token, len(pieces))
            return table[pieces].mean(0)
        log.warning("--initializer-token is empty; starting from the mean embedding of the vocabulary")
        return table.mean(0)

    def caption(self, text: str) -> str:
        """The caption with the placeholder where a style phrase goes: after the content, as in the
        style templates of diffusers' textual_inversion example ("a painting in the style of {}").

        Not first: the text encoder's attention is causal, so a token first in the prompt is read by
        every later word, and a learned vector several times longer than any word's (see `save`'s
        log line) rewrites the content words with it. At the end it changes none of them."""
        p = self.cfg.placeholder_token
        return text if p in text.replace(",", " ").split() else f"{text}, in the style of {p}"

    def learned_embeds(self, c: Components) -> torch.Tensor:
        return c.text_encoder.get_input_embeddings().new_rows.detach().to("cpu", torch.float32).contiguous()

    def save(self, c: Components, checkpoint_dir: Path, metadata: dict[str, str]) -> list[Path]:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        rows, table = self.learned_embeds(c), c.text_encoder.get_input_embeddings().base.weight.detach().float()
        # A learned row many times longer than any word drowns the words that come after it in the
        # text encoder's causal attention: the first thing to look at when TI's content falls apart.
        log.info("textual inversion: learned vectors' norms %s; the vocabulary's largest is %.3g",
                 ", ".join(f"{n:.3g}" for n in rows.norm(dim=1).tolist()), table.norm(dim=1).max().item())
        out = checkpoint_dir / self.weight_name
        with atomic_path(out) as tmp_file:
            save_file({self.cfg.placeholder_token: rows}, tmp_file, metadata=metadata)
        return [out]

    def load_into(self, pipe, checkpoint_dir: Path, scale: float = 1.0) -> None:
        if scale != 1.0:
            raise ValueError(f"Textual Inversion embeddings have no strength; load them with scale 1, not {scale}.")
        pipe.load_textual_inversion(str(checkpoint_dir / self.weight_name), token=self.cfg.placeholder_token)
