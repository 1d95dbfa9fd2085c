"""LPIPS diversity: how different the images of one prompt (different seeds) look to each other."""
from __future__ import annotations

from itertools import combinations
from typing import Mapping

import numpy as np
import torch

from .stats import Design, Replicates, replicate

PAIRS_PER_BATCH = 128  # image pairs per LPIPS forward pass


def to_lpips_input(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Rescale images from `value_range` to the [-1, 1] that LPIPS expects (the seed fed [0, 1]).

    The range is stated by the caller, not guessed from the pixels: a dark [-1, 1] image can lie inside [0, 1].
    """
    lo, hi = value_range
    x = x.float()
    if x.min() < lo - 1e-3 or x.max() > hi + 1e-3:
        raise ValueError(f"Images lie in [{x.min():.3g}, {x.max():.3g}], outside the stated value_range {value_range}.")
    return (x - lo) / (hi - lo) * 2 - 1


@torch.no_grad()
def lpips_distance(lpips_model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                   value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """LPIPS between paired images x[i], y[i] ([N, 3, H, W] in value_range)."""
    device = next(lpips_model.parameters()).device
    x, y = to_lpips_input(x, value_range).to(device), to_lpips_input(y, value_range).to(device)
    return lpips_model(x, y).flatten().cpu().double().numpy()


def within_prompt_pairs(prompts) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i, j) of images that share a prompt, as an [P, 2] index array, and each pair's prompt."""
    by_prompt: dict = {}
    for i, p in enumerate(list(prompts)):
        by_prompt.setdefault(p, []).append(i)
    pairs = np.array([(i, j) for idx in by_prompt.values() for i, j in combinations(idx, 2)], dtype=int).reshape(-1, 2)
    return pairs, np.array([prompts[i] for i in pairs[:, 0]], dtype=object)


def pair_distances(lpips_model: torch.nn.Module, pixels: torch.Tensor, pairs: np.ndarray,
                   value_range: tuple[float, float]) -> np.ndarray:
    """LPIPS of each pair (pixels[i], pixels[j]), PAIRS_PER_BATCH pairs per forward pass."""
    if not len(pairs):
        return np.zeros(0)
    return np.concatenate([lpips_distance(lpips_model, pixels[pairs[s:s + PAIRS_PER_BATCH, 0]],
                                          pixels[pairs[s:s + PAIRS_PER_BATCH, 1]], value_range)
                           for s in range(0, len(pairs), PAIRS_PER_BATCH)])


def lpips_diversity(images_by_prompt: Mapping[str, torch.Tensor], lpips_model: torch.nn.Module,
                    value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Per prompt with ≥ 2 images, the mean LPIPS over all pairs of its images.

    The prompt, not the pair, is the unit of the interval: pairs of one prompt share images.
    """
    prompts = [p for p, imgs in images_by_prompt.items() for _ in range(len(imgs))]
    pixels = torch.cat([imgs for imgs in images_by_prompt.values()])
    pairs, owner = within_prompt_pairs(prompts)
    dists = pair_distances(lpips_model, pixels, pairs, value_range)
    return np.array([dists[owner == p].mean() for p in dict.fromkeys(owner.tolist())])


def lpips_diversity_replicates(pixels: torch.Tensor, design: Design, lpips_model: torch.nn.Module,
                               value_range: tuple[float, float] = (0.0, 255.0)) -> Replicates:
    """LPIPS diversity (mean over prompts of the mean distance between a prompt's images) as jackknife
    replicates: every pair is measured once, and a leave-out keeps the pairs whose two images it keeps."""
    pairs, owner = within_prompt_pairs(design.prompts.tolist())
    dists = pair_distances(lpips_model, pixels, pairs, value_range)

    def statistic(g: np.ndarray, r: np.ndarray) -> float:
        kept = np.zeros(design.n, dtype=bool)
        kept[g] = True
        keep = kept[pairs[:, 0]] & kept[pairs[:, 1]]
        means = [dists[keep & (owner == p)].mean() for p in dict.fromkeys(owner[keep].tolist())]
        return float(np.mean(means)) if means else float("nan")

    r = replicate(statistic, design)
    r.n = int(len(set(pairs.ravel().tolist())))  # images that are in at least one pair
    return r
