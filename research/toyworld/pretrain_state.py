"""Resumable pretraining: each stage's training state, and which stages have finished.

Beside pretrain.py, which imports it (it knows nothing of the stages' models). While a stage trains it
saves `<out>/.state/<stage>.pt` at a step boundary every SAVE_EVERY_S seconds: the step, the state of
every object it is handed (model, EMA, optimizer, the torch.Generator that draws batches and noise)
and torch's global RNG, written to a temporary file and renamed into place. A rerun loads it and goes
on as if never stopped: bit for bit on the CPU, since the data are re-rendered from fixed seeds and a
save reads the RNGs without drawing from them. A finished stage leaves `<stage>.done.json` (what
it was trained with, how long it took across runs) and its state file is removed.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from research.atomic import atomic_path, write_json
from research.errors import ResumeError

STATE_DIR = ".state"  # under --out; hidden, so the weights folder still holds only what ships
SAVE_EVERY_S = 120.0  # a stop loses at most this much training; a save takes well under a second


def state_file(out: Path, stage: str) -> Path:
    return out / STATE_DIR / f"{stage}.pt"


def done_file(out: Path, stage: str) -> Path:
    return out / STATE_DIR / f"{stage}.done.json"


def finished(out: Path, stage: str) -> dict | None:
    """The record of a stage that finished into `out`, or None."""
    path = done_file(out, stage)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def mark_finished(out: Path, stage: str, fingerprint: dict, seconds: float) -> None:
    """Called once the stage's output is in place: record it, then drop its training state."""
    write_json(done_file(out, stage), {"fingerprint": fingerprint, "seconds": round(seconds, 1)})
    state_file(out, stage).unlink(missing_ok=True)


def begin(out: Path, stage: str, from_start: bool) -> None:
    """A stage starts training, so it is no longer finished; `from_start` also drops its saved state."""
    done_file(out, stage).unlink(missing_ok=True)
    if from_start:
        state_file(out, stage).unlink(missing_ok=True)


def differences(saved: dict, now: dict) -> list[str]:
    """`name old -> new` for every fingerprint entry (recipe fields one by one) that differs."""
    flat = lambda d: {**{k: v for k, v in d.items() if k != "recipe"}, **d.get("recipe", {})}  # noqa: E731
    old, new = flat(saved), flat(now)
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def read_state(path: Path, fingerprint: dict) -> dict:
    """A saved training state that continues this run; refused if damaged or made by another recipe or device."""
    stage = path.stem
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only: no pickle
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ResumeError(f"{path} cannot be read ({type(err).__name__}); pass --only {stage} to train {stage} from the start.") from err
    if changed := differences(saved["fingerprint"], fingerprint):
        raise ResumeError(f"{path} was saved by a run with other settings ({'; '.join(changed)}); rerun with the "
                          f"flags it was started with, or pass --only {stage} to train {stage} from the start.")
    return saved


def _state_of(obj):
    return obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()


def _load_into(obj, saved) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(saved)
    elif isinstance(obj, EMAModel):
        device = obj.shadow_params[0].device
        obj.load_state_dict(saved)
        obj.to(device=device)  # loaded on the CPU; its shadow weights live beside the model's
    else:
        obj.load_state_dict(saved)  # modules and optimizers copy into their own tensors, on their own device


class StageState:
    """One stage's training state. `resume(...)` hands it the objects to save (loading them when a state was
    saved before) and `steps(total, desc)` runs the loop from there, saving between steps.
    Without a path nothing is saved or loaded."""

    def __init__(self, path: Path | None = None, fingerprint: dict | None = None, every_s: float | None = None):
        self.path, self.fingerprint = path, fingerprint or {}
        self.every_s = SAVE_EVERY_S if every_s is None else every_s
        self.objects: dict = {}
        self.step = 0
        self.started = self.last_save = time.monotonic()
        self.earlier_s = 0.0  # seconds the stage ran in the runs before this one, up to each one's last save

    def resume(self, **objects) -> None:
        """Call after everything that draws from an RNG before the loop, right before it."""
        self.objects = objects
        if self.path is not None and self.path.is_file():
            saved = read_state(self.path, self.fingerprint)
            for name, obj in objects.items():
                _load_into(obj, saved["objects"][name])
            torch.set_rng_state(saved["torch_rng"])
            if saved["cuda_rng"] is not None:
                torch.cuda.set_rng_state_all(saved["cuda_rng"])
            self.step = saved["step"]
            self.earlier_s = saved.get("seconds", 0.0)  # states saved before stop 24 did not record it
        self.last_save = time.monotonic()

    def steps(self, total: int, desc: str):
        """(step, progress bar) from the resumed step to total-1; after each step, a save if one is due."""
        for step in (bar := tqdm(range(self.step, total), initial=self.step, total=total, desc=desc, mininterval=10)):
            yield step, bar
            self.step = step + 1
            if self.path is not None and self.step < total and time.monotonic() - self.last_save >= self.every_s:
                self.save()

    @property
    def seconds(self) -> float:
        """How long the stage has run so far, the runs it resumed included (time lost after their last save is not)."""
        return self.earlier_s + time.monotonic() - self.started

    def save(self) -> None:
        state = {
            "step": self.step, "fingerprint": self.fingerprint, "seconds": self.seconds, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "objects": {name: _state_of(obj) for name, obj in self.objects.items()},
        }  # fmt: skip
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        self.last_save = time.monotonic()
