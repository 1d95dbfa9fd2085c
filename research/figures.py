"""Small plotting helpers shared by the comparison and the report scripts."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("research")


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
