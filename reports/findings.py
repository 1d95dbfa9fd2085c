"""Findings sentences generated from the numbers: which way a difference points and whether its 95%
interval excludes zero. No sentence here is written by hand about a result; each one restates a
number, its interval and its n."""

from __future__ import annotations

import math

from research.figures import metric_label


def fmt(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def interval_text(lo: float, hi: float, n) -> str:
    if isinstance(n, float) and n.is_integer():  # MLflow keeps every metric, a count too, as a float
        n = int(n)
    return f"95% CI {fmt(lo)} to {fmt(hi)}, n = {n if n is not None else '?'}"


def difference(subject: str, metric: str, mean: float, lo: float, hi: float, n, better: str | None = None,
               has_interval: bool = True) -> str:
    """'For pastel, CLIP score rose by 1.2 (95% CI 0.5 to 2, n = 16); the interval excludes zero.'

    A zero-width interval is an interval (every paired image gave the same value, e.g. style accuracy
    0 → 1 on all 64); only has_interval=False, or a missing bound, means none was logged."""
    if not math.isfinite(mean):
        return f"For {subject}, {metric_label(metric)} has no estimate."
    verb = "rose" if mean > 0 else "fell" if mean < 0 else "did not change"
    text = f"For {subject}, {metric_label(metric)} {verb} by {fmt(abs(mean))} ({interval_text(lo, hi, n)})"
    if not has_interval or lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return text + "; no interval was logged, so its sign is not established."
    if lo > 0 or hi < 0:
        judged = ""
        if better in ("higher", "lower"):
            good = (mean > 0) == (better == "higher")
            judged = f", a {'better' if good else 'worse'} value ({better} is better)"
        return text + f"; the interval excludes zero{judged}."
    return text + "; the interval includes zero, so the data do not establish a difference."


def change_over_t(curve: str, start: dict, end: dict, n) -> str:
    """How a blend curve moves from its first t to its last, and whether the two end intervals overlap."""
    if start["mean"] == end["mean"]:
        way = "stays at"
    else:
        way = "rises" if end["mean"] > start["mean"] else "falls"
    apart = start["hi"] < end["lo"] or end["hi"] < start["lo"]
    return (f"{curve} {way} from {fmt(start['mean'])} (95% CI {fmt(start['lo'])} to {fmt(start['hi'])}) "
            f"at t = {start['t']:g} to {fmt(end['mean'])} (95% CI {fmt(end['lo'])} to {fmt(end['hi'])}) "
            f"at t = {end['t']:g}, n = {n} images per t; "
            + ("the end intervals do not overlap." if apart else "the end intervals overlap, so the change is not established."))


def ranking(what: str, values: dict[str, float], unit: str, lower_first: bool = True) -> str:
    """'training time (s): textual_inversion 10, lora 12, dreambooth 30 (one run each, no interval).'"""
    order = sorted(values, key=lambda k: values[k], reverse=not lower_first)
    listed = ", ".join(f"{k} {fmt(values[k])}" for k in order)
    return f"{what}{f' ({unit})' if unit else ''}: {listed} (one measured run each, n = 1, no interval)."
