"""Experiment IV's scores: every blend weight's images measured against style A and against style B.

Backbones load once and every image set's features are extracted once; metrics measured against one
style (its held-out images or its oracle class) are scored against each side (suffix _a, _b), the
rest once. Called by style_blend after sampling.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from PIL import Image

from research.config import TrainConfig
from research.data import DataError, load_style_folder
from research.evaluation import load_oracle
from research.experiments.blend_math import Adapter, t_label
from research.metrics import (MissingWeightsError, image_features, load_backbones, metric_interval,
                              metric_replicates)
from research.metrics.features import clip_text_features
from research.metrics.oracle import class_index
from research.metrics.stats import Design, summarize
from research.models import pick_device

log = logging.getLogger("research")

# Metrics measured against one style (its held-out images or its oracle class): computed once per side.
PER_STYLE = ("style_similarity", "fid", "kid", "oracle_style_accuracy")


@dataclass
class _Side:
    style: str
    style_index: int | None  # the style's oracle class, None without an oracle or when it has no such class
    references: dict | None  # reference features
    design: Design | None  # the evaluation design with this side's reference count; None without references


def _references(x: Adapter) -> list[Image.Image] | None:
    """The style's held-out images, split exactly as its training run split them."""
    c = x.cfg
    try:
        data = load_style_folder(c.style_dir, style_name=c.style_name, resolution=c.resolution,
                                 caption_template=c.caption_template, trigger_word=c.trigger_word,
                                 holdout_fraction=c.holdout_fraction, seed=c.seed)
    except DataError as err:
        log.warning("no references for adapter %s (%s); its reference metrics are skipped", x.label, err)
        return None
    if len(data.heldout) < 2:
        log.warning("adapter %s has %d held-out image(s); its reference metrics need 2 and are skipped",
                    x.label, len(data.heldout))
        return None
    return [e.image for e in data.heldout]


def _side(bk, x: Adapter, design: Design) -> _Side:
    style, index = x.cfg.resolved_style_name(), None
    if bk.oracle is not None:
        if style in bk.oracle.labels.get("style", []):
            index = class_index("style", style, bk.oracle.labels)
        else:
            log.warning("the oracle has no style %r (adapter %s); its oracle metrics are skipped", style, x.label)
    refs = _references(x)
    if refs is None:
        return _Side(style, index, None, None)
    feats = image_features(bk, refs, f"references {x.label}", references=True, progress=False)
    return _Side(style, index, feats, dataclasses.replace(design, n_reference=len(refs)))


def _score_one_weight(bk, feats: dict, design: Design, text, sides: dict[str, _Side]) -> dict:
    """{"clip_score": {...}, "style_similarity_a": {...}, "oracle_style_prob_b": {...}} of one t."""
    out = {}
    for m in bk.metrics:
        if m not in PER_STYLE:
            r, extras = metric_replicates(bk, m, feats, None, design, text)
            out[m] = {**metric_interval(m, r), **extras}
            continue
        for side, s in sides.items():
            if s.design is not None and (m != "oracle_style_accuracy" or s.style_index is not None):
                r, extras = metric_replicates(bk, m, feats, s.references, s.design, text, s.style)
                out[f"{m}_{side}"] = {**metric_interval(m, r), **extras}
    for side, s in sides.items():
        if "oracle" in feats and s.style_index is not None:
            # the oracle's probability of each style: the "does the mix move smoothly" curve
            out[f"oracle_style_prob_{side}"] = dict(summarize(
                feats["oracle"]["style"][:, s.style_index], design.prompts, design.seeds, (0.0, 1.0)),
                backbone="oracle")
    return out


def evaluate_blend(cfg: TrainConfig, images: dict[float, list[Image.Image]], jobs, a: Adapter, b: Adapter) -> dict:
    """{"t_0.50": {"clip_score": {...}, "style_similarity_a": {...}, "oracle_style_prob_b": {...}}, ...}."""
    names = cfg.metric_names()
    if not names:
        return {}
    device = pick_device(cfg.device)
    try:
        bk = load_backbones(names, clip_model=cfg.clip_model, inception_weights=cfg.inception_weights or None,
                            lpips_weights=cfg.lpips_weights or None, oracle=load_oracle(cfg.oracle, device),
                            feature_extractor=cfg.feature_extractor, device=str(device), seed=cfg.seed)
    except MissingWeightsError as err:
        log.error("evaluation skipped: %s", err)  # the images are kept; the fix is in the message
        return {"evaluation_error": str(err)}
    design = Design.of([j.prompt for j in jobs], [j.seed for j in jobs])
    sides = {side: _side(bk, x, design) for side, x in (("a", a), ("b", b))}
    text = clip_text_features(bk.clip, [j.prompt for j in jobs]) if "clip_score" in bk.metrics else None
    return {t_label(t): _score_one_weight(bk, image_features(bk, imgs, t_label(t), progress=False), design, text, sides)
            for t, imgs in images.items()}
