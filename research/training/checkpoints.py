"""Resumable states of the training loop: save, find, load, and the checks a resume must pass.

Part of the loop floor. A state holds the trainable tensors only (not the base model), the optimizer,
the schedule and the RNGs, written as ``checkpoints/state-<step>`` through a ``.tmp-`` folder so a
killed save never looks finished. A resume reads the run's own config.json and refuses anything that
would change what trains. Sits on the config, the methods' interface and tracking's run record.
"""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from research.config import TrainConfig, read_config_file
from research.errors import ConfigError, ResumeError
from research.tracking import process_alive, read_record

log = logging.getLogger("research")
STATE_PREFIX = "state-"
TRAINABLE_FILE = "trainable.safetensors"
# what a truncated or damaged resumable state raises when accelerate loads it
BROKEN_STATE_ERRORS = (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError)
# Flags a resume may change: they decide where logs go or how fast sampling batches, never what is trained.
RESUME_MAY_CHANGE = {"run_dir", "resume_from_checkpoint", "output_dir", "log_every", "validation_steps",
                     "sample_batch_size", "checkpoints_total_limit", "clip_model", "inception_weights",
                     "lpips_weights", "oracle"}


def register_trainable_state(accelerator, method, c) -> None:
    """accelerate saves and loads the method's trainable tensors, not the whole (frozen) base model."""
    def save_hook(models, weights, output_dir):
        weights.clear()
        save_file(method.trainable_state(c), Path(output_dir) / TRAINABLE_FILE)

    def load_hook(models, input_dir):
        models.clear()
        method.load_trainable_state(c, load_file(Path(input_dir) / TRAINABLE_FILE))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_state(accelerator, checkpoints: Path, step: int, keep: int, hooks=()) -> Path:
    """Write the resumable state of `step` (one writer: the tensors are the same on every process), keep the
    newest `keep` states and tell the hooks."""
    final = checkpoints / f"{STATE_PREFIX}{step:06d}"
    if accelerator.is_main_process:
        tmp = checkpoints / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.save_state(str(tmp))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a killed save never looks like a finished state
        for old in sorted(checkpoints.glob(f"{STATE_PREFIX}*"))[:-max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        for hook in hooks:
            hook.on_checkpoint(step, final)
    accelerator.wait_for_everyone()
    return final


def saved_states(checkpoints: Path) -> list[Path]:
    """Finished resumable states, oldest first (a save in progress is a .tmp- folder, never listed)."""
    return sorted(p for p in checkpoints.glob(f"{STATE_PREFIX}*") if p.is_dir() and p.name[len(STATE_PREFIX):].isdigit())


def states_to_try(cfg: TrainConfig, run_dir: Path) -> list[Path]:
    """The states a resume may load, best first: "latest" falls back to older ones if the newest is damaged."""
    checkpoints = run_dir / "checkpoints"
    if cfg.resume_from_checkpoint == "latest":
        states = saved_states(checkpoints)[::-1]
    else:
        state = Path(cfg.resume_from_checkpoint)
        states = [state if state.is_absolute() or state.is_dir() else checkpoints / state]
    if not states or not states[0].is_dir():
        raise ResumeError(f"No resumable state {cfg.resume_from_checkpoint!r} in {checkpoints}; "
                          "drop --resume-from-checkpoint to start fresh.")
    return states


def load_resumable_state(accelerator, states: list[Path]) -> int:
    """Load the first state that loads; return its step. A damaged newest state (a disk that filled up,
    a copy cut short) falls back to the one before it, with a warning."""
    for state in states:
        try:
            accelerator.load_state(str(state))
        except BROKEN_STATE_ERRORS as err:
            log.warning("resumable state %s is damaged (%s: %s); trying the one before it.", state,
                        type(err).__name__, str(err).splitlines()[0][:120] if str(err) else "")
            continue
        step = int(state.name[len(STATE_PREFIX):])
        log.info("resumed from %s at step %d", state, step)
        return step
    raise ResumeError(f"Every resumable state in {states[0].parent} is damaged; start a new run without "
                      "--resume-from-checkpoint.")


def resumed_config(values: dict) -> TrainConfig:
    """A resume's config is the run's own config.json; the values given on top are kept so that
    check_resume can name every one that would change the run."""
    if not values.get("run_dir"):
        raise ConfigError("--resume-from-checkpoint needs --run-dir pointing at the run folder to continue.")
    stored = Path(values["run_dir"]) / "config.json"
    if not stored.is_file():
        raise ResumeError(f"{values['run_dir']} is not a run folder (no config.json); pass the folder of the run "
                          "to continue to --run-dir.")
    return TrainConfig.from_dict({**read_config_file(stored), **values}, source="command line")


def check_resume(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse a resume that would not continue the run that ran: other flags, a finished or live run,
    no state to start from."""
    stored = TrainConfig.from_json_file(run_dir / "config.json").to_dict()
    changed = [f"--{k.replace('_', '-')} {stored[k]!r} -> {v!r}" for k, v in cfg.to_dict().items()
               if k not in RESUME_MAY_CHANGE and stored.get(k) != v]
    if changed:
        raise ResumeError(f"Resuming {run_dir} would change the run ({'; '.join(changed)}); drop those flags "
                          "(a resume reads the run's own config.json) or start a new run.")
    record = read_record(run_dir)
    if record.get("status") == "FINISHED":
        raise ResumeError(f"{run_dir} finished already; there is nothing to resume (start a new run to train more).")
    if record.get("status") == "RUNNING" and process_alive(record.get("pid"), record.get("host"), record.get("pid_start")):
        raise ResumeError(f"{run_dir} is still being trained by process {record.get('pid')}; wait for it or stop it first.")
    states_to_try(cfg, run_dir)
