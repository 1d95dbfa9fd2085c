"""Evaluation metrics for adapter vs base model: one entry point, `compute_metrics`.

Every metric comes back as {"mean", "ci95", "n"} (plus extras such as "std", "backbone", "unreliable").
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Sequence

import numpy as np
from PIL import Image

from .alignment import clip_score, style_similarity
from .backbones import DEFAULT_CLIP, ClipBundle, MissingWeightsError, load_clip, load_inception, load_lpips
from .distribution import fid, fid_report, inception_score, inception_score_report, kid_report
from .diversity import lpips_diversity
from .features import clip_image_features, clip_text_features, inception_features, pil_to_tensor
from .oracle import class_index, joint_content_probs, oracle_content_accuracy, oracle_style_accuracy
from .stats import summarize

METRICS = ("clip_score", "style_similarity", "fid", "kid", "inception_score", "lpips_diversity",
           "oracle_style_accuracy", "oracle_content_accuracy")
ORACLE_METRICS = ("oracle_style_accuracy", "oracle_content_accuracy")

__all__ = ["METRICS", "compute_metrics", "MissingWeightsError", "load_clip", "load_inception", "load_lpips",
           "clip_score", "style_similarity", "fid", "fid_report", "kid_report", "inception_score",
           "inception_score_report", "lpips_diversity", "oracle_style_accuracy", "oracle_content_accuracy",
           "summarize"]


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


def compute_metrics(adapter_images: Sequence[Image.Image], baseline_images: Sequence[Image.Image] | None,
                    prompts: Sequence[str], references: Sequence[Image.Image], *,
                    metrics: Sequence[str] = METRICS,
                    clip_model: str | ClipBundle = DEFAULT_CLIP,
                    inception_weights: str | None = None,
                    lpips_weights: str | None = None,
                    oracle=None,
                    target_style: str | int | None = None,
                    feature_extractor: str = "inception",
                    device: str = "cpu",
                    seed: int = 0,
                    progress: bool = True,
                    n_boot: int = 1000,
                    set_n_boot: int = 100,
                    timings: dict | None = None) -> dict:
    """Metrics of the adapter's and the base model's images (same prompts and seeds) vs the style references.

    adapter_images/baseline_images: PIL images aligned with `prompts` (baseline may be None: adapter only).
    references: the style's held-out images. feature_extractor: "inception" (clean-fid) or "clip" (the CLIP
    image tower as clean-fid-style custom extractor) for FID/KID. oracle: path of a toy-world oracle (or a
    loaded one); oracle metrics run only when it is given, and IS then uses its class probabilities.
    n_boot: bootstrap draws for per-image metrics; set_n_boot: for FID and IS, recomputed on every draw.
    timings: if a dict is passed, it receives seconds per stage.
    """
    metrics = check_metric_names(metrics)
    if feature_extractor not in ("inception", "clip"):
        raise ValueError(f"feature_extractor must be 'inception' or 'clip', got '{feature_extractor}'.")
    arms = {"adapter": list(adapter_images)}
    if baseline_images is not None:
        arms["baseline"] = list(baseline_images)
    for arm, images in arms.items():
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} {arm} images but {len(prompts)} prompts; give one prompt per image.")
    if oracle is None:
        metrics = tuple(m for m in metrics if m not in ORACLE_METRICS)
    if target_style is None:
        metrics = tuple(m for m in metrics if m != "oracle_style_accuracy")
    needs_refs = {"style_similarity", "fid", "kid"} & set(metrics)
    if needs_refs and len(references) < 2:
        raise ValueError(f"{', '.join(sorted(needs_refs))} need at least 2 held-out reference images, got {len(references)}.")

    # ------------------------------------------------------------------ backbones, all loaded before any work
    distribution = {"fid", "kid"} & set(metrics)
    use_clip = bool({"clip_score", "style_similarity"} & set(metrics)) or (distribution and feature_extractor == "clip")
    is_from_inception = "inception_score" in metrics and oracle is None
    use_inception = (distribution and feature_extractor == "inception") or is_from_inception
    with _timed(timings, "load"):
        clip = (clip_model if isinstance(clip_model, ClipBundle) else load_clip(clip_model, device)) if use_clip else None
        inception = load_inception(inception_weights, device) if use_inception else None
        lpips_model, lpips_label = load_lpips(lpips_weights, device, seed) if "lpips_diversity" in metrics else (None, None)
        if isinstance(oracle, (str, bytes)) or hasattr(oracle, "__fspath__"):
            from research.toyworld.oracle import Oracle  # toy-world only; imported when asked for
            oracle = Oracle.from_pretrained(oracle).to(device)
        labels = getattr(oracle, "labels", None)  # the oracle's class names per head
        if "oracle_style_accuracy" in metrics:
            class_index("style", target_style, labels)  # an unknown style fails now, before any work

    # ------------------------------------------------------------------ features, once per image set
    sets = dict(arms, references=list(references))
    feats: dict[str, dict] = defaultdict(dict)
    for name, images in sets.items():
        if name == "references" and not needs_refs:
            continue
        if clip is not None:
            with _timed(timings, "features:clip"):
                feats[name]["clip"] = clip_image_features(clip, images, progress, f"CLIP features ({name})")
        if inception is not None and (distribution or name != "references"):
            with _timed(timings, "features:inception"):
                feats[name]["inception"], feats[name]["inception_probs"] = inception_features(
                    inception, images, with_probs=is_from_inception and name != "references",
                    progress=progress, desc=f"Inception features ({name})")
        if oracle is not None and name != "references":
            with _timed(timings, "features:oracle"):
                feats[name]["oracle"] = {h: np.asarray(p.detach().cpu() if hasattr(p, "detach") else p)
                                         for h, p in oracle.predict_proba(images).items()}
    if "clip_score" in metrics:
        with _timed(timings, "features:clip_text"):
            text = clip_text_features(clip, prompts)
    dist_key = "clip" if feature_extractor == "clip" else "inception"
    dist_label = (f"clip:{clip.name}" if clip is not None else "clip") if feature_extractor == "clip" else "inception-clean"

    # ------------------------------------------------------------------ metrics per arm
    results = {}
    for arm, images in arms.items():
        f, out = feats[arm], {}
        for m in metrics:
            with _timed(timings, m):
                if m == "clip_score":
                    out[m] = dict(summarize(clip_score(f["clip"], text), n_boot, seed), backbone=clip.name)
                elif m == "style_similarity":
                    out[m] = dict(summarize(style_similarity(f["clip"], feats["references"]["clip"]), n_boot, seed),
                                  backbone=clip.name)
                elif m == "fid":
                    out[m] = dict(fid_report(f[dist_key], feats["references"][dist_key], set_n_boot, seed), backbone=dist_label)
                elif m == "kid":
                    out[m] = dict(kid_report(f[dist_key], feats["references"][dist_key], seed=seed), backbone=dist_label)
                elif m == "inception_score":
                    out[m] = _inception_score(f, set_n_boot, seed)
                elif m == "lpips_diversity":
                    out[m] = _lpips_diversity(images, prompts, lpips_model, lpips_label, n_boot, seed)
                elif m == "oracle_style_accuracy":
                    out[m] = dict(summarize(oracle_style_accuracy(f["oracle"], target_style, labels),
                                            n_boot, seed), backbone="oracle")
                elif m == "oracle_content_accuracy":
                    out[m] = _oracle_content(f["oracle"], prompts, labels, n_boot, seed)
        results[arm] = out
    return results


def _inception_score(f: dict, n_boot: int, seed: int) -> dict:
    if "oracle" in f:
        # no Inception in the toy world: IS over the oracle's content classes (shape × colour), per head as extras
        out = dict(inception_score_report(joint_content_probs(f["oracle"]), n_boot, seed), backbone="oracle:shape×colour")
        out["per_head"] = {h: inception_score(p)[0] for h, p in f["oracle"].items()}
        return out
    return dict(inception_score_report(f["inception_probs"], n_boot, seed), backbone="inception")


def _lpips_diversity(images, prompts, lpips_model, label, n_boot, seed) -> dict:
    pixels = pil_to_tensor(images)
    by_prompt = defaultdict(list)
    for p, x in zip(prompts, pixels):
        by_prompt[p].append(x)
    values = lpips_diversity({p: xs for p, xs in by_prompt.items()}, lpips_model, value_range=(0, 255))
    if values.size == 0:  # every prompt has a single image: no pair to compare
        return {"mean": float("nan"), "ci95": [float("nan")] * 2, "n": 0, "unreliable": True, "backbone": label}
    return dict(summarize(values, n_boot, seed), backbone=label, n_images=sum(len(v) for v in by_prompt.values() if len(v) > 1))


def _oracle_content(probs, prompts, class_names, n_boot, seed) -> dict:
    from research.toyworld.scenes import parse_caption  # toy-world grammar: prompt → Scene(shape, colour, background)

    values = oracle_content_accuracy(probs, [parse_caption(p) for p in prompts], class_names)
    if values.size == 0:
        return {"mean": float("nan"), "ci95": [float("nan")] * 2, "n": 0, "unreliable": True, "backbone": "oracle"}
    return dict(summarize(values, n_boot, seed), backbone="oracle")
