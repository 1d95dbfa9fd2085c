"""Evaluation of a run: adapter vs base model on the same prompts and seeds, against held-out references.

A block above metrics, sampling and tracking: it turns a config's metric flags into a
``compute_metrics`` call (loading the toy world's oracle when ``--oracle`` names one, so that the
metrics never import the toy world), formats the results table, and re-evaluates a finished run
folder (re-sample both arms, recompute, rewrite ``metrics.json`` keeping the training cost, log to
the run's MLflow run). The method is passed in, never imported. The CLI is research/evaluate.py;
the one-run recipe (research/experiments/one_run.py) calls ``evaluate_samples`` at the end of training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from research.data import StyleFolder
from research.errors import DataError, MissingWeightsError
from research.models import load_pipeline, pick_device, pick_precision, weight_dtype
from research.sampling import check_saved_artifacts, sample_run
from research.toyworld.oracle import Oracle
from research.tracking import flatten_metrics, log_to_finished_run, write_metrics

log = logging.getLogger("research")


def evaluate_samples(cfg, samples: dict, references: list, device) -> dict:
    """{"adapter": {...}, "baseline": {...}, "delta": {...}} for the images sample_run produced.

    A missing metric backbone does not throw away a trained adapter: that one error goes into the
    result (and the log) as one sentence with its fix. Any other error is a bug and propagates.
    """
    names = cfg.metric_names()
    if not names:
        return {}
    # deferred on purpose: the metrics pull in clean-fid and torchvision (seconds of import time), which a
    # run with --metrics none, and every command refused before it starts, never needs
    # deferred: clean-fid and torchvision load only when a run asks for metrics
    from research.metrics import compute_metrics

    prompts = [job.prompt for job in samples["jobs"]]
    try:
        return compute_metrics(samples["adapter"], samples["baseline"], prompts, references, metrics=names,
                               seeds=[job.seed for job in samples["jobs"]],
                               clip_model=cfg.clip_model, inception_weights=cfg.inception_weights or None,
                               lpips_weights=cfg.lpips_weights or None, oracle=load_oracle(cfg.oracle, device),
                               target_style=cfg.resolved_style_name(), feature_extractor=cfg.feature_extractor,
                               device=str(device), seed=cfg.seed)
    except MissingWeightsError as err:
        log.error("evaluation skipped: %s", err)
        return {"evaluation_error": str(err)}


HEADLINE_ORDER = ("kid", "fid")  # KID is unbiased at any n: it leads; FID follows, read with its bias in mind


def _cell(v: dict | None, signed: bool = False) -> str:
    if not v or v.get("mean") is None:
        return "-"
    lo, hi = v.get("ci95", [None, None])
    fmt = "+.3f" if signed else ".3f"
    ci = f" [{lo:{fmt}},{hi:{fmt}}]" if lo is not None and lo == lo else " [no interval]"
    return f"{v['mean']:{fmt}}{ci}"


def _verdict(d: dict) -> str:
    """↑/↓: which direction is better; * when the paired interval excludes zero."""
    arrow = "↑" if d.get("better") == "higher" else "↓"
    lo, hi = d.get("ci95") or [None, None]  # NaN bounds reach here as None once made JSON-safe
    return arrow + ("*" if lo is not None and lo == lo and (lo > 0 or hi < 0) else " ")


def format_table(metrics: dict) -> str:
    """Baseline, adapter and the paired difference adapter − baseline, each with its 95% interval."""
    adapter, baseline, delta = (metrics.get(k, {}) for k in ("adapter", "baseline", "delta"))
    names = sorted(adapter, key=lambda m: (m not in HEADLINE_ORDER, HEADLINE_ORDER.index(m) if m in HEADLINE_ORDER else 0))
    rows = [f"{'metric':<24}{'baseline':>28}{'adapter':>28}{'adapter - baseline':>30}{'n':>5}"]
    for name in names:
        d = delta.get(name)
        verdict = _verdict(d) if d else "  "
        rows.append(f"{name:<24}{_cell(baseline.get(name)):>28}{_cell(adapter[name]):>28}"
                    f"{_cell(d, signed=True):>28} {verdict}{adapter[name].get('n', ''):>5}")
    if delta:
        rows.append("intervals: 95%, jackknife over prompts, seeds and references; ↑/↓ better direction; "
                    "* the paired interval excludes 0")
    cost = metrics.get("cost", {})
    if cost:
        rows.append(f"cost: {cost.get('train_seconds', 0):.1f} s training, {cost.get('steps_per_second', 0):.2f} steps/s, "
                    f"{cost.get('trainable_params', 0):,} trainable params, {cost.get('artifact_bytes', 0) / 1e6:.2f} MB")
    if "evaluation_error" in metrics:
        rows.append(f"evaluation skipped: {metrics['evaluation_error']}")
    return "\n".join(rows)


def score_run(run_dir: Path, cfg, samples: dict, references: list, device, cost: dict) -> dict:
    """The run's metrics.json for the images sample_run produced: both arms scored against the references,
    with the training cost beside them; written, and returned."""
    metrics = {"n_images": len(samples["jobs"]), "adapter": {}, "baseline": {}, "delta": {}, "cost": cost}
    metrics.update(evaluate_samples(cfg, samples, references, device))
    write_metrics(run_dir, metrics)
    return metrics


def load_oracle(folder: str, device) -> Oracle | None:
    """The style/content oracle --oracle names (a toy-world oracle folder), on `device`; None for "" (no oracle)."""
    return Oracle.from_pretrained(folder).to(str(device)) if folder else None


def previous_metrics(run_dir: Path) -> dict:
    """The run's metrics.json (its training cost is kept); a damaged one stops before any image is redone."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{path} is damaged; move it aside (its training cost is then lost) and run again.") from None
    if not isinstance(old, dict):
        raise DataError(f"{path} does not hold a JSON object; move it aside and run again.")
    return old


def reevaluate_run(run_dir: Path, cfg, method, data: StyleFolder) -> tuple[dict, str | None]:
    """Sample both arms of a finished run again, recompute its metrics, rewrite metrics.json (keeping the
    training cost) and log them to the run's MLflow run. Every input is checked before anything is
    overwritten. Returns the metrics and the MLflow run id (None when the run was not tracked)."""
    old = previous_metrics(run_dir)  # read before anything is overwritten
    check_saved_artifacts(run_dir / "checkpoints")
    device = pick_device(cfg.device)
    pipe = load_pipeline(cfg.base_model, weight_dtype(pick_precision(cfg.mixed_precision, device))).to(device)
    samples = sample_run(run_dir, cfg, method, prompts=data.validation_prompts, base_pipe=pipe)
    metrics = score_run(run_dir, cfg, samples, [e.image for e in data.heldout], device, old.get("cost", {}))
    run_id = log_to_finished_run(run_dir, flatten_metrics({k: v for k, v in metrics.items() if k != "cost"}),
                                 run_dir / "metrics.json")
    return metrics, run_id
