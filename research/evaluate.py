"""Evaluate a run: adapter vs base model on the same prompts and seeds, against held-out references.

    python -m research.evaluate --run-dir runs/exp1/<run> --num-images 256 --metrics clip_score,fid,kid

Training calls the same code at its end, so every run's metrics.json has both arms.
"""

from __future__ import annotations

import logging

log = logging.getLogger("research")


def metric_names(cfg) -> list[str]:
    names = [m.strip() for m in cfg.metrics.split(",") if m.strip()]
    return [] if names == ["none"] else names


def evaluate_samples(cfg, samples: dict, references: list, device) -> dict:
    """{"adapter": {...}, "baseline": {...}} for the images sample_run produced."""
    names = metric_names(cfg)
    if not names:
        return {}
    from research.metrics import compute_metrics

    prompts = [job.prompt for job in samples["jobs"]]
    return compute_metrics(samples["adapter"], samples["baseline"], prompts, references, metrics=names,
                           clip_model=cfg.clip_model, inception_weights=cfg.inception_weights or None,
                           lpips_weights=cfg.lpips_weights or None, oracle=cfg.oracle or None,
                           target_style=cfg.resolved_style_name(), feature_extractor=cfg.feature_extractor,
                           device=str(device), seed=cfg.seed)
