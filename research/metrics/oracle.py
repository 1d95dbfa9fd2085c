"""Toy-world truth: the oracle classifier says which style and content an image really shows."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

CONTENT_HEADS = ("shape", "colour")  # a content match needs both right; background is scenery


def class_index(head: str, value, class_names: Mapping[str, Sequence[str]] | None) -> int:
    """An oracle class given as an index or by name (looked up in the oracle's class names)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if not class_names or head not in class_names or value not in class_names[head]:
        raise ValueError(f"Oracle head '{head}' has no class named '{value}'; known: {list((class_names or {}).get(head, []))}.")
    return list(class_names[head]).index(value)


def oracle_style_accuracy(probs: Mapping[str, np.ndarray], target_style, class_names=None) -> np.ndarray:
    """Per image 1.0 when the oracle's most likely style is the target style, else 0.0."""
    target = class_index("style", target_style, class_names)
    return (np.asarray(probs["style"]).argmax(-1) == target).astype(np.float64)


def oracle_content_accuracy(probs: Mapping[str, np.ndarray], scenes: Sequence, class_names=None) -> np.ndarray:
    """Per image whose prompt parses to a scene, 1.0 when the oracle sees both its shape and its colour.

    Images whose scene is None (prompt outside the toy grammar) have no truth and are left out.
    """
    keep = [i for i, s in enumerate(scenes) if s is not None]
    right = np.ones(len(keep), dtype=bool)
    for head in CONTENT_HEADS:
        predicted = np.asarray(probs[head]).argmax(-1)[keep]
        truth = np.array([class_index(head, getattr(scenes[i], head), class_names) for i in keep], dtype=int)
        right &= predicted == truth
    return right.astype(np.float64)


def joint_content_probs(probs: Mapping[str, np.ndarray]) -> np.ndarray:
    """p(shape, colour | x) = p(shape | x) · p(colour | x): one class per content combination, for IS."""
    s, c = (np.asarray(probs[h], np.float64) for h in CONTENT_HEADS)
    return (s[:, :, None] * c[:, None, :]).reshape(len(s), -1)
