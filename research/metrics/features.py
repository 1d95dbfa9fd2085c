"""Backbone features, computed once per image set and shared by every metric that needs them.

CLIP features are the raw projected embeddings (clean-fid's CLIP extractor uses the same, unnormalised,
for FID/KID); cosine-based metrics normalise them themselves.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from cleanfid.resize import build_resizer
from tqdm.auto import tqdm

from .backbones import ClipBundle

BATCH_SIZE = 64  # images per forward pass; small enough for CPU memory at 224 px


def _batches(items: Sequence, desc: str, progress: bool):
    starts = range(0, len(items), BATCH_SIZE)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield items[s:s + BATCH_SIZE]


@torch.no_grad()
def clip_image_features(clip: ClipBundle, images: Sequence[Image.Image], progress: bool = True, desc: str = "CLIP images") -> np.ndarray:
    device = next(clip.model.parameters()).device
    out = []
    for batch in _batches(list(images), desc, progress):
        pixels = clip.processor(images=[im.convert("RGB") for im in batch], return_tensors="pt")["pixel_values"]
        out.append(clip.model.get_image_features(pixel_values=pixels.to(device)).pooler_output.float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def clip_text_features(clip: ClipBundle, prompts: Sequence[str]) -> np.ndarray:
    """Embeddings of the distinct prompts, returned aligned with `prompts` (one row each)."""
    device = next(clip.model.parameters()).device
    unique = sorted(set(prompts))
    max_len = clip.model.config.text_config.max_position_embeddings  # CLIP truncates long prompts at 77 tokens
    tokens = clip.tokenizer(unique, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(device)
    feats = clip.model.get_text_features(**tokens).pooler_output.float().cpu().numpy()
    row = {p: i for i, p in enumerate(unique)}
    return feats[[row[p] for p in prompts]]


@torch.no_grad()
def inception_features(inception: torch.nn.Module, images: Sequence[Image.Image], with_probs: bool = False,
                       progress: bool = True, desc: str = "Inception") -> tuple[np.ndarray, np.ndarray | None]:
    """2048-d pool features in clean-fid's clean mode and, on request, the 1008-way class probabilities for IS."""
    resize = build_resizer("clean")  # PIL bicubic to 299 px without quantising, as clean-fid does
    device = next(inception.parameters()).device
    feats, probs = [], []
    for batch in _batches(list(images), desc, progress):
        x = np.stack([resize(np.asarray(im.convert("RGB"))) for im in batch])
        x = torch.from_numpy(x).permute(0, 3, 1, 2).to(device)  # [0, 255] floats, as clean-fid feeds them
        feats.append(inception(x).cpu())
        if with_probs:
            # the TorchScript net's softmax head; no output bias, matching Salimans et al.'s IS
            probs.append(inception.base(x, no_output_bias=True).cpu())
    return torch.cat(feats).double().numpy(), (torch.cat(probs).double().numpy() if with_probs else None)


def pil_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """uint8 [N, 3, H, W] in [0, 255]."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
