"""Small plotting helpers shared by the comparison and the report scripts."""

from __future__ import annotations

import numpy as np


def point_and_interval(ax, xs, means, los, his, color, label=None) -> None:
    """A point per mean with its 95% interval as an error bar (no bar where there is no interval).

    Every interval contains its estimate (research/metrics/stats.py), so the asymmetric error bar is
    simply the distance from the point to each end.
    """
    means, los, his = (np.asarray(v, dtype=float) for v in (means, los, his))
    below, above = np.nan_to_num(means - los), np.nan_to_num(his - means)
    if (below < 0).any() or (above < 0).any():
        raise ValueError("An interval does not contain its estimate; metrics.json was not written by this version.")
    ax.errorbar(list(xs), means, yerr=[below, above], fmt="o", color=color, capsize=3, label=label)
