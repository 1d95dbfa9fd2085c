"""Per-image CLIP metrics: prompt fidelity (CLIP score) and closeness to the style's reference set."""
from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_score(image_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
    """100 · max(cos(image_i, prompt_i), 0) per image (Hessel et al.'s CLIPScore with w = 100)."""
    cos = (_unit(image_feats) * _unit(text_feats)).sum(-1)
    return 100.0 * np.maximum(cos, 0.0)


def cosine_similarities(image_feats: np.ndarray, reference_feats: np.ndarray) -> np.ndarray:
    """[images, references] cosine similarities."""
    return _unit(image_feats) @ _unit(reference_feats).T


def style_similarity(image_feats: np.ndarray, reference_feats: np.ndarray) -> np.ndarray:
    """Per image, the mean cosine similarity to every image of the style's reference set."""
    return cosine_similarities(image_feats, reference_feats).mean(-1)
