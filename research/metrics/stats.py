"""Intervals for small, structured image sets, and the paired difference adapter − baseline.

An evaluation is prompts × seeds: image (prompt p, seed s) of the adapter and of the base model start
from the same noise, and every prompt uses the same seeds. Images of one prompt are not independent,
nor are images of one seed across prompts (same starting noise, same layout), and the set metrics
(FID, KID, IS) are not means of per-image values at all. Resampling single images with replacement
(the old percentile bootstrap) ignores the first two and, for FID and IS, shifts the small-sample
bias so much that the interval can miss its own estimate.

So every metric here is treated as a function of *which* images (and which references) it sees, and
its uncertainty comes from a grouped delete-one jackknife over each source of randomness:

- leave out one prompt (all its seeds)   → the prompt component;
- leave out one seed (across all prompts) → the seed component (the design is crossed);
- leave out one group of references      → the reference component (metrics that use references).

The variance is the sum of the components (for a crossed design this errs slightly on the wide side),
the degrees of freedom come from Welch–Satterthwaite, and the interval is estimate ± t·SE: centred on
the full-set estimate, so it contains it by construction. For a plain mean the prompt component is
exactly the classic cluster standard error. The *paired* difference uses the same leave-outs for both
arms, so what the arms share (prompts, seeds, references) cancels in it.

For FID and IS the estimand is the metric at the evaluated set size (both are biased at small n, and
the bias depends on n); for KID, whose estimator is unbiased, it is the population value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import stats as scipy_stats

CI_LEVEL = 0.95  # two-sided coverage of every reported interval
REFERENCE_GROUPS = 16  # references are left out in this many groups (a jackknife over 16 is as good as over 300)

Statistic = Callable[[np.ndarray, np.ndarray], float]  # (generated image indices, reference indices) -> value


@dataclass(frozen=True)
class Design:
    """Which prompt and seed made each generated image, and how many references there are."""

    prompts: np.ndarray  # [n] prompt label per image (any hashable values)
    seeds: np.ndarray  # [n] seed per image
    n_reference: int = 0

    @classmethod
    def of(cls, prompts: Sequence, seeds: Sequence | None = None, n_reference: int = 0) -> "Design":
        """Without seeds every image counts as its own seed level: only prompts are clusters."""
        prompts = np.asarray(list(prompts), dtype=object)
        seeds = np.arange(len(prompts)) if seeds is None else np.asarray(list(seeds))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} images; give one seed per image.")
        return cls(prompts, seeds, int(n_reference))

    @property
    def n(self) -> int:
        return len(self.prompts)

    def leave_outs(self, uses_references: bool) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        """Per factor, the (generated, reference) index sets with one level of that factor removed."""
        everything, refs = np.arange(self.n), np.arange(self.n_reference)
        out = {}
        for factor, labels in (("prompt", self.prompts), ("seed", self.seeds)):
            levels = list(dict.fromkeys(labels.tolist()))
            # a seed factor with one seed per image would count every image twice (it already is a prompt level)
            if len(levels) >= 2 and (factor == "prompt" or len(levels) < self.n):
                out[factor] = [(everything[labels != level], refs) for level in levels]
        if "prompt" in out and "seed" in out:  # crossed: single images measure the prompt×seed residual
            out["image"] = [(np.delete(everything, i), refs) for i in everything]
        if uses_references and self.n_reference >= 2:
            groups = np.array_split(refs, min(REFERENCE_GROUPS, self.n_reference))
            out["reference"] = [(everything, np.setdiff1d(refs, g)) for g in groups]
        return out


@dataclass
class Replicates:
    """A statistic on the full set and on every leave-one-level-out set of its design."""

    full: float
    leave_out: dict[str, np.ndarray] = field(default_factory=dict)  # factor -> value per left-out level
    n: int = 0
    n_reference: int = 0

    def __sub__(self, other: "Replicates") -> "Replicates":
        """The paired difference: the same leave-outs on both sides."""
        if set(self.leave_out) != set(other.leave_out):
            raise ValueError("Paired arms need the same design (prompts, seeds, references).")
        return Replicates(self.full - other.full, {k: v - other.leave_out[k] for k, v in self.leave_out.items()},
                          self.n, self.n_reference)


def replicate(statistic: Statistic, design: Design, uses_references: bool = False) -> Replicates:
    """Evaluate `statistic` on the full design and with each prompt, seed and reference group left out."""
    everything, refs = np.arange(design.n), np.arange(design.n_reference)
    leave_out = {factor: np.array([statistic(g, r) for g, r in sets], dtype=np.float64)
                 for factor, sets in design.leave_outs(uses_references).items()}
    return Replicates(float(statistic(everything, refs)), leave_out, design.n,
                      design.n_reference if uses_references else 0)


def interval(r: Replicates, bounds: tuple[float, float] = (-np.inf, np.inf)) -> dict:
    """{"mean", "ci95", "n", "se", "df"}: estimate ± t·SE, clipped to the metric's range (still containing it).

    With no factor of two or more levels there is no spread to measure: the interval is NaN and the
    value is marked "unreliable".
    """
    components = {}
    for factor, values in r.leave_out.items():
        values = values[np.isfinite(values)]
        k = len(values)
        if k >= 2:
            components[factor] = ((k - 1) / k * ((values - values.mean()) ** 2).sum(), k - 1)
    out = {"mean": r.full, "n": r.n}
    if r.n_reference:
        out["n_reference"] = r.n_reference
    if not components or not np.isfinite(r.full):
        return {**out, "ci95": [float("nan")] * 2, "unreliable": True}
    _remove_double_counted_residual(components)
    var = sum(v for v, _ in components.values())
    # Welch–Satterthwaite degrees of freedom for a sum of variance components
    denominator = sum(v ** 2 / df for v, df in components.values())
    df = var ** 2 / denominator if denominator > 0 else min(df for _, df in components.values())
    half = float(scipy_stats.t.ppf(0.5 + CI_LEVEL / 2, df) * np.sqrt(var))
    lo, hi = max(r.full - half, bounds[0]), min(r.full + half, bounds[1])
    return {**out, "ci95": [float(min(lo, r.full)), float(max(hi, r.full))], "se": float(np.sqrt(var)),
            "df": float(df), "interval": "jackknife:" + "+".join(components)}


def _remove_double_counted_residual(components: dict[str, tuple[float, int]]) -> None:
    """In a crossed prompts × seeds design the prompt and the seed jackknives both contain the residual
    (prompt×seed) variance; the leave-one-image-out jackknife measures it, so the seed component keeps
    only what exceeds it (never below zero).

    For a mean this is the two-way ANOVA identity Var = (MS_prompt + MS_seed − MS_residual) / n, with
    n·J_prompt = MS_prompt, n·J_seed = MS_seed and (n−1)·n·J_image = SS_prompt + SS_seed + SS_residual.
    Simulated coverage of the result is checked in tests/test_metrics.py.
    """
    image = components.pop("image", None)
    if image is None or "prompt" not in components or "seed" not in components:
        return
    (vp, dfp), (vs, dfs) = components["prompt"], components["seed"]
    residual = (image[1] * image[0] - dfp * vp - dfs * vs) / (dfp * dfs)  # MS_residual / n
    components["seed"] = (max(vs - max(residual, 0.0), 0.0), dfs)


def mean_statistic(values: np.ndarray) -> Statistic:
    """The mean of per-image values over the images a leave-out keeps (NaN = no truth for that image)."""
    values = np.asarray(values, np.float64)
    return lambda g, r: float(np.nanmean(values[g])) if np.isfinite(values[g]).any() else float("nan")


def summarize(values, prompts: Sequence | None = None, seeds: Sequence | None = None,
              bounds: tuple[float, float] = (-np.inf, np.inf)) -> dict:
    """Mean of per-image values with its 95% interval; images of one prompt (and one seed) are clusters.

    Without prompts every value is its own cluster: the classic t-interval of a mean.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("summarize() needs at least one value.")
    design = Design.of(range(v.size) if prompts is None else prompts, seeds)
    return interval(replicate(mean_statistic(v), design), bounds)
