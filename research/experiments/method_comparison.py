"""Experiment III: LoRA vs Textual Inversion vs DreamBooth under identical conditions.

Every method trains on the same images and split, for the same max_train_steps with the same batch
size, seeds, prompts, sampler and evaluation images: each is the one-run recipe (research.experiments.one_run.run)
with only the method and its learning rate changed. Each method is its own MLflow run, tagged
comparison=<id>; the comparison folder runs/exp3/<timestamp>_compare/ gets comparison.json (quality
from each run's metrics.json + cost) and comparison.png.

Learning rates: LoRA and DreamBooth keep the SD 1.5 recipe's rate (RECIPE_LEARNING_RATES) scaled by
the config's learning rate / 1e-4; Textual Inversion keeps the recipe's 5e-3 as it is (SCALE_FREE);
a pinned method=value overrides one. Each method runs in a fresh
process by default (`run_in_fresh_process`: fair timings, its own peak memory, crash isolation), or
one after another in this process (`run_in_this_process`). research/compare.py is its command line.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from research.atomic import save_figure, write_json
from research.config import RECIPE_LEARNING_RATES, ConfigError, TrainConfig
from research.figures import method_color, point_and_interval
from research.tracking import copy_run, mlflow_run_for_dir, new_run_dir, read_record, setup_logging, tracking_uri
from research.experiments.one_run import run

log = logging.getLogger("research")

REFERENCE_LR = RECIPE_LEARNING_RATES["lora"]
COST_KEYS = ["train_seconds", "steps_per_second", "peak_memory_mb", "trainable_params", "artifact_bytes"]
# config keys that name a run rather than decide what it learns or how it is scored: a finished run whose
# config.json differs from a method's arm only in these is that arm (Exp I's LoRA of a style at the study
# config gave Exp III's LoRA arm bit-identical metrics), so --reuse can stand it in instead of training again
NAMING_KEYS = frozenset({"experiment", "run_name", "run_dir", "output_dir", "resume_from_checkpoint"})
BUDGET_KEYS = ["max_train_steps", "train_batch_size", "gradient_accumulation_steps", "seed", "resolution",
               "num_eval_images", "sampler", "num_inference_steps", "guidance_scale", "holdout_fraction"]


# Methods whose recipe rate does not follow the config's. Textual Inversion trains rows of the text
# encoder's token table, whose scale the base model sets (the toy table's rows have norm 0.21 on average,
# 0.32 at most), not the LoRA rate a config tuned for its UNet. Scaled with the toy config's 20× (to 0.1),
# TI's four vectors grew to norm 10–12 and content fell 28 points; at 5e-3 they reach 1.8–4.3.
SCALE_FREE = frozenset({"textual_inversion"})


def learning_rates(cfg: TrainConfig, methods: list[str], pinned: str) -> dict[str, float]:
    # each method's recipe ratio to LoRA's rate, times the config's (LoRA's own rate is the config's to the
    # bit); a SCALE_FREE method keeps its recipe rate
    rates = {m: RECIPE_LEARNING_RATES[m] if m in SCALE_FREE else cfg.learning_rate * (RECIPE_LEARNING_RATES[m] / REFERENCE_LR)
             for m in methods}
    for item in filter(None, (p.strip() for p in pinned.split(","))):
        name, _, value = item.partition("=")
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--learning-rates takes method=value pairs (e.g. dreambooth=5e-6), got {item!r}.") from None
        if name.strip() not in methods:
            raise ConfigError(f"--learning-rates names {name.strip()!r}, which is not in --methods {','.join(methods)}.")
    return rates


def method_config(cfg: TrainConfig, method: str, lr: float) -> TrainConfig:
    """The shared config with only the method and its learning rate changed (plus its own run folder)."""
    values = dict(cfg.to_dict(), method=method, learning_rate=lr, run_dir="", resume_from_checkpoint="",
                  run_name=f"{cfg.resolved_style_name()}_{method}")
    return TrainConfig.from_dict(values, source="comparison")


def _run_child(cfg_values: dict, track: bool, tags: dict) -> str:
    return str(run(TrainConfig.from_dict(cfg_values), track=track, tags=tags))


def run_in_this_process(cfg: TrainConfig, track: bool, tags: dict) -> Path:
    try:
        return run(cfg, track=track, tags=tags)
    finally:  # hand the previous method's memory back before the next one starts
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_in_fresh_process(cfg: TrainConfig, track: bool, tags: dict) -> Path:
    # spawn, not fork: a forked child would inherit torch's thread pools and any CUDA state
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return Path(pool.submit(_run_child, cfg.to_dict(), track, tags).result())


def summarise(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    return {"status": "finished", "run_dir": str(run_dir), "learning_rate": cfg["learning_rate"],
            "budget": {k: cfg[k] for k in BUDGET_KEYS},
            "quality": {arm: metrics.get(arm, {}) for arm in ("adapter", "baseline")},
            "cost": {k: metrics["cost"].get(k) for k in COST_KEYS}}


def reuse_mismatch(run_dir: Path, run_cfg: TrainConfig) -> str:
    """Why run_dir cannot stand in for the arm run_cfg describes; "" when it can (finished, scored, same recipe)."""
    if not (run_dir / "config.json").is_file() or not (run_dir / "metrics.json").is_file():
        return "it has no config.json or metrics.json"
    status = read_record(run_dir).get("status")
    if status != "FINISHED":
        return f"its run.json says {status or 'nothing'}, not FINISHED"
    saved, wanted = json.loads((run_dir / "config.json").read_text()), run_cfg.to_dict()
    differ = sorted(k for k in saved.keys() | wanted.keys() if k not in NAMING_KEYS and saved.get(k) != wanted.get(k))
    return f"its {', '.join(differ[:4])} differ{'s' if len(differ) == 1 else ''} from this comparison's" if differ else ""


def stand_in(run_dir: Path, run_cfg: TrainConfig, comparison_id: str, track: bool) -> dict:
    """The arm's summary from the finished run_dir; tracked, a copy of its MLflow run joins this comparison."""
    summary = {**summarise(run_dir), "reused": True}
    if track:
        source = mlflow_run_for_dir(run_dir)
        if source is None:
            raise ConfigError(f"{run_dir} has no MLflow run in {tracking_uri()}; drop --reuse for it or pass "
                              "--no-tracking.")
        copy_run(source, run_cfg.experiment, run_cfg.run_name, {"comparison": comparison_id, "run_folder": str(run_dir)})
    return summary


def compare(cfg: TrainConfig, methods: list[str], rates: dict[str, float], track: bool = True,
            runner: Callable[[TrainConfig, bool, dict], Path] = run_in_fresh_process,
            reuse: dict[str, Path] | None = None) -> Path:
    """Train (or, for a method in `reuse` whose run has this exact recipe, take over) each method's arm."""
    folder = new_run_dir(cfg.output_dir, cfg.experiment, "compare")  # creates it
    setup_logging(folder / "logs.txt")
    comparison_id = folder.name
    result = {"comparison": comparison_id, "experiment": cfg.experiment, "style_dir": cfg.style_dir,
              "base_model": cfg.base_model, "budget": {k: getattr(cfg, k) for k in BUDGET_KEYS}, "methods": {}}
    for method in methods:
        run_cfg = method_config(cfg, method, rates[method])
        if method in (reuse or {}):
            why = reuse_mismatch(Path(reuse[method]), run_cfg)
            if not why:
                log.info("comparison %s: %s is the finished run %s (same recipe), not trained again",
                         comparison_id, method, reuse[method])
                result["methods"][method] = stand_in(Path(reuse[method]), run_cfg, comparison_id, track)
                write_json(folder / "comparison.json", result)
                continue
            log.warning("comparison %s: %s cannot reuse %s (%s); training it", comparison_id, method, reuse[method], why)
        log.info("comparison %s: training %s (learning rate %g)", comparison_id, method, rates[method])
        try:
            run_dir = runner(run_cfg, track, {"comparison": comparison_id})
            result["methods"][method] = summarise(run_dir)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # a failed method is reported and the others still run
            text = str(err).strip().splitlines()[0] if str(err).strip() else ""
            log.error("comparison %s: %s failed: %s: %s", comparison_id, method, type(err).__name__, text)
            result["methods"][method] = {"status": "failed", "learning_rate": rates[method],
                                         "error": f"{type(err).__name__}: {text}"}
        write_json(folder / "comparison.json", result)  # after every method, so a killed comparison keeps its part
    draw(result, folder / "comparison.png")
    if track:
        _attach_to_runs(folder, comparison_id, cfg.experiment)
    return folder


def _attach_to_runs(folder: Path, comparison_id: str, experiment: str) -> None:
    """Every run of the comparison also carries the comparison's table and figure (a few kB)."""
    import mlflow  # deferred: its import takes seconds, and only a tracked comparison needs it

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    for tracked in mlflow.search_runs(experiment_names=[experiment], output_format="list",
                                      filter_string=f"tags.comparison = '{comparison_id}'"):
        for name in ("comparison.json", "comparison.png"):
            client.log_artifact(tracked.info.run_id, str(folder / name), artifact_path="comparison")


# ─── figure and table ────────────────────────────────────────────────────────────────────────
def draw(result: dict, out: Path) -> Path:
    import matplotlib  # deferred: plotting libraries load slowly and only the end of a comparison draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plotting libraries load only when a figure is drawn
    import seaborn as sns

    done = {m: r for m, r in result["methods"].items() if r["status"] == "finished"}
    failed = [m for m, r in result["methods"].items() if r["status"] != "finished"]
    quality = sorted({k for r in done.values() for k, v in r["quality"]["adapter"].items() if v.get("mean") is not None})
    panels = [("quality", q) for q in quality] + [("cost", c) for c in COST_KEYS]
    sns.set_theme(style="whitegrid", context="notebook")
    cols = min(5, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    names = list(done)
    colors = {m: method_color(m) for m in names}  # the colours every report figure gives these methods
    for ax, (kind, key) in zip(axes.flat, panels):
        xs = range(len(names))
        if kind == "quality":
            for x, m in zip(xs, names):
                v = done[m]["quality"]["adapter"].get(key) or {}
                if v.get("mean") is None:
                    continue
                lo, hi = v.get("ci95") or [v["mean"], v["mean"]]
                point_and_interval(ax, [x], [v["mean"]], [lo], [hi], colors[m])
            # same seeds, prompts and base model for every method: one baseline, drawn as a band
            base = next((r["quality"]["baseline"].get(key) for r in done.values()
                         if r["quality"]["baseline"].get(key, {}).get("mean") is not None), None)
            if base:
                lo, hi = base.get("ci95") or [base["mean"], base["mean"]]
                ax.axhspan(lo, hi, color="0.85", zorder=0)
                ax.axhline(base["mean"], color="0.5", lw=1, ls="--", label="base model")
                ax.legend(loc="best", fontsize=7)
            ax.set_title(f"{key} (95% CI)")
        else:
            values = [float(done[m]["cost"].get(key) or 0) for m in names]
            sns.barplot(x=names, y=values, hue=names, palette=colors, legend=False, ax=ax)
            positive = [v for v in values if v > 0]
            if positive and max(positive) / min(positive) > 100:  # sizes orders of magnitude apart
                ax.set_yscale("log")
            ax.set_title(key)
        ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.5)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    steps = result["budget"]["max_train_steps"]
    fig.suptitle(f"Experiment III: {result['comparison']}, {steps} steps each"
                 + (f" — failed: {', '.join(failed)}" if failed else ""))
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def format_table(result: dict) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    quality = sorted({k for r in result["methods"].values() if r["status"] == "finished"
                      for k in r["quality"]["adapter"]})
    header = ["method", "status", "lr", "steps", "train s", "steps/s", "peak MB", "trainable", "artifact MB"] + quality
    lines = []
    for m, r in result["methods"].items():
        if r["status"] != "finished":
            lines.append([m, "FAILED", num(r["learning_rate"], ".1e"), "-", r["error"][:60]])
            continue
        c, q = r["cost"], r["quality"]["adapter"]
        lines.append([m, "ok", num(r["learning_rate"], ".1e"), str(r["budget"]["max_train_steps"]),
                      num(c["train_seconds"], ".1f"), num(c["steps_per_second"], ".2f"), num(c["peak_memory_mb"], ".0f"),
                      f"{c['trainable_params']:,}", num(c["artifact_bytes"] / 2**20, ".2f")]
                     + [num((q.get(k) or {}).get("mean"), ".4g") for k in quality])
    widths = [max(len(str(row[i])) for row in [header] + lines if i < len(row)) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in [header] + lines)
