"""Small plotting helpers shared by the comparison and the report scripts."""

from __future__ import annotations


def point_and_interval(ax, xs, means, los, his, color, label=None) -> None:
    """A point per mean and a vertical line from lo to hi.

    Not matplotlib's errorbar: a bootstrap percentile interval of a biased statistic (FID on small
    sets) may lie entirely above the point estimate, and errorbar cannot draw that honestly.
    """
    xs, means, los, his = list(xs), list(means), list(los), list(his)
    ax.vlines(xs, los, his, color=color, linewidth=1.5)
    ax.hlines(los + his, [x - 0.05 for x in xs] * 2, [x + 0.05 for x in xs] * 2, color=color, linewidth=1.5)
    ax.plot(xs, means, "o", color=color, label=label)
