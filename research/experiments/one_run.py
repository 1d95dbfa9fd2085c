"""One run, the recipe every experiment repeats: check -> run folder + MLflow run -> train -> sample ->
evaluate -> track. ``python -m research.train`` is one call of ``run``; Experiments I-III call it per
style, trial or method.

The experiments floor: it sits on the training loop, evaluation, sampling and tracking.
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from research.atomic import write_json
from research.config import TrainConfig
from research.errors import ConfigError, RunInterrupted, is_user_error
from research.evaluation import format_table, score_run
from research.models import load_pipeline, pick_device, pick_precision, weight_dtype
from research.sampling import sample_run
from research.tracking import (FILE_ONLY, SUBDIRS, Tracker, check_store_writable, early_records, flatten_metrics,
                               new_run_dir, setup_logging)
from research.training.checkpoints import STATE_PREFIX, check_resume
from research.training.hooks import MLflowHook, ValidationHook
from research.training.loop import Hook, Prepared, StopTraining, prepare, train

log = logging.getLogger("research")


def run(cfg: TrainConfig, track: bool = True, tags: dict[str, str] | None = None, hooks: list[Hook] = ()) -> Path:
    """Check everything (inputs, model, store, resume), then create the run folder and MLflow run, train,
    sample and evaluate. A refused run leaves nothing behind; a started one always ends with a status.
    hooks: more training hooks (a search's pruning reporter) beside tracking and validation.

    Under `accelerate launch` / `torchrun` every process trains its share of each batch; only the main
    process owns the run folder, MLflow, samples and metrics.
    """
    resume = bool(cfg.resume_from_checkpoint)
    setup_logging()
    processes = PartialState(cpu=pick_device(cfg.device).type == "cpu")
    with early_records() as checks_log:
        if resume and processes.is_main_process:
            check_resume(cfg, Path(cfg.run_dir))
        prepared = prepare(cfg)
        if track and processes.is_main_process:
            check_store_writable()
    run_dir = _shared_run_dir(cfg, processes)
    if not processes.is_main_process:
        train(cfg, run_dir, prepared=prepared)  # a peer: it trains; the main process keeps the records
        return run_dir
    try:
        tracker = _start_records(cfg, run_dir, track, tags, resume, checks_log)
    except BaseException:
        if not resume and not any(run_dir.iterdir()):
            run_dir.rmdir()  # the MLflow store refused the run: leave no empty folder behind
        raise
    try:
        _train_sample_evaluate(cfg, run_dir, tracker, prepared, hooks)
    except StopTraining as err:
        log.info("stopped early: %s", err)
        tracker.finish("KILLED", f"stopped early: {err}")  # its params and the metrics logged so far stay
        raise
    except (RunInterrupted, KeyboardInterrupt) as stop:
        name = getattr(stop, "signal_name", "SIGINT")
        reason = (f"stopped by {name}; the last resumable state is kept: continue with "
                  f"python -m research.train --run-dir {run_dir} --resume-from-checkpoint latest")
        log.error("%s", reason, extra=FILE_ONLY)
        tracker.finish("KILLED", reason)
        raise RunInterrupted(name, reason) from None
    except BaseException as err:
        # the console gets one line from the CLI (or the traceback of a bug, once); logs.txt gets it all
        log.error("run failed: %s: %s", type(err).__name__, err, exc_info=not is_user_error(err),
                  extra=FILE_ONLY)
        tracker.fail(f"{type(err).__name__}: {err}")
        raise
    return run_dir


def _claim_run_dir(cfg: TrainConfig) -> Path:
    if not cfg.run_dir:
        return new_run_dir(cfg.output_dir, cfg.experiment, cfg.resolved_run_name())
    run_dir = Path(cfg.run_dir)
    if not cfg.resume_from_checkpoint and (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir} already holds a run; add --resume-from-checkpoint latest to continue it, "
                          "or drop --run-dir to start a new one.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)  # a folder a caller made for us (a search trial) is fine
    except OSError as err:
        raise ConfigError(f"Cannot create the run folder {run_dir} ({err.strerror}); pass a writable --run-dir.") from None
    return run_dir


def _shared_run_dir(cfg: TrainConfig, processes) -> Path:
    """The main process claims the run folder; the others are told it, so all write one run."""
    path = [str(_claim_run_dir(cfg)) if processes.is_main_process else None]
    if processes.num_processes > 1:
        broadcast_object_list(path)
    return Path(path[0])


def _start_records(cfg: TrainConfig, run_dir: Path, track: bool, tags: dict | None, resume: bool,
                   checks_log: list[logging.LogRecord]) -> Tracker:
    for sub in SUBDIRS:
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir / "logs.txt", replay=checks_log)
    if not resume:  # a resumed run keeps the config it was started with (check_resume made sure they agree)
        write_json(run_dir / "config.json", cfg.to_dict())
    tags = {"experiment": cfg.experiment, "method": cfg.method, "style": cfg.resolved_style_name(),
            "base_model": cfg.base_model, "run_dir": str(run_dir), **(tags or {})}
    tracker = Tracker(run_dir, cfg.experiment, cfg.resolved_run_name(), tags, enabled=track, resume=resume)
    log.info("run folder %s%s%s", run_dir, f" (MLflow run {tracker.run_id})" if tracker.run_id else "",
             ", resumed" if resume else "")
    return tracker


def _train_sample_evaluate(cfg: TrainConfig, run_dir: Path, tracker: Tracker, prepared: Prepared, hooks=()) -> None:
    tracker.log_params(cfg.to_dict())
    prompts = prepared.data.validation_prompts
    result = train(cfg, run_dir, hooks=[MLflowHook(tracker), ValidationHook(cfg, tracker, prompts), *hooks],
                   prepared=prepared)
    del prepared
    # free the training graph, then sample through the saved file, the way a user loads it
    device = result.components.unet.device
    del result.components
    pipe = load_pipeline(cfg.base_model, weight_dtype(pick_precision(cfg.mixed_precision, device))).to(device)
    log.info("sampling %d images per arm (base model, then adapter; same prompts and seeds)", cfg.num_eval_images)
    samples = sample_run(run_dir, cfg, result.method, prompts=result.data.validation_prompts, base_pipe=pipe)
    log.info("evaluating %s against %d held-out images", cfg.metrics, len(result.data.heldout))
    metrics = score_run(run_dir, cfg, samples, [e.image for e in result.data.heldout], device, result.cost)
    # logs.txt keeps the table; the console gets it once, from the CLI
    log.info("metrics written to %s\n%s", run_dir / "metrics.json", format_table(metrics), extra=FILE_ONLY)
    tracker.log_metrics(flatten_metrics({k: v for k, v in metrics.items() if k != "cost"}))
    # large full-model checkpoints (DreamBooth's UNet) stay once, in the run folder; MLflow gets the
    # pointer file the method writes beside them instead of a second multi-GB copy
    stored_once = tuple(f"checkpoints/{p}" for p in result.method.stored_once)
    tracker.log_folder(skip=(f"checkpoints/{STATE_PREFIX}", *stored_once))
    tracker.finish("FINISHED")
