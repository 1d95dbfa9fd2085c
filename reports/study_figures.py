"""The report's figures that are not specific to one experiment: image grids, paired differences
with their intervals, and cost bars. Every figure gets a title, axis labels with units, and the
colours of research/figures.py."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from research.atomic import save_figure  # noqa: E402
from research.figures import BASE_COLOR, COST_LABELS, metric_label, point_and_interval  # noqa: E402


def theme() -> None:
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)


def image_grid(cells: list[list], row_labels: list[str], col_labels: list[str], col_colors: list[str],
               title: str, out: Path) -> Path:
    """Rows of images (PIL or None) with a coloured title per column and a wrapped label per row."""
    theme()
    rows, cols = len(cells), len(col_labels)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols + 2.2, 1.7 * rows + 0.8), squeeze=False)
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if image is not None:
                ax.imshow(image)
            for spine in ax.spines.values():
                spine.set_edgecolor(col_colors[c])
                spine.set_linewidth(2)
            if r == 0:
                ax.set_title(col_labels[c], color=col_colors[c], fontsize=9, fontweight="bold")
            if c == 0:
                ax.set_ylabel("\n".join(textwrap.wrap(row_labels[r], 26)[:3]), rotation=0, ha="right",
                              va="center", fontsize=7.5)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def delta_panels(rows: list[dict], groups: list[str], colors: dict[str, str], title: str, out: Path,
                 group_label: str) -> Path:
    """One panel per metric: each group's paired difference adapter − base model with its 95% interval."""
    theme()
    metrics = sorted({r["metric"] for r in rows})
    cols = min(4, len(metrics))
    n_rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(max(3.6 * cols, 7.5), 3.1 * n_rows + 0.4), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        ax.axhline(0, color=BASE_COLOR, lw=1, ls="--")
        for x, group in enumerate(groups):
            r = next((r for r in rows if r["metric"] == metric and r["group"] == group), None)
            if r is not None:
                point_and_interval(ax, [x], [r["mean"]], [r["lo"]], [r["hi"]], colors[group])
        ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_xlabel(group_label)
        ax.set_ylabel(f"Δ {metric_label(metric)}", fontsize=8)
        ax.set_title(metric.replace("_", " "), fontsize=10)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"{title}\npaired difference adapter − base model (same prompts and seeds), 95% intervals",
                 fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def cost_bars(costs: dict[str, dict[str, float]], colors: dict[str, str], title: str, out: Path) -> Path:
    """One bar panel per cost (time, memory, parameters, file size); one bar per method."""
    theme()
    keys = [k for k in COST_LABELS if any(k in c for c in costs.values())]
    names = list(costs)
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.4 * max(len(keys), 1), 3.2), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        label, scale = COST_LABELS[key]
        values = [costs[m].get(key, float("nan")) * scale for m in names]
        sns.barplot(x=names, y=values, hue=names, palette=colors, legend=False, ax=ax)
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > 100:  # sizes orders of magnitude apart
            ax.set_yscale("log")
            label += ", log scale"
        ax.set_ylabel(label, fontsize=8)
        ax.set_xlabel("method")
        ax.set_title(label.split(" (")[0], fontsize=10)
        ax.tick_params(axis="x", rotation=20, labelsize=8)
    fig.suptitle(f"{title}: cost of one training run per method (n = 1 each)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def titled_image(image_path: Path, title: str, xlabel: str, out: Path) -> Path:
    """An image another run drew (a blend grid, a styles grid) redrawn with a title and an axis label,
    at a size where its cells are visible."""
    theme()
    image = plt.imread(str(image_path))
    height, width = image.shape[:2]
    scale = max(1.0, 700 / width)  # small toy grids are enlarged to a readable width
    fig, ax = plt.subplots(figsize=(width * scale / 100 + 0.6, height * scale / 100 + 1.0))
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)
