"""Small plotting helpers shared by the comparison and the report scripts: one palette, one set of
axis labels, one way to draw an interval.

Colours: every method keeps one colour in every figure (METHOD_COLORS); styles get theirs from
``style_colors`` over the sorted style names a figure set shows, so a report that passes the same
names to every figure colours pastel the same in the grid, the deltas and the blend curves.
"""

from __future__ import annotations

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
    """A point per mean and a vertical line from lo to hi.

    Not matplotlib's errorbar: a bootstrap percentile interval of a biased statistic (FID on small
    sets) may lie entirely above the point estimate, and errorbar cannot draw that honestly.
    """
    xs, means, los, his = list(xs), list(means), list(los), list(his)
    ax.vlines(xs, los, his, color=color, linewidth=1.5)
    ax.hlines(los + his, [x - 0.05 for x in xs] * 2, [x + 0.05 for x in xs] * 2, color=color, linewidth=1.5)
    ax.plot(xs, means, "o", color=color, label=label)
