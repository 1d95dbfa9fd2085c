"""Experiment II: search LoRA rank, training steps and learning rate with Optuna.

    python -m research.search --style-dir data/ghibli --n-trials 20
    python -m research.search --config research/configs/toy.json --n-trials 8 \
        --rank-choices 2,4,8 --steps-range 50,400 --lr-range 1e-4,3e-3      # the toy world, on a CPU
    python -m research.search --config research/configs/toy.json --n-trials 8   # again: resumes, adds 8

Every trial is one ordinary training run (research.train.run): its own run folder under
runs/exp2/, and one MLflow run in experiment exp2 with its params, metrics and adapter, tagged
with study_name and trial_number. The objective is read from the trial's metrics.json
(``adapter.style_similarity``, ``adapter.fid``, ``adapter.oracle_style_accuracy``, ``cost.train_seconds``...).

The study lives in an Optuna RDB storage (default sqlite:///optuna.db in the repository root), so
running the command again with the same --study-name resumes it. Many machines can work on one
study at once: give them all the same --storage postgresql://... and MLFLOW_TRACKING_URI, and each
its own --sampler-seed. A trial that fails (an exception, NaN loss) is FAILED in Optuna and in
MLflow and the study goes on; input errors that would fail every trial stop it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from research.config import ConfigError, TrainConfig, add_config_arguments, config_from_args
from research.data import DataError
from research.models import ModelNotFoundError
from research.tracking import REPO_ROOT, flatten_metrics, new_run_dir, setup_logging, tracking_uri

log = logging.getLogger("research")

DEFAULT_STORAGE = f"sqlite:///{REPO_ROOT / 'optuna.db'}"  # git-ignored; a PostgreSQL URL for many workers
DEFAULT_EXPERIMENT = "exp2"
# Metrics where lower is better; everything else (similarities, accuracies, IS) is maximised.
LOWER_IS_BETTER = ("fid", "kid", "lpips_distance", "train_seconds", "peak_memory_mb", "artifact_bytes",
                   "trainable_params")
# Errors that would fail every trial the same way: they end the study instead of failing one trial.
STOP_ERRORS = (ConfigError, DataError, ModelNotFoundError)


class ObjectiveError(ConfigError):
    """The objective names a value the runs do not produce; the message lists the ones they do."""


# ─── the search space ───────────────────────────────────────────────────────────────────────
def _numbers(text: str, kind, flag: str, count: int | None = None) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}.") from None
    if not values or (count is not None and len(values) != count) or any(v <= 0 for v in values):
        what = f"{count} positive numbers low,high" if count else "positive numbers"
        raise ConfigError(f"{flag} must be {what}, got {text!r}.")
    if count == 2 and values[0] > values[1]:
        raise ConfigError(f"{flag} must be low,high with low <= high, got {text!r}.")
    return values


def search_space(args: argparse.Namespace) -> dict:
    return {"rank": _numbers(args.rank_choices, int, "--rank-choices"),
            "max_train_steps": _numbers(args.steps_range, int, "--steps-range", 2),
            "learning_rate": _numbers(args.lr_range, float, "--lr-range", 2)}


def suggest(trial, space: dict) -> dict:
    """Rank is categorical (powers of two, not a continuum); steps and learning rate are log-scaled."""
    params = {"rank": trial.suggest_categorical("rank", space["rank"])} if "rank" in space else {}
    params["max_train_steps"] = trial.suggest_int("max_train_steps", *space["max_train_steps"], log=True)
    params["learning_rate"] = trial.suggest_float("learning_rate", *space["learning_rate"], log=True)
    return params


# ─── the objective ──────────────────────────────────────────────────────────────────────────
def resolve_direction(objective: str, direction: str) -> str:
    if direction != "auto":
        return direction
    return "minimize" if objective.rsplit(".", 1)[-1] in LOWER_IS_BETTER else "maximize"


def check_objective(cfg: TrainConfig, objective: str) -> None:
    """Fail before any training when the objective names a metric the runs will not compute."""
    from research.evaluate import metric_names

    arm, _, name = objective.partition(".")
    if arm in ("adapter", "baseline") and name not in metric_names(cfg):
        raise ObjectiveError(f"--objective {objective} needs {name!r} in --metrics (now {cfg.metrics!r}); "
                             f"add it to --metrics or pick one of {', '.join(f'adapter.{m}' for m in metric_names(cfg)) or 'cost.train_seconds'}.")


def objective_value(metrics: dict, objective: str, source: str = "metrics.json") -> float:
    """The objective from a run's metrics.json, by its flattened MLflow key (adapter.fid -> mean)."""
    flat = flatten_metrics(metrics)
    if objective not in flat:
        raise ObjectiveError(f"Objective {objective!r} is not in {source}; pass --objective with one of: "
                             f"{', '.join(sorted(flat)) or '(none: the run computed no metric)'}.")
    return flat[objective]


def _safe_storage(storage: str) -> str:
    """The storage URL without its password, for tags and summaries."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(storage).render_as_string(hide_password=True)
    except Exception:
        return storage.split("@")[-1]


class TrialRunner:
    """The Optuna objective: one trial = one research.train run, tagged with the study and trial number."""

    def __init__(self, cfg: TrainConfig, study_name: str, objective: str, direction: str, space: dict,
                 parent_run_id: str | None = None):
        self.cfg, self.study_name, self.objective, self.direction = cfg, study_name, objective, direction
        self.space, self.parent_run_id = space, parent_run_id
        self.stop_error: Exception | None = None

    def __call__(self, trial) -> float:
        import dataclasses

        from research.train import run

        params = suggest(trial, self.space)
        run_name = f"{self.study_name}_t{trial.number:03d}"
        cfg = dataclasses.replace(self.cfg, **params, run_name=run_name, run_dir="", resume_from_checkpoint="")
        run_dir = new_run_dir(cfg.output_dir, cfg.experiment, run_name)
        cfg.run_dir = str(run_dir)  # known before training, so a failed trial still points at its folder
        cfg.validate()
        trial.set_user_attr("run_dir", str(run_dir))
        tags = {"study_name": self.study_name, "trial_number": str(trial.number), "objective": self.objective,
                "direction": self.direction}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id  # nested under the `mlflow run -e search` run
        log.info("trial %d: %s -> %s", trial.number, params, run_dir)
        try:
            run(cfg, tags=tags)  # research.train marks its MLflow run FAILED when anything raises
            value = objective_value(json.loads((run_dir / "metrics.json").read_text()), self.objective,
                                    str(run_dir / "metrics.json"))
        except Exception as err:  # KeyboardInterrupt is not an Exception: Ctrl-C still stops the study
            self._finish_mlflow_run(trial, run_dir, failed=True)
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            if isinstance(err, STOP_ERRORS):
                self.stop_error = err  # every further trial would fail the same way: end the study
                trial.study.stop()
            else:
                log.error("trial %d failed (%s: %s); its log is %s", trial.number, type(err).__name__, err,
                          run_dir / "logs.txt")
            # Optuna records a NaN objective as a FAILED trial and goes on; raising would do the same
            # but print a traceback for what is often just a diverged learning rate (the full one is in
            # the trial's logs.txt).
            return float("nan")
        if not math.isfinite(value):
            trial.set_user_attr("error", f"objective {self.objective} is {value}")
        self._finish_mlflow_run(trial, run_dir, failed=not math.isfinite(value), value=value)
        return value

    def _finish_mlflow_run(self, trial, run_dir: Path, failed: bool, value: float | None = None) -> None:
        """Link the trial to its MLflow run; a trial without a usable objective is a FAILED run too."""
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        found = mlflow.search_runs(experiment_names=[self.cfg.experiment], output_format="list",
                                   filter_string=f"tags.run_dir = '{run_dir}'")
        if not found:  # failed before research.train opened a run
            return
        run_id = found[0].info.run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        client = mlflow.MlflowClient()
        if failed:
            client.set_terminated(run_id, "FAILED")
        else:
            client.log_metric(run_id, "objective", value)


# ─── the study ──────────────────────────────────────────────────────────────────────────────
def open_study(storage: str, study_name: str, direction: str, objective: str, seed: int):
    import optuna

    study = optuna.create_study(study_name=study_name, storage=storage, direction=direction, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=seed))
    known = study.user_attrs.get("objective")
    if known is None:
        study.set_user_attr("objective", objective)
    elif known != objective or study.direction.name.lower() != direction:
        raise ConfigError(f"Study {study_name!r} in the storage searches {study.direction.name.lower()} {known}, "
                          f"not {direction} {objective}; pass a new --study-name or the study's own --objective.")
    # A fixed seed would redraw the same first trials on resume; offset it by the trials already there
    # so a resumed study explores on, reproducibly given the storage's state. constant_liar keeps
    # parallel workers from all trying the point TPE likes best.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), constant_liar=True)
    return study


def summarize_study(study, objective: str, storage: str) -> dict:
    def trial_row(t):
        return {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                "run_dir": t.user_attrs.get("run_dir"), "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                **({"error": t.user_attrs["error"]} if "error" in t.user_attrs else {})}

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    counts = {}
    for t in study.trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return {"study_name": study.study_name, "storage": _safe_storage(storage), "objective": objective,
            "direction": study.direction.name.lower(), "n_trials": len(study.trials), "states": counts,
            "best": trial_row(study.best_trial) if complete else None,
            "trials": [trial_row(t) for t in study.trials]}


def search(cfg: TrainConfig, *, n_trials: int, objective: str, direction: str, storage: str, study_name: str,
           space: dict, sampler_seed: int) -> tuple[dict, Path]:
    """Run n_trials more trials of the study and write runs/<experiment>/<study>_summary.json."""
    from research.atomic import write_json

    check_objective(cfg, objective)
    if not Path(cfg.style_dir).is_dir():
        raise DataError(f"Style folder {cfg.style_dir} does not exist; pass a folder of images with --style-dir.")
    direction = resolve_direction(objective, direction)
    study = open_study(storage, study_name, direction, objective, sampler_seed)
    # under `mlflow run -e search` the run MLflow opened is the parent of the trials' runs
    parent = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        runner = TrialRunner(cfg, study_name, objective, direction, space, parent)
        study.optimize(runner, n_trials=n_trials, gc_after_trial=True)
    finally:
        if parent:
            os.environ["MLFLOW_RUN_ID"] = parent
    if runner.stop_error is not None:
        raise runner.stop_error
    summary = summarize_study(study, objective, storage)
    path = Path(cfg.output_dir) / cfg.experiment / f"{study_name}_summary.json"
    write_json(path, summary)
    if parent:
        import mlflow

        # the client, not mlflow.start_run: the parent lives in `mlflow run`'s experiment, not exp2
        client = mlflow.MlflowClient(tracking_uri())
        client.set_tag(parent, "study_name", study_name)
        client.set_tag(parent, "objective", objective)
        if summary["best"]:
            client.log_metric(parent, "best_objective", summary["best"]["value"])
        client.log_artifact(parent, str(path))
    return summary, path


# ─── command line ───────────────────────────────────────────────────────────────────────────
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m research.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    s = parser.add_argument_group("search")
    s.add_argument("--n-trials", "--n_trials", dest="n_trials", type=int, default=20,
                   help="trials to add in this invocation (a resumed study keeps its earlier ones)")
    s.add_argument("--objective", default="adapter.style_similarity",
                   help="metrics.json key to optimise, flattened: adapter.<metric>, baseline.<metric>, cost.<field>")
    s.add_argument("--direction", default="auto", choices=["auto", "maximize", "minimize"],
                   help="auto = minimize fid/kid/cost, maximize everything else")
    s.add_argument("--storage", default="",
                   help="Optuna RDB storage; empty = sqlite:///optuna.db in the repository root; "
                        "postgresql://user:pass@host/db lets many machines share one study")
    s.add_argument("--study-name", "--study_name", dest="study_name", default="",
                   help="study to create or resume (default <style>_<method>)")
    s.add_argument("--sampler-seed", "--sampler_seed", dest="sampler_seed", type=int, default=-1,
                   help="TPE sampler seed; -1 = --seed; give each parallel worker its own")
    s.add_argument("--rank-choices", "--rank_choices", dest="rank_choices", default="4,8,16,32,64",
                   help="LoRA ranks to try (categorical)")
    s.add_argument("--steps-range", "--steps_range", dest="steps_range", default="250,2000",
                   help="low,high optimizer steps (log scale)")
    s.add_argument("--lr-range", "--lr_range", dest="lr_range", default="1e-5,1e-3",
                   help="low,high learning rate (log scale)")
    add_config_arguments(parser)
    parser.set_defaults(experiment=DEFAULT_EXPERIMENT)  # trials go to exp2 unless --experiment says otherwise
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.n_trials <= 0:
            raise ConfigError(f"--n-trials must be a positive number, got {args.n_trials}.")
        cfg = config_from_args(args)
        if cfg.run_dir or cfg.resume_from_checkpoint:
            raise ConfigError("--run-dir and --resume-from-checkpoint do not apply to a search; "
                              "resume a search by running it again with the same --study-name.")
        space = search_space(args)
        if cfg.method != "lora":
            space.pop("rank")  # only LoRA has a rank; steps and learning rate are searched for every method
        study_name = args.study_name or cfg.resolved_run_name()
        summary, path = search(cfg, n_trials=args.n_trials, objective=args.objective, direction=args.direction,
                               storage=args.storage or DEFAULT_STORAGE, study_name=study_name, space=space,
                               sampler_seed=cfg.seed if args.sampler_seed < 0 else args.sampler_seed)
    except STOP_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    best = summary["best"]
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary["states"].items()))
    print(f"\nStudy {summary['study_name']}: {summary['n_trials']} trials ({states}), "
          f"{summary['direction']} {summary['objective']}.")
    if best is None:
        print(f"error: no trial of study {summary['study_name']} completed; read the failed runs' logs.txt "
              f"(listed in {path}).", file=sys.stderr)
        return 1
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    print(f"Best trial {best['number']}: {summary['objective']} = {best['value']:.4f} with {params}\n"
          f"  run folder: {best['run_dir']}\n  summary:    {path}\n"
          f"  figure:     python reports/search_figure.py --study-name {summary['study_name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
