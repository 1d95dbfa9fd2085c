"""Small plotting helpers shared by the comparison and the report scripts: one palette, one set of
axis labels, one way to draw an interval.

Colours: every method keeps one colour in every figure (METHOD_COLORS); styles get theirs from
``style_colors`` over the sorted style names a figure set shows, so a report that passes the same
names to every figure colours pastel the same in the grid, the deltas and the blend curves.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("research")

BASE_COLOR = "#8c8c8c"  # the base model without an adapter, in every figure
# seaborn "colorblind" picks, one per method; blends are LoRA deltas, so they share LoRA's hue family
METHOD_COLORS = {"lora": "#0173b2", "textual_inversion": "#de8f05", "dreambooth": "#029e73",
                 "lora_blend": "#56b4e9", "base model": BASE_COLOR}
# styles draw from colours no method uses, so a style never looks like a method
STYLE_PALETTE = ["#cc78bc", "#d55e00", "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9", "#000000"]

# what each metric measures, with its unit, for axis labels
METRIC_LABELS = {
    "clip_score": "CLIP score (100 x cosine)",
    "style_similarity": "style similarity (cosine)",
    "fid": "FID (squared feature distance)",
    "kid": "KID (MMD², unbiased)",
    "inception_score": "Inception score (exp KL)",
    "lpips_diversity": "LPIPS diversity (distance)",
    "oracle_style_accuracy": "oracle style accuracy (fraction)",
    "oracle_content_accuracy": "oracle content accuracy (fraction)",
    "oracle_style_prob": "oracle style probability (0-1)",
    "detector_style_accuracy": "hand-written detector's style rate (fraction)",
}
COST_LABELS = {  # MLflow key cost.<k>: (axis label with unit, scale from the logged unit)
    "train_seconds": ("training time (s)", 1.0),
    "peak_memory_mb": ("peak memory (MiB)", 1.0),
    "trainable_params": ("trainable parameters (millions)", 1e-6),
    "artifact_bytes": ("adapter file size (MB)", 1e-6),
}


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name, name.replace("_", " "))


def method_color(method: str) -> str:
    return METHOD_COLORS.get(method, STYLE_PALETTE[-1])


def style_colors(styles) -> dict[str, str]:
    """One colour per style name, assigned in sorted order (the same names give the same colours)."""
    names = sorted(set(styles))
    return {name: STYLE_PALETTE[i % len(STYLE_PALETTE)] for i, name in enumerate(names)}


def point_and_interval(ax, xs, means, los, his, color, label=None) -> None:
    """A point per mean with its 95% interval as an error bar (no bar where there is no interval).

    Every interval this project writes contains its estimate (research/metrics/stats.py). A record from
    an earlier version whose interval does not is drawn as a bare point, with a warning, not a bar that lies.
    """
    means, los, his = (np.asarray(v, dtype=float) for v in (means, los, his))
    below, above = np.nan_to_num(means - los), np.nan_to_num(his - means)
    stale = (below < 0) | (above < 0)
    if stale.any():
        log.warning("%d interval(s) do not contain their estimate (a record from an older version); drawn "
                    "without a bar: re-evaluate those runs with `python -m research.evaluate`", int(stale.sum()))
        below[stale], above[stale] = 0.0, 0.0
    ax.errorbar(list(xs), means, yerr=[below, above], fmt="o", color=color, capsize=3, label=label)
