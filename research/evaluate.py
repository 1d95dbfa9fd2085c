"""Evaluate a run: adapter vs base model on the same prompts and seeds, against held-out references.

    python -m research.evaluate --run-dir runs/exp1/<run> --num-images 256 --metrics clip_score,fid,kid

It regenerates ``inference/`` (adapter) and ``inference/baseline/`` with the requested number of
images per arm, recomputes the metrics, rewrites ``metrics.json`` (keeping the training cost) and
logs the numbers to the run's MLflow run. Training calls the same code at its end, so every run's
metrics.json has both arms.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("research")

EVAL_FLAGS = ["num_eval_images", "metrics", "clip_model", "feature_extractor", "inception_weights", "lpips_weights",
              "oracle", "num_inference_steps", "guidance_scale", "sampler", "device"]


def metric_names(cfg) -> list[str]:
    names = [m.strip() for m in cfg.metrics.split(",") if m.strip()]
    return [] if names == ["none"] else names


def evaluate_samples(cfg, samples: dict, references: list, device) -> dict:
    """{"adapter": {...}, "baseline": {...}, "delta": {...}} for the images sample_run produced.

    A missing metric backbone does not throw away a trained adapter: that one error goes into the
    result (and the log) as one sentence with its fix. Any other error is a bug and propagates.
    """
    names = metric_names(cfg)
    if not names:
        return {}
    from research.metrics import MissingWeightsError, compute_metrics

    prompts = [job.prompt for job in samples["jobs"]]
    try:
        return compute_metrics(samples["adapter"], samples["baseline"], prompts, references, metrics=names,
                               seeds=[job.seed for job in samples["jobs"]],
                               clip_model=cfg.clip_model, inception_weights=cfg.inception_weights or None,
                               lpips_weights=cfg.lpips_weights or None, oracle=cfg.oracle or None,
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
    lo, hi = d.get("ci95", [float("nan")] * 2)
    return arrow + ("*" if lo == lo and (lo > 0 or hi < 0) else " ")


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


def _previous_metrics(run_dir: Path) -> dict:
    """The run's metrics.json (its training cost is kept); a damaged one stops before any image is redone."""
    from research.data import DataError

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


def _mlflow_run_for(run_dir: Path):
    import mlflow

    from research.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.run_dir = '{run_dir}'",
                               output_format="list")
    return found[0].info.run_id if found else None


def main(argv: list[str] | None = None) -> int:
    from research.config import ConfigError, TrainConfig, add_config_arguments, apply_overrides
    from research.data import DataError, style_folder_for
    from research.methods import get_method
    from research.models import ModelNotFoundError, load_pipeline, pick_device, pick_precision, weight_dtype
    from research.sample import check_saved_artifacts, sample_run
    from research.tracking import flatten_metrics, setup_logging, write_metrics

    parser = argparse.ArgumentParser(prog="python -m research.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", "--run_dir", required=True, help="run folder with checkpoints/ and config.json")
    add_config_arguments(parser, names=EVAL_FLAGS)
    parser.add_argument("--num-images", dest="num_eval_images", type=int, default=TrainConfig.num_eval_images,
                        help="alias of --num-eval-images: images per arm")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").is_file():
        parser.error(f"{run_dir} is not a run folder (no config.json); pass a folder under runs/.")
    setup_logging(run_dir / "logs.txt")
    try:
        cfg = apply_overrides(TrainConfig.from_json_file(run_dir / "config.json"), args, EVAL_FLAGS)
        data = style_folder_for(cfg)
        old = _previous_metrics(run_dir)  # read before anything is overwritten
        check_saved_artifacts(run_dir / "checkpoints")
        device = pick_device(cfg.device)
        pipe = load_pipeline(cfg.base_model, weight_dtype(pick_precision(cfg.mixed_precision, device))).to(device)
    except (ConfigError, DataError, ModelNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    samples = sample_run(run_dir, cfg, get_method(cfg), prompts=data.validation_prompts, base_pipe=pipe)
    metrics = {"n_images": len(samples["jobs"]), "adapter": {}, "baseline": {}, "delta": {}, "cost": old.get("cost", {})}
    metrics.update(evaluate_samples(cfg, samples, [e.image for e in data.heldout], device))
    write_metrics(run_dir, metrics)
    run_id = _mlflow_run_for(run_dir)
    if run_id:
        import mlflow

        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics(flatten_metrics({k: v for k, v in metrics.items() if k != "cost"}))
            mlflow.log_artifact(str(run_dir / "metrics.json"))
    print(format_table(metrics))
    print(f"\nmetrics: {run_dir / 'metrics.json'}" + (f"  (MLflow run {run_id})" if run_id else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
