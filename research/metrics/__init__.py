"""Evaluation metrics for adapter vs base model: one entry point, `compute_metrics`. A building block:
it takes what it needs as arguments (backbone names or folders, an oracle object) and imports no
toy world and nothing else of this package but errors and models' offline check.

Every metric comes back as {"mean", "ci95", "n"} (plus extras such as "backbone", "unreliable") for each
arm, and as the paired difference adapter − baseline; stats.py says how the intervals are made.
The pieces (load_backbones → image_features → metric_replicates) are public for callers that score one
image set against several reference sets (Experiment IV's blends).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Sequence

import numpy as np
from PIL import Image

from .alignment import clip_score, cosine_similarities, style_similarity
from .backbones import DEFAULT_CLIP, ClipBundle, MissingWeightsError, load_clip, load_inception, load_lpips
from .distribution import fid, fid_statistic, inception_score, inception_score_statistic, kid, kid_statistic
from .diversity import lpips_diversity, lpips_diversity_replicates
from .features import clip_image_features, clip_text_features, inception_features, pil_to_tensor
from .oracle import class_index, joint_content_probs, oracle_content_accuracy, oracle_style_accuracy
from .stats import Design, Replicates, interval, mean_statistic, replicate, summarize

METRICS = ("clip_score", "style_similarity", "fid", "kid", "inception_score", "lpips_diversity",
           "oracle_style_accuracy", "oracle_content_accuracy")
ORACLE_METRICS = ("oracle_style_accuracy", "oracle_content_accuracy")
# What oracle_style_accuracy becomes for a look outside the oracle's styles that the oracle has a
# hand-written detector for (the toy world's unseen woodcut): the share of images the detector calls that look.
DETECTOR_METRIC = "detector_style_accuracy"
# which way is better, for the arrow in tables and the findings: FID and KID are distances to the style
BETTER = {DETECTOR_METRIC: "higher", "clip_score": "higher", "style_similarity": "higher", "fid": "lower", "kid": "lower",
          "inception_score": "higher", "lpips_diversity": "higher", "oracle_style_accuracy": "higher",
          "oracle_content_accuracy": "higher"}
UNBOUNDED = (-np.inf, np.inf)
# natural ranges: an interval clipped to them still contains its estimate (KID is unbiased, so it can be < 0)
BOUNDS = {DETECTOR_METRIC: (0.0, 1.0), "clip_score": (0.0, 100.0), "style_similarity": (-1.0, 1.0), "fid": (0.0, np.inf),
          "inception_score": (1.0, np.inf), "lpips_diversity": (0.0, np.inf),
          "oracle_style_accuracy": (0.0, 1.0), "oracle_content_accuracy": (0.0, 1.0)}

__all__ = ["METRICS", "DETECTOR_METRIC", "BETTER", "Backbones", "compute_metrics", "load_backbones", "image_features",
           "metric_replicates", "metric_interval", "MissingWeightsError", "load_clip", "load_inception", "load_lpips", "clip_score",
           "style_similarity", "fid", "kid", "inception_score", "lpips_diversity", "oracle_style_accuracy",
           "oracle_content_accuracy", "Design", "Replicates", "interval", "summarize"]


def check_metric_names(metrics: Sequence[str]) -> tuple[str, ...]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {', '.join(unknown)}; valid names are {', '.join(METRICS)}.")
    return tuple(metrics)


@contextmanager
def _timed(timings: dict | None, name: str):
    start = time.perf_counter()
    yield
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Backbones:
    """The networks the requested metrics need, loaded once (None where no metric needs one)."""

    metrics: tuple[str, ...]
    feature_extractor: str = "inception"  # "inception" (clean-fid) or "clip" (the CLIP image tower) for FID/KID
    clip: ClipBundle | None = None
    inception: object | None = None
    lpips: object | None = None
    lpips_label: str | None = None
    oracle: object | None = None  # knows each image's true style and content (labels, predict_proba, scene_of[, detector])

    @property
    def distribution_key(self) -> str:
        return "clip" if self.feature_extractor == "clip" else "inception"

    @property
    def distribution_label(self) -> str:
        return f"clip:{self.clip.name}" if self.feature_extractor == "clip" else "inception-clean"


def load_backbones(metrics: Sequence[str] = METRICS, *, clip_model: str | ClipBundle = DEFAULT_CLIP,
                   inception_weights: str | None = None, lpips_weights: str | None = None, oracle=None,
                   feature_extractor: str = "inception", device: str = "cpu", seed: int = 0) -> Backbones:
    """Load every backbone the metrics need before any work, so a missing weight fails first.

    oracle: a loaded oracle (the toy world's: ``labels``, ``predict_proba(images)``, ``scene_of(prompt)``, and
    optionally ``detector(style)``: a hand-written judge image -> bool of a look outside its style classes, or
    None), or None, which drops the oracle metrics (there is no truth to check against).
    """
    metrics = check_metric_names(metrics)
    if feature_extractor not in ("inception", "clip"):
        raise ValueError(f"feature_extractor must be 'inception' or 'clip', got '{feature_extractor}'.")
    if oracle is None:
        metrics = tuple(m for m in metrics if m not in ORACLE_METRICS)
    b = Backbones(metrics, feature_extractor)
    distribution = bool({"fid", "kid"} & set(metrics))
    if {"clip_score", "style_similarity"} & set(metrics) or (distribution and feature_extractor == "clip"):
        b.clip = clip_model if isinstance(clip_model, ClipBundle) else load_clip(clip_model, device)
    if (distribution and feature_extractor == "inception") or ("inception_score" in metrics and oracle is None):
        b.inception = load_inception(inception_weights, device)
    if "lpips_diversity" in metrics:
        b.lpips, b.lpips_label = load_lpips(lpips_weights, device, seed)
    b.oracle = oracle
    return b


def image_features(b: Backbones, images: Sequence[Image.Image], name: str, *, references: bool = False,
                   progress: bool = True) -> dict:
    """Every feature the metrics need from one image set, computed once: {"clip", "inception", ...}."""
    feats: dict = {}
    if b.clip is not None:
        feats["clip"] = clip_image_features(b.clip, images, progress, f"CLIP features ({name})")
    if b.inception is not None and (not references or {"fid", "kid"} & set(b.metrics)):
        with_probs = not references and "inception_score" in b.metrics and b.oracle is None
        feats["inception"], feats["inception_probs"] = inception_features(
            b.inception, images, with_probs=with_probs, progress=progress, desc=f"Inception features ({name})")
    if b.oracle is not None and not references:
        feats["oracle"] = {h: np.asarray(p.detach().cpu() if hasattr(p, "detach") else p)
                           for h, p in b.oracle.predict_proba(images).items()}
    if "lpips_diversity" in b.metrics and not references:
        feats["pixels"] = pil_to_tensor(images)
    return feats


def metric_replicates(b: Backbones, name: str, feats: dict, refs: dict | None, design: Design,
                      text: np.ndarray | None = None, target_style=None) -> tuple[Replicates, dict]:
    """One metric of one image set as jackknife replicates (stats.py), plus extras such as its backbone."""
    if name == "clip_score":
        return replicate(mean_statistic(clip_score(feats["clip"], text)), design), {"backbone": b.clip.name}
    if name == "style_similarity":
        sims = cosine_similarities(feats["clip"], refs["clip"])  # [images, references]
        return (replicate(lambda g, r: float(sims[np.ix_(g, r)].mean()), design, uses_references=True),
                {"backbone": b.clip.name})
    if name in ("fid", "kid"):
        f, ref = feats[b.distribution_key], refs[b.distribution_key]
        statistic = (fid_statistic if name == "fid" else kid_statistic)(f, ref)
        extras = {"backbone": b.distribution_label}
        if name == "fid" and min(len(f), len(ref)) < f.shape[1]:
            extras["unreliable"] = True  # rank-deficient covariances: FID is dominated by its small-set bias
        return replicate(statistic, design, uses_references=True), extras
    if name == "inception_score":
        if "oracle" in feats:  # no Inception in the toy world: IS over the oracle's content classes
            return (replicate(inception_score_statistic(joint_content_probs(feats["oracle"])), design),
                    {"backbone": "oracle:shape×colour"})
        return replicate(inception_score_statistic(feats["inception_probs"]), design), {"backbone": "inception"}
    if name == "lpips_diversity":
        return lpips_diversity_replicates(feats["pixels"], design, b.lpips), {"backbone": b.lpips_label}
    if name == "oracle_style_accuracy":
        labels = b.oracle.labels
        return replicate(mean_statistic(oracle_style_accuracy(feats["oracle"], target_style, labels)), design), \
            {"backbone": "oracle"}
    if name == DETECTOR_METRIC:
        return replicate(mean_statistic(feats["detector"]), design), {"backbone": f"detector:{target_style}"}
    if name == "oracle_content_accuracy":
        scenes = [b.oracle.scene_of(p) for p in design.prompts]  # None: a prompt outside the toy grammar
        values = np.full(design.n, np.nan)
        known = [i for i, s in enumerate(scenes) if s is not None]
        values[known] = oracle_content_accuracy(feats["oracle"], scenes, b.oracle.labels)
        return replicate(mean_statistic(values), design), {"backbone": "oracle", "n_scored": len(known)}
    raise ValueError(f"Unknown metric {name!r}.")


def metric_interval(name: str, r: Replicates) -> dict:
    """The metric's value with its 95% interval, clipped to the metric's natural range."""
    return interval(r, BOUNDS.get(name, UNBOUNDED))


def compute_metrics(adapter_images: Sequence[Image.Image], baseline_images: Sequence[Image.Image] | None,
                    prompts: Sequence[str], references: Sequence[Image.Image], *,
                    seeds: Sequence[int] | None = None, metrics: Sequence[str] = METRICS,
                    clip_model: str | ClipBundle = DEFAULT_CLIP, inception_weights: str | None = None,
                    lpips_weights: str | None = None, oracle=None, target_style: str | int | None = None,
                    feature_extractor: str = "inception", device: str = "cpu", seed: int = 0,
                    progress: bool = True, timings: dict | None = None) -> dict:
    """Metrics of the adapter's and the base model's images (same prompts and seeds) vs the style references.

    Returns {"adapter": {metric: summary}, "baseline": {...}, "delta": {...}}: each summary has the
    full-set value ("mean"), its 95% interval, n and the interval's method; "delta" is the paired
    difference adapter − baseline (same leave-outs on both arms) with "better": "higher" | "lower".
    adapter_images/baseline_images: PIL images aligned with `prompts` and `seeds` (baseline may be None:
    adapter only, no delta). seeds: the sampling seed of each image (None: images of one prompt are
    its only clusters). references: the style's held-out images. oracle: see load_backbones.
    timings: receives seconds per stage.
    """
    arms = _arms(adapter_images, baseline_images, prompts)
    with _timed(timings, "load"):
        b = load_backbones(metrics, clip_model=clip_model, inception_weights=inception_weights,
                           lpips_weights=lpips_weights, oracle=oracle, feature_extractor=feature_extractor,
                           device=device, seed=seed)
    names = _names_to_compute(b, target_style, len(references))
    needs_refs = bool(REFERENCE_METRICS & set(names))
    with _timed(timings, "features"):
        feats = {arm: image_features(b, images, arm, progress=progress) for arm, images in arms.items()}
        refs = image_features(b, list(references), "references", references=True, progress=progress) if needs_refs else None
        text = clip_text_features(b.clip, prompts) if "clip_score" in names else None
        if DETECTOR_METRIC in names:
            fires = style_detector(b.oracle, target_style)
            for arm, images in arms.items():
                feats[arm]["detector"] = np.array([fires(image) for image in images], np.float64)
    design = Design.of(prompts, seeds, len(references) if needs_refs else 0)
    results: dict = {arm: {} for arm in arms}
    if "baseline" in arms:
        results["delta"] = {}
    for name in names:
        with _timed(timings, name):
            reps = {arm: metric_replicates(b, name, feats[arm], refs, design, text, target_style) for arm in arms}
        _summarize_metric(results, name, reps)
    return results


REFERENCE_METRICS = {"style_similarity", "fid", "kid"}  # measured against the held-out style images


def _arms(adapter_images, baseline_images, prompts: Sequence[str]) -> dict[str, list]:
    """{"adapter": images[, "baseline": images]}, each with one image per prompt."""
    arms = {"adapter": list(adapter_images)}
    if baseline_images is not None:
        arms["baseline"] = list(baseline_images)
    for arm, images in arms.items():
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} {arm} images but {len(prompts)} prompts; give one prompt per image.")
    return arms


def style_detector(oracle, style):
    """The oracle's hand-written detector (image -> bool) of a look it has no style class for, or None."""
    if oracle is None or style is None or style in oracle.labels.get("style", []):
        return None
    detector = getattr(oracle, "detector", None)  # optional: an oracle need not know any look beyond its classes
    return detector(style) if detector else None


def _names_to_compute(b: Backbones, target_style, n_references: int) -> tuple[str, ...]:
    """The metrics that can be computed here (oracle style accuracy needs a target style, and becomes the
    detector's rate for a look the oracle only has a detector for), checked before any work: enough
    references for those that need them, a style the oracle knows."""
    names = tuple(m for m in b.metrics if m != "oracle_style_accuracy" or target_style is not None)
    if "oracle_style_accuracy" in names and style_detector(b.oracle, target_style) is not None:
        names = tuple(DETECTOR_METRIC if m == "oracle_style_accuracy" else m for m in names)
    needs_refs = REFERENCE_METRICS & set(names)
    if needs_refs and n_references < 2:
        raise ValueError(f"{', '.join(sorted(needs_refs))} need at least 2 held-out reference images, got {n_references}.")
    if "oracle_style_accuracy" in names:
        class_index("style", target_style, b.oracle.labels)  # an unknown style fails now, before any work
    return names


def _summarize_metric(results: dict, name: str, reps: dict[str, tuple[Replicates, dict]]) -> None:
    """Each arm's value and interval, and with a baseline the paired difference adapter − baseline."""
    for arm, (r, extras) in reps.items():
        results[arm][name] = {**metric_interval(name, r), **extras}
    if "baseline" in reps:
        diff = reps["adapter"][0] - reps["baseline"][0]
        lo, hi = BOUNDS.get(name, UNBOUNDED)  # a difference of two values in [lo, hi] lies in [lo - hi, hi - lo]
        results["delta"][name] = {**interval(diff, (lo - hi, hi - lo)), "better": BETTER[name]}
