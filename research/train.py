"""Train a style adapter on a folder of images: the one training loop, for every method.

    python -m research.train --style-dir data/ghibli --rank 16
    python -m research.train --config research/configs/toy.json          # the embedded toy default
    python -m research.train --run-dir runs/exp1/<run> --resume-from-checkpoint latest  # reads the run's config.json

The method (research/methods) decides which parameters train and how they are saved; this loop
only noises latents, predicts, weights the loss and steps. Sampling, evaluation and MLflow plug in
through hooks (on_step, on_checkpoint, on_end).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import pickle
import random
import resource
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from research.atomic import write_json
from research.config import OneLineParser, TrainConfig, add_config_arguments, given_values
from research.data import StyleFolder, preprocess, style_folder_for
from research.evaluate import evaluate_samples, format_table
from research.errors import ConfigError, ResumeError, RunInterrupted, TrainingError, UserError
from research.methods import Components, config_metadata, get_method
from research.models import (PREDICTION_TYPES, check_lora_targets, check_resolution, load_pipeline, pick_device,
                             pick_precision, weight_dtype)

log = logging.getLogger("research")
STATE_PREFIX = "state-"
USER_ERRORS = (UserError,)
# Flags a resume may change: they decide where logs go or how fast sampling batches, never what is trained.
RESUME_MAY_CHANGE = {"run_dir", "resume_from_checkpoint", "output_dir", "log_every", "validation_steps",
                     "sample_batch_size", "checkpoints_total_limit", "clip_model", "inception_weights",
                     "lpips_weights", "oracle"}
# an OS error that is the environment's, not a bug: said in one line, with the way to go on
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# what a truncated or damaged resumable state raises when accelerate loads it
BROKEN_STATE_ERRORS = (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError)


class StopTraining(Exception):
    """A hook ends the run early on purpose (a search prunes a trial): the run is KILLED, not FAILED."""


@dataclass
class StepInfo:
    step: int
    loss: float | None = None  # mean loss since the last log (set on log steps only)
    lr: float | None = None


@dataclass
class TrainResult:
    components: Components
    method: object
    data: object
    artifacts: list[Path]
    cost: dict = field(default_factory=dict)


@dataclass
class ExtraBatches:
    """Extra examples a method mixes into every batch with their own loss weight (DreamBooth's prior
    preservation). A method that has them returns this from ``Method.extra_batches(components,
    encode_images, run_dir)``; each micro-batch then draws as many extra examples as it has instance
    examples, and loss = instance loss + weight * extra loss."""

    latents: torch.Tensor  # [M, C, h, w] cached latents, on the training device
    hidden: torch.Tensor  # [M or 1, L, D] text embeddings (1 = the same prompt for all)
    weight: float


class Hook(Protocol):
    def on_step(self, info: StepInfo, components: Components) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_end(self, result: TrainResult) -> None: ...


def _mix(*numbers: int) -> int:
    """A deterministic 63-bit seed from several integers (seed, step, micro-step)."""
    h = 1469598103934665603
    for n in numbers:
        h = ((h ^ (n & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class Draws:
    """Every random draw of a micro-step, made on the training device.

    One generator per stream (DATA: flips, noise, timesteps; EXTRA: prior-preservation examples;
    DROPOUT: caption dropout), made once and re-seeded from (seed, process, micro-step, stream) at
    every micro-step. Any step can be redrawn from those numbers alone, which keeps a resumed run
    bit-identical; nothing is drawn on the host and copied over with a blocking `.to(device)`.
    Process 0 draws exactly what a single process draws; every other process draws its own flips,
    noise, timesteps and dropout for its own slice of the batch (with one shared seed, every process
    drew the same noise for different images).
    """

    DATA, EXTRA, DROPOUT = 7, 11, 13

    def __init__(self, seed: int, process_index: int, device: torch.device, noise_offset: float = 0.0):
        self.seed = seed if process_index == 0 else _mix(seed, process_index)
        self.device, self.noise_offset = device, noise_offset
        self._generators: dict[int, torch.Generator] = {}

    def generator(self, stream: int, micro_step: int) -> torch.Generator:
        if stream not in self._generators:
            self._generators[stream] = torch.Generator(self.device)
        return self._generators[stream].manual_seed(_mix(self.seed, micro_step, stream))

    def noise(self, shape, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(shape, generator=gen, device=self.device)
        if self.noise_offset:
            noise += self.noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=gen, device=self.device)
        return noise

    def integers(self, high: int, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=gen, device=self.device)


def batch_indices(n: int, batch: int, micro_step: int, seed: int) -> list[int]:
    """Indices for one micro-batch: epochs are seeded permutations, so any step can be recomputed
    from (seed, step) alone, which is what makes a resumed run bit-identical."""
    out, pos = [], micro_step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))
        take = min(batch - len(out), n - offset)
        out.extend(perm[offset:offset + take].tolist())
        pos += take
    return out


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
        except BROKEN_STATE_ERRORS + (_safetensor_error(),) as err:
            log.warning("resumable state %s is damaged (%s: %s); trying the one before it.", state,
                        type(err).__name__, str(err).splitlines()[0][:120] if str(err) else "")
            continue
        step = int(state.name[len(STATE_PREFIX):])
        log.info("resumed from %s at step %d", state, step)
        return step
    raise ResumeError(f"Every resumable state in {states[0].parent} is damaged; start a new run without "
                      "--resume-from-checkpoint.")


def _safetensor_error() -> type:
    from safetensors import SafetensorError

    return SafetensorError


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class Prepared:
    """Everything train() needs that can be checked before a run folder exists: data, model, method."""
    accelerator: object
    device: torch.device
    precision: str
    base_dtype: torch.dtype
    data: StyleFolder
    components: Components
    method: object
    param_groups: list[dict]


def prepare(cfg: TrainConfig) -> Prepared:
    """Setup phase: read the data, load the base, check the config against it and let the method set
    up its trainable parameters. Writes nothing, so a bad input stops here with nothing created."""
    from accelerate import Accelerator

    device = pick_device(cfg.device)
    precision = pick_precision(cfg.mixed_precision, device)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              cpu=device.type == "cpu")
    torch.manual_seed(cfg.seed)  # LoRA init draws from the global generator
    data = style_folder_for(cfg)
    base_dtype = weight_dtype(precision)  # frozen base in bf16/fp16 on GPU; trainable weights stay fp32
    c = Components.from_pipeline(load_pipeline(cfg.base_model, base_dtype), cfg.prediction_type)
    if c.noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"The base model's scheduler predicts {c.noise_scheduler.config.prediction_type!r}, which "
                          f"this loop cannot train; pass --prediction-type {' or '.join(PREDICTION_TYPES)}.")
    check_resolution(c.vae, c.unet, cfg.resolution)
    if cfg.method == "lora":  # checked here, not deep inside peft, so the message names the flag
        check_lora_targets(c.unet, cfg.unet_target_modules, cfg.rank, "--unet-target-modules")
        if cfg.train_text_encoder:
            check_lora_targets(c.text_encoder, cfg.text_encoder_target_modules, cfg.rank, "--text-encoder-target-modules")
    method = get_method(cfg)
    param_groups = method.setup(c)
    return Prepared(accelerator, accelerator.device, precision, base_dtype, data, c, method, param_groups)


def train(cfg: TrainConfig, run_dir: Path, hooks: list[Hook] = (), prepared: Prepared | None = None) -> TrainResult:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from safetensors.torch import load_file, save_file

    # ─── setup ────────────────────────────────────────────────────────────────────────────────
    prep = prepared or prepare(cfg)
    accelerator, device, precision, base_dtype = prep.accelerator, prep.device, prep.precision, prep.base_dtype
    data, c, method, param_groups = prep.data, prep.components, prep.method, prep.param_groups
    log.info("style %r: %d training images, %d held out for evaluation", data.name, len(data.train), len(data.heldout))
    prediction_type = c.noise_scheduler.config.prediction_type  # checked in prepare()
    n_trainable = sum(p.numel() for g in param_groups for p in g["params"])
    log.info("method %s: %s trainable parameters, precision %s, device %s, world size %d", method.name,
             f"{n_trainable:,}", precision, device, accelerator.num_processes)
    for module in (c.unet, c.vae, c.text_encoder):
        module.to(device)
    if cfg.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
        if not method.frozen_text_encoder:
            c.text_encoder.gradient_checkpointing_enable()
    if device.type == "cuda":
        c.unet.to(memory_format=torch.channels_last)

    # ─── cache what does not train: VAE latents (both flips) and caption embeddings ────────────
    from diffusers.loaders import TextualInversionLoaderMixin

    # tokenize captions exactly as the pipeline tokenizes prompts (a multi-vector TI token expands to its vectors)
    captions = TextualInversionLoaderMixin().maybe_convert_prompt([method.caption(e.caption) for e in data.train],
                                                                  c.tokenizer)
    # the empty prompt rides along as the last row: caption dropout points a sample at it
    tokens = c.tokenizer(captions + [""], padding="max_length", max_length=c.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)
    empty_row = len(captions)
    cache_latents = cfg.cache_latents and cfg.center_crop  # a random crop differs every step
    vae_scale = c.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(tensors: torch.Tensor) -> torch.Tensor:
        return c.vae.encode(tensors.to(device, base_dtype)).latent_dist.sample() * vae_scale

    latent_cache = None
    if cache_latents:
        with torch.no_grad():
            flips = [False, True] if cfg.random_flip else [False]
            latent_cache = torch.stack([
                torch.cat([encode_images(torch.stack([preprocess(e.image, cfg.resolution, flip=f)
                                                      for e in data.train[i:i + 8]]))
                           for i in range(0, len(data.train), 8)]).float()
                for f in flips], dim=1)  # [N, flips, C, h, w]
    text_cache = None
    if method.frozen_text_encoder:
        with torch.no_grad():
            text_cache = torch.cat([c.text_encoder(tokens[i:i + 32])[0] for i in range(0, len(tokens), 32)])
    extra = method.extra_batches(c, encode_images, run_dir)  # e.g. DreamBooth's prior-preservation images
    if latent_cache is not None and device.type == "cuda":
        c.vae.to("cpu")  # nothing left for it to encode during training
    if text_cache is not None and device.type == "cuda":
        c.text_encoder.to("cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # report the training loop's peak, not the caching pass

    # ─── optimizer, schedule, accelerate ─────────────────────────────────────────────────────
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes (GPU only).") from None
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(param_groups, weight_decay=cfg.adam_weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps, num_cycles=cfg.lr_num_cycles)
    trained_modules = [c.unet] + ([] if method.frozen_text_encoder else [c.text_encoder])
    prepared = accelerator.prepare(*trained_modules, optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    text_encoder = prepared[1] if len(prepared) == 3 else c.text_encoder
    prepared_trained = list(prepared[:-1])  # the trained modules as accelerate wrapped them
    accelerator.register_for_checkpointing(lr_scheduler)

    def save_hook(models, weights, output_dir):  # resumable state = trainable tensors only, not the base
        weights.clear()
        save_file(method.trainable_state(c), Path(output_dir) / "trainable.safetensors")

    def load_hook(models, input_dir):
        models.clear()
        method.load_trainable_state(c, load_file(Path(input_dir) / "trainable.safetensors"))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    checkpoints = run_dir / "checkpoints"
    start_step = 0
    if cfg.resume_from_checkpoint:
        start_step = load_resumable_state(accelerator, states_to_try(cfg, run_dir))

    def save_state(step: int) -> Path:
        final = checkpoints / f"{STATE_PREFIX}{step:06d}"
        if accelerator.is_main_process:  # the trainable tensors are the same on every process: one writer
            tmp = checkpoints / f".tmp-{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            accelerator.save_state(str(tmp))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)  # a killed save never looks like a finished state
            for old in sorted(checkpoints.glob(f"{STATE_PREFIX}*"))[:-max(cfg.checkpoints_total_limit, 1)]:
                shutil.rmtree(old, ignore_errors=True)
            for hook in hooks:
                hook.on_checkpoint(step, final)
        accelerator.wait_for_everyone()
        return final

    # ─── the loop ────────────────────────────────────────────────────────────────────────────
    sched = c.noise_scheduler
    n, accum = len(data.train), cfg.gradient_accumulation_steps
    world, rank = accelerator.num_processes, accelerator.process_index
    running_loss, running_count = torch.zeros((), device=device), 0
    draws = Draws(cfg.seed, rank, device, cfg.noise_offset)

    for module in prepared_trained:  # dropout (LoRA's too) acts only in train mode
        module.train()
    progress = tqdm(range(start_step, cfg.max_train_steps), initial=start_step, total=cfg.max_train_steps,
                    desc=f"train {method.name}", unit="step", disable=not accelerator.is_local_main_process)
    t0 = t_first = time.perf_counter()
    for step in progress:
        for micro in range(accum):
            k = step * accum + micro
            # every process draws the same global batch and keeps its own slice of it
            idx = batch_indices(n, cfg.train_batch_size * world, k, cfg.seed)
            idx = idx[rank * cfg.train_batch_size:(rank + 1) * cfg.train_batch_size]
            g = draws.generator(Draws.DATA, k)
            bsz = len(idx)
            idx_t = torch.tensor(idx).to(device, non_blocking=True)  # staged copy: the host does not wait
            if latent_cache is not None:
                latents = latent_cache[idx_t, draws.integers(latent_cache.shape[1], bsz, g)]
            else:  # host-side image work: one read-back of the flips per micro-step, not one per image
                flips = (torch.rand(bsz, generator=g, device=device) < 0.5).tolist() if cfg.random_flip else [False] * bsz
                pix = torch.stack([preprocess(data.train[i].image, cfg.resolution, center_crop=cfg.center_crop,
                                              flip=f, rng=random.Random(_mix(cfg.seed, k, i)))
                                   for i, f in zip(idx, flips)])
                latents = encode_images(pix).float()
            noise = draws.noise(latents.shape, g)
            timesteps = draws.integers(sched.config.num_train_timesteps, bsz, g)
            if extra is not None:  # its own generator: the instance draws stay those of a run without extras
                g_extra = draws.generator(Draws.EXTRA, k)
                extra_idx = draws.integers(len(extra.latents), bsz, g_extra)
                latents = torch.cat([latents, extra.latents[extra_idx]])
                noise = torch.cat([noise, draws.noise((bsz, *latents.shape[1:]), g_extra)])
                timesteps = torch.cat([timesteps, draws.integers(sched.config.num_train_timesteps, bsz, g_extra)])
            with accelerator.accumulate(*prepared_trained):
                noisy = sched.add_noise(latents, noise, timesteps)
                text_idx = idx_t
                if cfg.caption_dropout:  # its own generator, so a run without dropout draws exactly as before
                    dropped = torch.rand(bsz, generator=draws.generator(Draws.DROPOUT, k), device=device)
                    text_idx = torch.where(dropped < cfg.caption_dropout, empty_row, idx_t)  # no mask indexing: no sync
                hidden = text_cache[text_idx] if text_cache is not None else text_encoder(tokens[text_idx])[0]
                if extra is not None:
                    hidden = torch.cat([hidden, extra.hidden[extra_idx % len(extra.hidden)].to(hidden.dtype)])
                with accelerator.autocast():
                    pred = unet(noisy.to(base_dtype), timesteps, hidden.to(base_dtype)).sample
                target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
                loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if cfg.snr_gamma:
                    # min-SNR-gamma: cap the weight of easy (high-SNR) timesteps
                    snr = compute_snr(sched, timesteps)
                    weight = torch.clamp(snr, max=cfg.snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
                    loss = loss * weight
                loss = loss.mean() if extra is None else loss[:bsz].mean() + extra.weight * loss[bsz:].mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_([p for g_ in param_groups for p in g_["params"]], cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running_loss += loss.detach()
            running_count += 1
        lr_scheduler.step()
        done = step + 1
        if done == start_step + 1:
            t_first = time.perf_counter()  # steady-state speed excludes the first step's warm-up
        info = StepInfo(done)
        if done % cfg.log_every == 0 or done == cfg.max_train_steps:
            info.loss = (running_loss / running_count).item()  # the only host sync, every log_every steps
            info.lr = lr_scheduler.get_last_lr()[0]
            running_loss.zero_()
            running_count = 0
            if not math.isfinite(info.loss):
                raise TrainingError(f"Loss became {info.loss} by step {done}; lower --learning-rate or use "
                                    "--mixed-precision no, then resume from the last state in checkpoints/.")
            progress.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}")
            log.info("step %d/%d loss %.5f lr %.3e", done, cfg.max_train_steps, info.loss, info.lr)
        for hook in hooks:
            hook.on_step(info, c)
        if cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0 and done < cfg.max_train_steps:
            if not all(torch.isfinite(p).all() for g_ in param_groups for p in g_["params"]):
                raise TrainingError(f"Weights became NaN/inf by step {done}; lower --learning-rate.")
            save_state(done)
    t_end = time.perf_counter()
    train_seconds = t_end - t0
    progress.close()

    # ─── save ────────────────────────────────────────────────────────────────────────────────
    accelerator.wait_for_everyone()
    artifacts = []
    if accelerator.is_main_process:
        artifacts = method.save(c, checkpoints, config_metadata(cfg, prediction_type))
        log.info("saved %s", ", ".join(str(p) for p in artifacts))
    steps_run = cfg.max_train_steps - start_step
    steady = (steps_run - 1) / (t_end - t_first) if steps_run > 1 else steps_run / train_seconds
    cost = {"train_seconds": train_seconds, "steps_per_second": steady,
            "peak_memory_mb": peak_memory_mb(device), "trainable_params": n_trainable,
            "artifact_bytes": sum(p.stat().st_size for p in artifacts)}
    for module in prepared_trained:
        module.eval()
    result = TrainResult(c, method, data, artifacts, cost)
    for hook in hooks:
        hook.on_end(result)
    return result


# ─── hooks that plug tracking in ─────────────────────────────────────────────────────────────
class MLflowHook:
    def __init__(self, tracker):
        self.tracker = tracker

    def on_step(self, info: StepInfo, components: Components) -> None:
        if info.loss is not None:
            self.tracker.log_metrics({"train.loss": info.loss, "train.lr": info.lr}, step=info.step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        log.info("resumable state saved: %s", path)

    def on_end(self, result: TrainResult) -> None:
        self.tracker.log_metrics({f"cost.{k}": float(v) for k, v in result.cost.items()})


def sample_in_training(cfg: TrainConfig, c: Components, jobs: list, desc: str) -> list:
    """Images from the components as they are mid-training (adapter in place), for validation strips and a
    search's intermediate score. Sampling must not change training: modules offloaded to the CPU go back
    there, and train/eval modes are restored (sampling runs in eval mode, so LoRA dropout is off)."""
    from research.sample import generate_while_training, training_pipeline

    device = c.unet.device
    places = {m: next(m.parameters()).device for m in (c.vae, c.text_encoder)}
    modes = {m: m.training for m in (c.unet, c.vae, c.text_encoder)}
    try:
        for module in places:
            module.to(device)
        for module in modes:
            module.eval()
        pipe = training_pipeline(c, cfg.sampler)
        return generate_while_training(pipe, jobs, cfg, desc, prompt_fn=get_method(cfg).caption)
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
        from research.sample import Job

        jobs = [Job(i, p, self.cfg.seed) for i, p in enumerate(self.prompts)]
        for job, image in zip(jobs, sample_in_training(self.cfg, c, jobs, "validation")):
            self.tracker.log_image(image, job.file_name, step=info.step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_end(self, result: TrainResult) -> None:
        pass


# ─── the whole run: folder, tracking, train, sample, evaluate ───────────────────────────────
def run(cfg: TrainConfig, track: bool = True, tags: dict[str, str] | None = None, hooks: list[Hook] = ()) -> Path:
    """Check everything (inputs, model, store, resume), then create the run folder and MLflow run, train,
    sample and evaluate. A refused run leaves nothing behind; a started one always ends with a status.
    hooks: more training hooks (a search's pruning reporter) beside tracking and validation.

    Under `accelerate launch` / `torchrun` every process trains its share of each batch; only the main
    process owns the run folder, MLflow, samples and metrics.
    """
    from accelerate import PartialState

    from research.tracking import FILE_ONLY, check_store_writable, early_records, setup_logging

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
        log.error("run failed: %s: %s", type(err).__name__, err, exc_info=not _is_user_error(err),
                  extra=FILE_ONLY)
        tracker.fail(f"{type(err).__name__}: {err}")
        raise
    return run_dir


def _claim_run_dir(cfg: TrainConfig) -> Path:
    from research.tracking import new_run_dir

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


def _start_records(cfg: TrainConfig, run_dir: Path, track: bool, tags: dict | None, resume: bool,
                   checks_log: list[logging.LogRecord]):
    from research.tracking import SUBDIRS, Tracker, setup_logging

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


def _train_sample_evaluate(cfg: TrainConfig, run_dir: Path, tracker, prepared: Prepared, hooks=()) -> None:
    from research.sample import sample_run
    from research.tracking import FILE_ONLY, flatten_metrics, write_metrics

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
    metrics = {"n_images": len(samples["jobs"]), "adapter": {}, "baseline": {}, "delta": {}, "cost": result.cost}
    log.info("evaluating %s against %d held-out images", cfg.metrics, len(result.data.heldout))
    metrics.update(evaluate_samples(cfg, samples, [e.image for e in result.data.heldout], device))
    write_metrics(run_dir, metrics)
    # logs.txt keeps the table; the console gets it once, from main()
    log.info("metrics written to %s\n%s", run_dir / "metrics.json", format_table(metrics), extra=FILE_ONLY)
    tracker.log_metrics(flatten_metrics({k: v for k, v in metrics.items() if k != "cost"}))
    # large full-model checkpoints (DreamBooth's UNet) stay once, in the run folder; MLflow gets the
    # pointer file the method writes beside them instead of a second multi-GB copy
    stored_once = tuple(f"checkpoints/{p}" for p in result.method.stored_once)
    tracker.log_folder(skip=(f"checkpoints/{STATE_PREFIX}", *stored_once))
    tracker.finish("FINISHED")


def _is_user_error(err: BaseException) -> bool:
    return isinstance(err, USER_ERRORS) or (isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS)


# ─── resume: only what ran ───────────────────────────────────────────────────────────────────
def resumed_config(values: dict) -> TrainConfig:
    """A resume's config is the run's own config.json; the values given on top are kept so that
    check_resume can name every one that would change the run."""
    from research.config import read_config_file

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
    from research.tracking import process_alive, read_record

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


def _shared_run_dir(cfg: TrainConfig, processes) -> Path:
    """The main process claims the run folder; the others are told it, so all write one run."""
    from accelerate.utils import broadcast_object_list

    path = [str(_claim_run_dir(cfg)) if processes.is_main_process else None]
    if processes.num_processes > 1:
        broadcast_object_list(path)
    return Path(path[0])


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m research.train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--no-tracking", action="store_true", help="write the run folder only, no MLflow run")
    return parser


@contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise RunInterrupted in the main thread, so the run ends through its own
    bookkeeping (state kept, status KILLED); a second signal during that cleanup is ignored."""
    def handler(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise RunInterrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with stop_on_signals():
            values = given_values(args)
            resume = bool(values.get("resume_from_checkpoint"))
            cfg = resumed_config(values) if resume else TrainConfig.from_dict(values, source="command line")
            run_dir = run(cfg, track=not args.no_tracking)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        print(f"error: {stop.reason or f'stopped by {stop.signal_name} before the run started; nothing was written'}",
              file=sys.stderr)
        return 128 + signal.Signals[stop.signal_name].value
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"error: {err.strerror} ({err.filename or 'while writing'}); free space or fix permissions, then "
              "continue with --run-dir <the run folder> --resume-from-checkpoint latest.", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0  # the main process reports the run
    print("\n" + format_table(json.loads((run_dir / "metrics.json").read_text())))
    print(f"\nDone. Run folder: {run_dir}\n  strips:  {run_dir / 'thumbnails'}\n  metrics: {run_dir / 'metrics.json'}"
          f"\n  browse:  make ui  (MLflow on http://127.0.0.1:5000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
