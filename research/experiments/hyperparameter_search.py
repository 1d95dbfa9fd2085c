"""Experiment II: search LoRA rank, training steps and learning rate with Optuna.

Each parameter means one thing: rank is categorical, steps and learning rate are log-scaled, and
LoRA alpha follows rank (alpha = rank x lora_alpha_ratio), so a larger rank does not secretly raise
the learning rate. The ratio itself is searched when several values are given.

Honest selection: every trial is evaluated on the *selection* half of the held-out images; when the
study ends the best trial (every Pareto trial with several objectives) is re-scored on the
*reporting* half with fresh seeds (search_records), and both numbers are logged to the study's
parent MLflow run.

Records: the study is one parent MLflow run; each trial is a child run (the one-run recipe,
research.experiments.one_run.run) with its params, trial number, intermediate and final metrics. A pruned trial
keeps its run as KILLED with its partial metrics; a failed one is FAILED and the study goes on.

Storage: a JournalStorage file by default (several processes on one machine), or any RDB URL
(PostgreSQL) for many machines, where a trial whose worker dies is failed by heartbeat and retried.
research/search.py is its command line (flags, checks, workers' argv).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from research.config import ConfigError, TrainConfig
from research.data import DataError, require_style_dir, style_folder_for
from research.errors import ObjectiveError
from research.evaluation import evaluate_samples
from research.experiments.search_records import (create_parent_run, finalize, mlflow_client, recover_dead_local_trials,
                                                 retry_stale_trial, tag_worker, wait_for_parent, worker_name)
from research.models import ModelNotFoundError
from research.sampling import plan_jobs
from research.tracking import REPO_ROOT, flatten_metrics, mlflow_run_for_dir, new_run_dir, process_identity
from research.experiments.one_run import run
from research.training.hooks import sample_in_training
from research.training.loop import StopTraining

log = logging.getLogger("research")

DEFAULT_STORAGE = str(REPO_ROOT / "optuna.journal")  # git-ignored; a PostgreSQL URL for many machines
DEFAULT_EXPERIMENT = "exp2"
DEFAULT_TRIALS = 20  # when --n-trials is not given and the sampler is not a grid
# The original study's grid (rank x steps x learning rate), used by --search-sampler grid.
ORIGINAL_GRID = {"rank": "16,32,64,128", "max_train_steps": "500,1000,1500,2000", "learning_rate": "1e-4,5e-4"}
# Metrics where lower is better; everything else (similarities, accuracies, IS) is maximised.
LOWER_IS_BETTER = ("fid", "kid", "lpips_distance", "train_seconds", "peak_memory_mb", "artifact_bytes",
                   "trainable_params")
IMAGE_ARMS = ("adapter", "delta")  # objective arms an intermediate adapter-only score can stand in for
# Errors that would fail every trial the same way: they end the study instead of failing one trial.
STOP_ERRORS = (ConfigError, DataError, ModelNotFoundError)
SAMPLERS = ("auto", "tpe", "random", "grid", "nsga2")
PRUNERS = ("median", "hyperband", "none")
MEDIAN_STARTUP_TRIALS = 3  # the median pruner waits for this many finished trials before it prunes
NSGA_POPULATION = 8  # NSGA-II generation size: small, since a toy study has tens of trials, not hundreds


class Pruned(StopTraining):
    """The pruning hook stops a trial's training: its run ends KILLED and the trial PRUNED."""


# ─── the search space ───────────────────────────────────────────────────────────────────────
def _numbers(text: str, kind, flag: str, count: int | None = None) -> list:
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}.") from None
    if not values or (count is not None and len(values) != count) or any(v <= 0 for v in values):
        what = f"{count} positive numbers low,high" if count else "positive numbers"
        raise ConfigError(f"{flag} must be {what}, got {text!r}.")
    if count == 2 and values[0] > values[1]:
        raise ConfigError(f"{flag} must be low,high with low <= high, got {text!r}.")
    if count is None and len(set(values)) != len(values):
        raise ConfigError(f"{flag} lists a value twice: {text!r}.")
    return values


def search_space(args: argparse.Namespace, sampler: str, method: str) -> dict:
    """name -> list (categorical: every value is tried as is) or (low, high) tuple (log-scaled range)."""
    if sampler == "grid":
        space = {"rank": _numbers(args.grid_ranks, int, "--grid-ranks"),
                 "max_train_steps": _numbers(args.grid_steps, int, "--grid-steps"),
                 "learning_rate": _numbers(args.grid_lrs, float, "--grid-lrs")}
    else:
        space = {"rank": _numbers(args.rank_choices, int, "--rank-choices"),
                 "max_train_steps": tuple(_numbers(args.steps_range, int, "--steps-range", 2)),
                 "learning_rate": tuple(_numbers(args.lr_range, float, "--lr-range", 2))}
    space["lora_alpha_ratio"] = _numbers(args.lora_alpha_ratio, float, "--lora-alpha-ratio")
    if method != "lora":  # only LoRA has a rank and an alpha; steps and learning rate are searched for every method
        space.pop("rank"), space.pop("lora_alpha_ratio")
    return space


def suggest(trial, space: dict) -> dict:
    """Training params for one trial; a one-value list is fixed, not searched (it still reaches the run)."""
    params = {}
    for name, domain in space.items():
        if isinstance(domain, list) and len(domain) == 1:
            params[name] = domain[0]
        elif isinstance(domain, list):
            params[name] = trial.suggest_categorical(name, domain)
        elif isinstance(domain[0], int):
            params[name] = trial.suggest_int(name, *domain, log=True)
        else:
            params[name] = trial.suggest_float(name, *domain, log=True)
    ratio = params.pop("lora_alpha_ratio", None)
    if ratio is not None:
        params["lora_alpha"] = params["rank"] * ratio  # alpha follows rank: the LoRA scale alpha/r stays ratio
        trial.set_user_attr("lora_alpha_ratio", ratio)
    return params


def grid_of(space: dict) -> dict:
    """The GridSampler's grid: every searched (several-valued) categorical dimension."""
    return {k: v for k, v in space.items() if isinstance(v, list) and len(v) > 1}


# ─── objectives ─────────────────────────────────────────────────────────────────────────────
def resolve_directions(objectives: list[str], direction: str) -> list[str]:
    given = [d.strip() for d in direction.split(",")]
    if given == ["auto"]:
        given = ["auto"] * len(objectives)
    if len(given) != len(objectives) or any(d not in ("auto", "maximize", "minimize") for d in given):
        raise ConfigError(f"--direction must be auto or one of maximize/minimize per objective "
                          f"({len(objectives)}), got {direction!r}.")
    return [d if d != "auto" else ("minimize" if o.rsplit(".", 1)[-1] in LOWER_IS_BETTER else "maximize")
            for o, d in zip(objectives, given)]


def check_objectives(cfg: TrainConfig, objectives: list[str]) -> None:
    """Fail before any training when an objective names a metric the runs will not compute."""
    names = cfg.metric_names()
    for objective in objectives:
        arm, _, name = objective.partition(".")
        if arm in ("adapter", "baseline", "delta") and name not in names:
            raise ObjectiveError(f"--objectives {objective} needs {name!r} in --metrics (now {cfg.metrics!r}); add it "
                                 f"to --metrics or pick one of {', '.join(f'adapter.{m}' for m in names) or 'cost.train_seconds'}.")


def objective_value(metrics: dict, objective: str, source: str = "metrics.json") -> float:
    """The objective from a run's metrics.json, by its flattened MLflow key (adapter.fid -> mean)."""
    flat = flatten_metrics(metrics)
    if objective not in flat:
        choices = sorted(k for k in flat if not k.endswith((".ci95_lo", ".ci95_hi")))  # bounds are no objective
        raise ObjectiveError(f"Objective {objective!r} is not in {source}; pass --objectives with one of: "
                             f"{', '.join(choices) or '(none: the run computed no metric)'}.")
    return flat[objective]


def prune_metric(objectives: list[str], pruner: str) -> str | None:
    """The image metric scored at checkpoints, or None when pruning cannot apply (several objectives, a cost)."""
    if pruner == "none" or len(objectives) != 1:
        return None
    arm, _, name = objectives[0].partition(".")
    return name if arm in IMAGE_ARMS else None


# ─── pruning: a cheap score at checkpoints ──────────────────────────────────────────────────
def intermediate_score(cfg: TrainConfig, images: list, jobs: list, references: list, metric: str, device) -> float:
    """The objective's metric for a handful of mid-training adapter images vs the selection references."""
    scored = evaluate_samples(dataclasses.replace(cfg, metrics=metric),
                              {"jobs": jobs, "adapter": images, "baseline": None}, references, device)
    return float(scored.get("adapter", {}).get(metric, {}).get("mean", float("nan")))


class PruningHook:
    """Every `every` steps: sample `n_images` with the adapter in place, report the score, maybe stop."""

    def __init__(self, trial, cfg: TrainConfig, metric: str, every: int, n_images: int):
        self.trial, self.cfg, self.metric, self.every = trial, cfg, metric, every
        data = style_folder_for(cfg)  # cfg.heldout_split is "selection": the same references as the objective
        self.references = [e.image for e in data.heldout]
        self.jobs = plan_jobs(data.validation_prompts, n_images, cfg.seed + cfg.eval_seed_offset)

    def on_step(self, info, c) -> None:
        if info.step % self.every or info.step >= self.cfg.max_train_steps:  # the last step gets the full evaluation
            return
        import mlflow  # deferred, as everywhere in research/: its import takes seconds

        images = sample_in_training(self.cfg, c, self.jobs, "intermediate")
        value = intermediate_score(self.cfg, images, self.jobs, self.references, self.metric, c.unet.device)
        if mlflow.active_run():
            mlflow.log_metric(f"intermediate.{self.metric}", value, step=info.step)
        self.trial.report(value, info.step)
        if math.isfinite(value) and self.trial.should_prune():
            raise Pruned(f"trial {self.trial.number} pruned at step {info.step}: intermediate {self.metric} {value:.4f}")

    def on_checkpoint(self, step, path) -> None:
        pass

    def on_end(self, result) -> None:
        pass


# ─── one trial ──────────────────────────────────────────────────────────────────────────────
class TrialRunner:
    """The Optuna objective: one trial = one run of the one-run recipe (experiments.one_run), a child of the study's parent MLflow run."""

    def __init__(self, cfg: TrainConfig, study_name: str, objectives: list[str], space: dict, parent_run_id: str,
                 prune: tuple[str, int, int] | None = None):
        self.cfg, self.study_name, self.objectives, self.space = cfg, study_name, objectives, space
        self.parent_run_id, self.prune = parent_run_id, prune
        self.stop_error: Exception | None = None

    def __call__(self, trial):
        params = suggest(trial, self.space)
        run_name = f"{self.study_name}_t{trial.number:03d}"
        cfg = dataclasses.replace(self.cfg, **params, run_name=run_name, run_dir="", resume_from_checkpoint="",
                                  heldout_split="selection", eval_seed_offset=0)
        run_dir = new_run_dir(cfg.output_dir, cfg.experiment, run_name)
        cfg.run_dir = str(run_dir)  # known before training, so a failed trial still points at its folder
        cfg.validate()
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", worker_name())
        trial.set_user_attr("worker_pid_start", process_identity()["pid_start"])  # a reused pid is not this worker
        tags = {"study_name": self.study_name, "trial_number": str(trial.number),
                "objective": ",".join(self.objectives), "mlflow.parentRunId": self.parent_run_id}
        log.info("trial %d: %s -> %s", trial.number, params, run_dir)
        try:
            hooks = [PruningHook(trial, cfg, *self.prune)] if self.prune else []
            run(cfg, tags=tags, hooks=hooks)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            values = [objective_value(metrics, o, str(run_dir / "metrics.json")) for o in self.objectives]
        except Pruned as err:
            self._finish_mlflow_run(trial, run_dir, "PRUNED")
            raise optuna.TrialPruned(str(err)) from None
        except Exception as err:  # KeyboardInterrupt is not an Exception: Ctrl-C still stops the study
            if run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()  # refused before it started (research.train checks first): no stub folder
                trial.set_user_attr("run_dir", "")
            self._finish_mlflow_run(trial, run_dir, "FAIL")
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
            return float("nan") if len(self.objectives) == 1 else [float("nan")] * len(self.objectives)
        finite = all(math.isfinite(v) for v in values)
        if not finite:
            trial.set_user_attr("error", f"objective {self.objectives} is {values}")
        self._finish_mlflow_run(trial, run_dir, "COMPLETE" if finite else "FAIL", values)
        return values[0] if len(values) == 1 else values

    def _finish_mlflow_run(self, trial, run_dir: Path, state: str, values: list[float] | None = None) -> None:
        """Link the trial and its MLflow run both ways; a trial without a usable objective is a FAILED run."""
        client, run_id = mlflow_client(), mlflow_run_for_dir(run_dir)
        if run_id is None:  # failed before research.train opened a run
            return
        trial.set_user_attr("mlflow_run_id", run_id)
        client.log_param(run_id, "trial_number", trial.number)
        if "lora_alpha_ratio" in trial.user_attrs:
            client.log_param(run_id, "lora_alpha_ratio", trial.user_attrs["lora_alpha_ratio"])
        client.set_tag(run_id, "trial_state", state)
        if state == "FAIL":
            client.set_terminated(run_id, "FAILED")
        for objective, value in zip(self.objectives, values or []):
            client.log_metric(run_id, "objective" if len(self.objectives) == 1 else f"objective.{objective}", value)


# ─── storage, samplers, pruners ─────────────────────────────────────────────────────────────
def open_storage(url: str, heartbeat: int, experiment: str):
    """A file path -> JournalStorage (several processes, one machine); a URL -> RDBStorage with heartbeat."""
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat or None,
                                          heartbeat_stale_trial_callback=(
                                              retry_stale_trial(experiment) if heartbeat else None))
    except ImportError as err:  # e.g. postgresql:// without its driver
        raise ConfigError(f"Storage {safe_storage(url)} needs a database driver ({err.name or err}); "
                          "install it (PostgreSQL: pip install -r requirements.txt brings psycopg).") from None


def safe_storage(storage: str) -> str:
    """The storage URL without its password, for tags and summaries."""
    if "://" not in storage:
        return storage
    from sqlalchemy.engine import make_url  # deferred: only an RDB storage URL needs SQLAlchemy

    try:
        return make_url(storage).render_as_string(hide_password=True)
    except Exception:
        return storage.split("@")[-1]


def make_sampler(name: str, space: dict, seed: int):
    if name == "grid":
        return optuna.samplers.GridSampler(grid_of(space), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=NSGA_POPULATION, seed=seed)
    # constant_liar: parallel workers see each other's running trials, so they do not all try TPE's favourite
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(name: str, every: int, max_steps: int):
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=every, max_resource=max(max_steps, every))
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def worker_seed(sampler_seed: int, seed: int, n_existing: int) -> int:
    """--sampler-seed N: N plus the trials already in the study (a resume explores on, reproducibly).
    -1: --seed mixed with this host and process, so parallel workers never draw the same points; the seed
    used is logged, so a run can be repeated with --sampler-seed."""
    if sampler_seed >= 0:
        return sampler_seed + n_existing
    return zlib.crc32(f"{seed}:{os.uname().nodename}:{os.getpid()}:{n_existing}".encode()) % (2**31)


# ─── the study ──────────────────────────────────────────────────────────────────────────────
def open_study(storage, study_name: str, directions: list[str], settings: dict, cfg: TrainConfig):
    """Create or load the study; whoever creates it also creates its parent MLflow run (one per study,
    however many workers start at once: Optuna refuses a second study of the same name)."""
    try:
        study = optuna.create_study(study_name=study_name, storage=storage, directions=directions)
        for key, value in settings.items():
            study.set_user_attr(key, value)
        study.set_user_attr("mlflow_parent_run_id", create_parent_run(cfg, study_name, settings))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage)
        wait_for_parent(study, cfg, settings)
    known = {k: study.user_attrs.get(k) for k in settings}
    if known != settings or [d.name.lower() for d in study.directions] != directions:
        differs = ", ".join(f"{k} {known[k]!r} (not {settings[k]!r})" for k in settings if known[k] != settings[k])
        raise ConfigError(f"Study {study_name!r} in the storage was made with {differs or 'other directions'}; "
                          "pass a new --study-name, or the study's own settings to resume it.")
    return study


def search(cfg: TrainConfig, opts: argparse.Namespace) -> dict:
    """Run this worker's trials (or, with --workers K, K worker processes), then finalize the study."""
    require_style_dir(cfg.style_dir)
    storage = open_storage(opts.storage, opts.heartbeat_interval, cfg.experiment)
    settings = {"objectives": ",".join(opts.objectives), "search_sampler": opts.search_sampler,
                "space": json.dumps(opts.space)}
    study = open_study(storage, opts.study_name, opts.directions, settings, cfg)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    target = opts.total_trials or (len(study.get_trials(states=finished)) + opts.n_trials if opts.n_trials else 0)
    if opts.workers > 1:
        run_workers(opts, target)
    elif opts.n_trials != 0:
        run_trials(study, cfg, opts, target)
    if not opts.finalize:
        return {"study_name": opts.study_name, "finalized": False}
    return finalize(optuna.load_study(study_name=opts.study_name, storage=storage), cfg, opts)


def run_trials(study, cfg: TrainConfig, opts: argparse.Namespace, target: int) -> None:
    seed = worker_seed(opts.sampler_seed, cfg.seed, len(study.trials))
    study.sampler = make_sampler(opts.search_sampler, opts.space, seed)
    metric = prune_metric(opts.objectives, opts.pruner) if opts.report_every else None
    max_steps = max(opts.space["max_train_steps"])
    study.pruner = make_pruner(opts.pruner if metric else "none", opts.report_every, max_steps)
    parent = study.user_attrs["mlflow_parent_run_id"]
    tag_worker(parent, seed, opts.threads)
    prune = (metric, opts.report_every, opts.prune_images) if metric else None
    runner = TrialRunner(cfg, opts.study_name, opts.objectives, opts.space, parent, prune)
    callbacks = []
    if "://" not in opts.storage:  # a journal file has no heartbeat: look for this machine's dead workers instead
        recover = recover_dead_local_trials(cfg.experiment)
        recover(study)
        callbacks.append(recover)
    if target:  # shared by all workers: stop once the study holds `target` finished trials
        callbacks.append(optuna.study.MaxTrialsCallback(
            target, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))
    n = opts.n_trials  # None: until the grid is exhausted (GridSampler stops the study)
    # under `mlflow run -e search` MLflow's own run must not swallow the trials' runs
    outer = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        if opts.search_sampler == "grid" and n is None:
            study.sampler = optuna.samplers.RandomSampler(seed)  # never asked: every grid trial has fixed params
            run_grid_share(study, runner, callbacks, grid_of(opts.space), opts.grid_share)
        else:
            study.optimize(runner, n_trials=n, callbacks=callbacks, gc_after_trial=True)
    finally:
        if outer:
            os.environ["MLFLOW_RUN_ID"] = outer
    if runner.stop_error is not None:
        raise runner.stop_error


def grid_points(grid: dict) -> list[dict]:
    """Every point of the grid, in a fixed order (names sorted, then each list as given)."""
    names = sorted(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[k] for k in names))]


def run_grid_share(study, runner, callbacks, grid: dict, share: str) -> None:
    """Run this worker's share i/K of the grid: points i, i+K, ... that no trial has finished or is running.

    Why not Optuna's GridSampler alone: it picks a point by trial number from each process's own view of
    the storage, and with two worker processes on one journal file it ran some points twice and skipped
    others (measured: 9 trials for an 8-point grid, 3 points twice, 2 never). Here each point belongs to
    one worker, and each is an enqueued trial (fixed params), so no point runs twice and none is skipped.
    A worker always enqueues before it runs one trial, so the trial it pops is always an enqueued one
    (perhaps another worker's: they even out)."""
    i, k = (int(x) for x in share.split("/"))
    taken = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    for point in grid_points(grid)[i::k]:
        if any(t.params == point for t in study.get_trials(deepcopy=False, states=taken)):
            continue  # a resumed study: done already, or under way in another worker
        study.enqueue_trial(point)
        study.optimize(runner, n_trials=1, callbacks=callbacks, gc_after_trial=True)


def run_workers(opts: argparse.Namespace, target: int) -> None:
    """K copies of this command on this machine, each with its share of the cores and its own sampler seed."""
    threads = max(1, (opts.threads or len(os.sched_getaffinity(0))) // opts.workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    for leaked in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # this process's, not theirs
        env.pop(leaked, None)
    procs = []
    for i in range(opts.workers):
        seed = [] if opts.sampler_seed < 0 else ["--sampler-seed", str(opts.sampler_seed + 1000 * (i + 1))]
        argv = [sys.executable, "-m", "research.search", *opts.argv, "--workers", "1", "--threads", str(threads),
                "--finalize", "false", "--study-name", opts.study_name, "--storage", opts.storage,
                "--total-trials", str(target), "--grid-share", f"{i}/{opts.workers}", *seed]
        procs.append(subprocess.Popen(argv, env=env, cwd=os.getcwd()))
        time.sleep(0.5)  # stagger the starts: the journal file lock is polite, not fast
    codes = [p.wait() for p in procs]
    if any(codes):
        log.error("worker exit codes: %s (their trials are in the study; read the failed runs' logs.txt)", codes)
