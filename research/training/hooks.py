"""Hooks that plug tracking and validation into the training loop (on_step, on_checkpoint, on_end).

Part of the loop floor: the loop calls them and knows nothing of MLflow or sampling. They sit on
the sampling block and take the tracker (research.tracking.Tracker) as an argument.
"""

from __future__ import annotations

import logging
from pathlib import Path

from research.config import TrainConfig
from research.methods import Components, get_method
from research.sampling import Job, sample_components
from research.training.loop import StepInfo, TrainResult

log = logging.getLogger("research")


class MLflowHook:
    """Loss and learning rate every log step, the training cost at the end."""

    def __init__(self, tracker):
        self.tracker = tracker

    def on_step(self, info: StepInfo, components: Components) -> None:
        if info.loss is not None:
            self.tracker.log_metrics({"train.loss": info.loss, "train.lr": info.lr}, step=info.step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        log.info("resumable state saved: %s", path)

    def on_end(self, result: TrainResult) -> None:
        self.tracker.log_metrics({f"cost.{k}": float(v) for k, v in result.cost.items()})


def sample_in_training(cfg: TrainConfig, c: Components, jobs: list[Job], desc: str) -> list:
    """Images from the components as they are mid-training (adapter in place), for validation strips and a
    search's intermediate score. Sampling must not change training: modules offloaded to the CPU go back
    there, and train/eval modes are restored (sampling runs in eval mode, so LoRA dropout is off)."""
    device = c.unet.device
    places = {m: next(m.parameters()).device for m in (c.vae, c.text_encoder)}
    modes = {m: m.training for m in (c.unet, c.vae, c.text_encoder)}
    try:
        for module in places:
            module.to(device)
        for module in modes:
            module.eval()
        return sample_components(c, jobs, cfg, desc, prompt_fn=get_method(cfg).caption)
    finally:
        for module, place in places.items():
            module.to(place)
        for module, mode in modes.items():
            module.train(mode)


class ValidationHook:
    """Every N steps, sample the first validation prompts with the adapter in place and log them."""

    def __init__(self, cfg: TrainConfig, tracker, prompts: list[str]):
        self.cfg, self.tracker, self.prompts = cfg, tracker, prompts[:4]

    def on_step(self, info: StepInfo, c: Components) -> None:
        if not self.cfg.validation_steps or info.step % self.cfg.validation_steps:
            return
        jobs = [Job(i, p, self.cfg.seed) for i, p in enumerate(self.prompts)]
        for job, image in zip(jobs, sample_in_training(self.cfg, c, jobs, "validation")):
            self.tracker.log_image(image, job.file_name, step=info.step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_end(self, result: TrainResult) -> None:
        pass
