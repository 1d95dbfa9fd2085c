"""The one training loop, for every method, read top to bottom as named phases:

    prepare (data, base model, method)  ->  place_modules  ->  cache_inputs (latents, caption embeddings,
    a method's extra batches)  ->  build_optimizer (optimizer, schedule, accelerate, resumable state)
    ->  resume  ->  run_steps (draw_batch, batch_loss, one optimizer step, logs, hooks, states)  ->  save

The method (research/methods) decides which parameters train and how they are saved; this loop only
noises latents, predicts, weights the loss and steps. Sampling, evaluation and MLflow plug in through
hooks (on_step, on_checkpoint, on_end; research/training/hooks.py). The loop floor: it sits on the
methods and the blocks, and the experiments sit on it.
"""

from __future__ import annotations

import logging
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from research.config import TrainConfig
from research.data import StyleFolder, preprocess, style_folder_for
from research.errors import ConfigError, TrainingError
from research.methods import Components, ExtraBatches, config_metadata, encode_images, get_method
from research.methods.base import vae_latents
from research.models import (PREDICTION_TYPES, check_lora_targets, check_resolution, load_pipeline, min_snr_weight,
                             pick_device, pick_precision, weight_dtype)
from research.training.checkpoints import load_resumable_state, register_trainable_state, save_state, states_to_try
from research.training.draws import Draws, batch_indices, mix_seeds

log = logging.getLogger("research")
TEXT_BATCH = 32  # captions per text-encoder call when their embeddings are cached


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


class Hook(Protocol):
    def on_step(self, info: StepInfo, components: Components) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_end(self, result: TrainResult) -> None: ...


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ─── setup: everything that can be checked before a run folder exists ────────────────────────
@dataclass
class Prepared:
    """Everything train() needs that can be checked before a run folder exists: data, model, method."""
    accelerator: Accelerator
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


def place_modules(cfg: TrainConfig, prep: Prepared) -> int:
    """Put the models on the training device with the memory options asked for; returns the trainable size."""
    c, device = prep.components, prep.device
    log.info("style %r: %d training images, %d held out for evaluation", prep.data.name, len(prep.data.train),
             len(prep.data.heldout))
    n_trainable = sum(p.numel() for g in prep.param_groups for p in g["params"])
    log.info("method %s: %s trainable parameters, precision %s, device %s, world size %d", prep.method.name,
             f"{n_trainable:,}", prep.precision, device, prep.accelerator.num_processes)
    for module in (c.unet, c.vae, c.text_encoder):
        module.to(device)
    if cfg.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
        if not prep.method.caches_text_embeddings:
            c.text_encoder.gradient_checkpointing_enable()
    if device.type == "cuda":
        c.unet.to(memory_format=torch.channels_last)
    return n_trainable


# ─── cache what does not train: VAE latents (both flips) and caption embeddings ──────────────
@dataclass
class Inputs:
    """What every step reads: caption tokens, and whatever could be computed once instead of every step."""
    tokens: torch.Tensor  # caption token ids, one row per training image, the empty prompt as the last row
    empty_row: int  # the empty prompt's row: caption dropout points a sample at it
    latents: torch.Tensor | None  # [N, flips, C, h, w] cached latents; None = encode every step
    text: torch.Tensor | None  # [N + 1, L, D] cached caption embeddings; None = encode every step
    extra: ExtraBatches | None  # a method's extra examples (DreamBooth's prior preservation)


def cache_inputs(cfg: TrainConfig, prep: Prepared, run_dir: Path) -> Inputs:
    c, method, data, device = prep.components, prep.method, prep.data, prep.device
    # tokenize captions exactly as the pipeline tokenizes prompts (a multi-vector TI token expands to its vectors)
    captions = TextualInversionLoaderMixin().maybe_convert_prompt([method.caption(e.caption) for e in data.train],
                                                                  c.tokenizer)
    tokens = c.tokenizer(captions + [""], padding="max_length", max_length=c.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)
    latents = None
    if cfg.cache_latents and cfg.center_crop:  # a random crop differs every step
        flips = [False, True] if cfg.random_flip else [False]
        images = [e.image for e in data.train]
        latents = torch.stack([encode_images(c.vae, images, cfg.resolution, flip=f) for f in flips], dim=1)
    text = None
    if method.caches_text_embeddings:
        with torch.no_grad():
            text = torch.cat([c.text_encoder(tokens[i:i + TEXT_BATCH])[0] for i in range(0, len(tokens), TEXT_BATCH)])
    extra = method.extra_batches(c, run_dir)  # e.g. DreamBooth's prior-preservation images
    if latents is not None and device.type == "cuda":
        c.vae.to("cpu")  # nothing left for it to encode during training
    if text is not None and device.type == "cuda":
        c.text_encoder.to("cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # report the training loop's peak, not the caching pass
    return Inputs(tokens, len(captions), latents, text, extra)


# ─── optimizer, schedule, accelerate ─────────────────────────────────────────────────────────
@dataclass
class Optimization:
    """The optimizer and schedule, and the trained modules as accelerate wrapped them."""
    optimizer: object
    lr_scheduler: object
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    trained: list  # the wrapped modules that train (the UNet, and the text encoder where it trains)
    params: list  # every trainable tensor, for clipping and the finite-weights check


def build_optimizer(cfg: TrainConfig, prep: Prepared) -> Optimization:
    c, method, accelerator = prep.components, prep.method, prep.accelerator
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # optional and GPU-only: imported only when asked for
        except ImportError:
            raise ConfigError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes (GPU only).") from None
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(prep.param_groups, weight_decay=cfg.adam_weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps, num_cycles=cfg.lr_num_cycles)
    trained_modules = [c.unet] + ([] if method.caches_text_embeddings else [c.text_encoder])
    wrapped = accelerator.prepare(*trained_modules, optimizer)
    text_encoder = wrapped[1] if len(wrapped) == 3 else c.text_encoder
    accelerator.register_for_checkpointing(lr_scheduler)
    register_trainable_state(accelerator, method, c)
    params = [p for g in prep.param_groups for p in g["params"]]
    return Optimization(wrapped[-1], lr_scheduler, wrapped[0], text_encoder, list(wrapped[:-1]), params)


# ─── one step ────────────────────────────────────────────────────────────────────────────────
@dataclass
class Batch:
    """One micro-batch on the device: this process's instance examples, then as many extra examples."""
    idx: torch.Tensor  # the instance examples' rows in Inputs.tokens / Inputs.text
    size: int  # instance examples (the extra ones follow them)
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    extra_idx: torch.Tensor | None = None


def draw_batch(cfg: TrainConfig, prep: Prepared, inputs: Inputs, draws: Draws, k: int) -> Batch:
    """Micro-step k's examples, latents, noise and timesteps, from (seed, process, k) alone."""
    accelerator, device, sched = prep.accelerator, prep.device, prep.components.noise_scheduler
    world, rank = accelerator.num_processes, accelerator.process_index
    # every process draws the same global batch and keeps its own slice of it
    idx = batch_indices(len(prep.data.train), cfg.train_batch_size * world, k, cfg.seed)
    idx = idx[rank * cfg.train_batch_size:(rank + 1) * cfg.train_batch_size]
    g = draws.generator(Draws.DATA, k)
    bsz = len(idx)
    idx_t = torch.tensor(idx).to(device, non_blocking=True)  # staged copy: the host does not wait
    if inputs.latents is not None:
        latents = inputs.latents[idx_t, draws.integers(inputs.latents.shape[1], bsz, g)]
    else:  # host-side image work: one read-back of the flips per micro-step, not one per image
        flips = (torch.rand(bsz, generator=g, device=device) < 0.5).tolist() if cfg.random_flip else [False] * bsz
        pix = torch.stack([preprocess(prep.data.train[i].image, cfg.resolution, center_crop=cfg.center_crop,
                                      flip=f, rng=random.Random(mix_seeds(cfg.seed, k, i)))
                           for i, f in zip(idx, flips)])
        latents = vae_latents(prep.components.vae, pix).float()
    batch = Batch(idx_t, bsz, latents, draws.noise(latents.shape, g),
                  draws.integers(sched.config.num_train_timesteps, bsz, g))
    if inputs.extra is not None:  # its own generator: the instance draws stay those of a run without extras
        g_extra = draws.generator(Draws.EXTRA, k)
        batch.extra_idx = draws.integers(len(inputs.extra.latents), bsz, g_extra)
        batch.latents = torch.cat([latents, inputs.extra.latents[batch.extra_idx]])
        batch.noise = torch.cat([batch.noise, draws.noise((bsz, *latents.shape[1:]), g_extra)])
        batch.timesteps = torch.cat([batch.timesteps, draws.integers(sched.config.num_train_timesteps, bsz, g_extra)])
    return batch


def caption_embeddings(cfg: TrainConfig, prep: Prepared, inputs: Inputs, opt: Optimization, batch: Batch,
                       draws: Draws, k: int) -> torch.Tensor:
    """The batch's text conditioning: cached or encoded now, some captions dropped to the empty prompt."""
    text_idx = batch.idx
    if cfg.caption_dropout:  # its own generator, so a run without dropout draws exactly as before
        dropped = torch.rand(batch.size, generator=draws.generator(Draws.DROPOUT, k), device=prep.device)
        text_idx = torch.where(dropped < cfg.caption_dropout, inputs.empty_row, batch.idx)  # no mask indexing: no sync
    hidden = inputs.text[text_idx] if inputs.text is not None else opt.text_encoder(inputs.tokens[text_idx])[0]
    if inputs.extra is not None:
        hidden = torch.cat([hidden, inputs.extra.hidden[batch.extra_idx % len(inputs.extra.hidden)].to(hidden.dtype)])
    return hidden


def batch_loss(cfg: TrainConfig, prep: Prepared, inputs: Inputs, opt: Optimization, batch: Batch, draws: Draws,
               k: int) -> torch.Tensor:
    """Noise the latents, predict, and weight the loss (min-SNR; extra examples with their own weight)."""
    sched, base_dtype = prep.components.noise_scheduler, prep.base_dtype
    prediction_type = sched.config.prediction_type  # checked in prepare()
    noisy = sched.add_noise(batch.latents, batch.noise, batch.timesteps)
    hidden = caption_embeddings(cfg, prep, inputs, opt, batch, draws, k)
    with prep.accelerator.autocast():
        pred = opt.unet(noisy.to(base_dtype), batch.timesteps, hidden.to(base_dtype)).sample
    target = batch.noise if prediction_type == "epsilon" else sched.get_velocity(batch.latents, batch.noise,
                                                                                  batch.timesteps)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma:
        loss = loss * min_snr_weight(sched, batch.timesteps, cfg.snr_gamma, prediction_type)
    if inputs.extra is None:
        return loss.mean()
    return loss[:batch.size].mean() + inputs.extra.weight * loss[batch.size:].mean()


def micro_step(cfg: TrainConfig, prep: Prepared, inputs: Inputs, opt: Optimization, draws: Draws,
               k: int) -> torch.Tensor:
    """Forward, backward and (when accelerate says the accumulation is complete) the optimizer step."""
    accelerator = prep.accelerator
    batch = draw_batch(cfg, prep, inputs, draws, k)
    with accelerator.accumulate(*opt.trained):
        loss = batch_loss(cfg, prep, inputs, opt, batch, draws, k)
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.max_grad_norm:
            accelerator.clip_grad_norm_(opt.params, cfg.max_grad_norm)
        opt.optimizer.step()
        opt.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ─── the loop ────────────────────────────────────────────────────────────────────────────────
class RunningLoss:
    """Micro-step losses summed on the device since the last log: reading it is the loop's only host sync."""

    def __init__(self, device: torch.device):
        self.total, self.count = torch.zeros((), device=device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.count += 1

    def take(self) -> float:
        mean = (self.total / self.count).item()
        self.total.zero_()
        self.count = 0
        return mean


def report_step(cfg: TrainConfig, done: int, running: RunningLoss, opt: Optimization, progress) -> StepInfo:
    """The step's StepInfo; on log steps with the mean loss and learning rate, refused if the loss is not finite."""
    info = StepInfo(done)
    if done % cfg.log_every == 0 or done == cfg.max_train_steps:
        info.loss = running.take()
        info.lr = opt.lr_scheduler.get_last_lr()[0]
        if not math.isfinite(info.loss):
            raise TrainingError(f"Loss became {info.loss} by step {done}; lower --learning-rate or use "
                                "--mixed-precision no, then resume from the last state in checkpoints/.")
        progress.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}")
        log.info("step %d/%d loss %.5f lr %.3e", done, cfg.max_train_steps, info.loss, info.lr)
    return info


def run_steps(cfg: TrainConfig, prep: Prepared, inputs: Inputs, opt: Optimization, start_step: int,
              hooks, checkpoints: Path) -> tuple[float, float, float]:
    """Optimizer steps start_step..max_train_steps, with logs, hooks and resumable states on the way.
    Returns the clock at the start, after the first step (warm-up) and at the end."""
    accelerator, accum = prep.accelerator, cfg.gradient_accumulation_steps
    draws = Draws(cfg.seed, accelerator.process_index, prep.device, cfg.noise_offset)
    running = RunningLoss(prep.device)
    for module in opt.trained:  # dropout (LoRA's too) acts only in train mode
        module.train()
    progress = tqdm(range(start_step, cfg.max_train_steps), initial=start_step, total=cfg.max_train_steps,
                    desc=f"train {prep.method.name}", unit="step", disable=not accelerator.is_local_main_process)
    t0 = t_first = time.perf_counter()
    for step in progress:
        for micro in range(accum):
            running.add(micro_step(cfg, prep, inputs, opt, draws, step * accum + micro))
        opt.lr_scheduler.step()
        done = step + 1
        if done == start_step + 1:
            t_first = time.perf_counter()  # steady-state speed excludes the first step's warm-up
        info = report_step(cfg, done, running, opt, progress)
        for hook in hooks:
            hook.on_step(info, prep.components)
        if cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0 and done < cfg.max_train_steps:
            if not all(torch.isfinite(p).all() for p in opt.params):
                raise TrainingError(f"Weights became NaN/inf by step {done}; lower --learning-rate.")
            save_state(accelerator, checkpoints, done, cfg.checkpoints_total_limit, hooks)
    t_end = time.perf_counter()
    progress.close()
    return t0, t_first, t_end


# ─── save ────────────────────────────────────────────────────────────────────────────────────
def save_artifacts(cfg: TrainConfig, prep: Prepared, checkpoints: Path) -> list[Path]:
    """The shipped adapter, written once (by the main process) with the resolved config in its metadata."""
    prep.accelerator.wait_for_everyone()
    if not prep.accelerator.is_main_process:
        return []
    prediction_type = prep.components.noise_scheduler.config.prediction_type
    artifacts = prep.method.save(prep.components, checkpoints, config_metadata(cfg, prediction_type))
    log.info("saved %s", ", ".join(str(p) for p in artifacts))
    return artifacts


def training_cost(cfg: TrainConfig, start_step: int, clock: tuple[float, float, float], device: torch.device,
                  n_trainable: int, artifacts: list[Path]) -> dict:
    t0, t_first, t_end = clock
    train_seconds = t_end - t0
    steps_run = cfg.max_train_steps - start_step
    steady = (steps_run - 1) / (t_end - t_first) if steps_run > 1 else steps_run / train_seconds
    return {"train_seconds": train_seconds, "steps_per_second": steady, "peak_memory_mb": peak_memory_mb(device),
            "trainable_params": n_trainable, "artifact_bytes": sum(p.stat().st_size for p in artifacts)}


def train(cfg: TrainConfig, run_dir: Path, hooks: list[Hook] = (), prepared: Prepared | None = None) -> TrainResult:
    """Train the method cfg names on its style folder, writing resumable states and the adapter under
    run_dir/checkpoints; `prepared` is prepare(cfg) when the caller checked the inputs already."""
    prep = prepared or prepare(cfg)
    n_trainable = place_modules(cfg, prep)
    inputs = cache_inputs(cfg, prep, run_dir)
    opt = build_optimizer(cfg, prep)
    checkpoints = run_dir / "checkpoints"
    start_step = 0
    if cfg.resume_from_checkpoint:
        start_step = load_resumable_state(prep.accelerator, states_to_try(cfg, run_dir))
    clock = run_steps(cfg, prep, inputs, opt, start_step, hooks, checkpoints)
    artifacts = save_artifacts(cfg, prep, checkpoints)
    cost = training_cost(cfg, start_step, clock, prep.device, n_trainable, artifacts)
    for module in opt.trained:
        module.eval()
    result = TrainResult(prep.components, prep.method, prep.data, artifacts, cost)
    for hook in hooks:
        hook.on_end(result)
    return result
