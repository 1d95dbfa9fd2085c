"""Train a style adapter on a folder of images: the one training loop, for every method.

    python -m research.train --style-dir data/ghibli --rank 16
    python -m research.train --config research/configs/toy.json          # the embedded toy default
    python -m research.train --run-dir runs/exp1/<run> --resume-from-checkpoint latest

The method (research/methods) decides which parameters train and how they are saved; this loop
only noises latents, predicts, weights the loss and steps. Sampling, evaluation and MLflow plug in
through hooks (on_step, on_checkpoint, on_end).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from research.atomic import write_json
from research.config import ConfigError, TrainConfig, add_config_arguments, config_from_args
from research.data import DataError, preprocess, read_validation_prompts, style_folder_for
from research.methods import Components, config_metadata, get_method
from research.models import ModelNotFoundError, load_pipeline, pick_device, pick_precision, weight_dtype

log = logging.getLogger("research")
STATE_PREFIX = "state-"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. NaN loss); the message says what to change."""


class StopTraining(Exception):
    """A hook ends the run early on purpose (a search prunes a trial): the run is KILLED, not FAILED."""


USER_ERRORS = (ConfigError, DataError, ModelNotFoundError, TrainingError)


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


def latest_state(checkpoints: Path) -> Path | None:
    states = sorted(p for p in checkpoints.glob(f"{STATE_PREFIX}*") if p.is_dir() and p.name[len(STATE_PREFIX):].isdigit())
    return states[-1] if states else None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(cfg: TrainConfig, run_dir: Path, hooks: list[Hook] = ()) -> TrainResult:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from safetensors.torch import load_file, save_file

    # ─── setup ────────────────────────────────────────────────────────────────────────────────
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.mixed_precision, device)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              cpu=device.type == "cpu")
    device = accelerator.device
    torch.manual_seed(cfg.seed)  # LoRA init draws from the global generator
    data = style_folder_for(cfg)
    log.info("style %r: %d training images, %d held out for evaluation", data.name, len(data.train), len(data.heldout))
    base_dtype = weight_dtype(precision)  # frozen base in bf16/fp16 on GPU; trainable weights stay fp32
    c = Components.from_pipeline(load_pipeline(cfg.base_model, base_dtype))
    if cfg.prediction_type:
        c.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
    method = get_method(cfg)
    param_groups = method.setup(c)
    n_trainable = sum(p.numel() for g in param_groups for p in g["params"])
    log.info("method %s: %s trainable parameters, precision %s, device %s", method.name, f"{n_trainable:,}", precision, device)
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
        state = latest_state(checkpoints) if cfg.resume_from_checkpoint == "latest" else Path(cfg.resume_from_checkpoint)
        if state is None or not state.is_dir():
            raise ConfigError(f"No resumable state {cfg.resume_from_checkpoint!r} in {checkpoints}; "
                              "drop --resume-from-checkpoint to start fresh.")
        accelerator.load_state(str(state))
        start_step = int(state.name[len(STATE_PREFIX):])
        log.info("resumed from %s at step %d", state, start_step)

    def save_state(step: int) -> Path:
        final = checkpoints / f"{STATE_PREFIX}{step:06d}"
        tmp = checkpoints / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.save_state(str(tmp))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a killed save never looks like a finished state
        for old in sorted(checkpoints.glob(f"{STATE_PREFIX}*"))[:-max(cfg.checkpoints_total_limit, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        for hook in hooks:
            hook.on_checkpoint(step, final)
        return final

    # ─── the loop ────────────────────────────────────────────────────────────────────────────
    sched = c.noise_scheduler
    prediction_type = sched.config.prediction_type
    n, accum = len(data.train), cfg.gradient_accumulation_steps
    world, rank = accelerator.num_processes, accelerator.process_index
    running_loss, running_count = torch.zeros((), device=device), 0

    def draw_noise(shape, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(shape, generator=gen)
        if cfg.noise_offset:
            noise += cfg.noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=gen)
        return noise

    unet.train()
    progress = tqdm(range(start_step, cfg.max_train_steps), initial=start_step, total=cfg.max_train_steps,
                    desc=f"train {method.name}", unit="step", disable=not accelerator.is_local_main_process)
    t0 = t_first = time.perf_counter()
    for step in progress:
        for micro in range(accum):
            k = step * accum + micro
            # every process draws the same global batch and keeps its own slice of it
            idx = batch_indices(n, cfg.train_batch_size * world, k, cfg.seed)
            idx = idx[rank * cfg.train_batch_size:(rank + 1) * cfg.train_batch_size]
            g = torch.Generator().manual_seed(_mix(cfg.seed, k, 7))
            bsz = len(idx)
            if latent_cache is not None:
                flip = torch.randint(0, latent_cache.shape[1], (bsz,), generator=g)
                latents = latent_cache[idx, flip]
            else:
                pix = torch.stack([preprocess(data.train[i].image, cfg.resolution, center_crop=cfg.center_crop,
                                              flip=cfg.random_flip and bool(torch.rand((), generator=g) < 0.5),
                                              rng=random.Random(_mix(cfg.seed, k, i)))
                                   for i in idx])
                latents = encode_images(pix).float()
            noise = draw_noise(latents.shape, g)
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (bsz,), generator=g)
            if extra is not None:  # its own generator: the instance draws stay those of a run without extras
                g_extra = torch.Generator().manual_seed(_mix(cfg.seed, k, 11))
                extra_idx = torch.randint(0, len(extra.latents), (bsz,), generator=g_extra)
                latents = torch.cat([latents, extra.latents[extra_idx]])
                noise = torch.cat([noise, draw_noise((bsz, *latents.shape[1:]), g_extra)])
                timesteps = torch.cat([timesteps, torch.randint(0, sched.config.num_train_timesteps, (bsz,),
                                                                generator=g_extra)])
            noise, timesteps = noise.to(device), timesteps.to(device)
            with accelerator.accumulate(*trained_modules):
                noisy = sched.add_noise(latents, noise, timesteps)
                text_idx = torch.tensor(idx)
                if cfg.caption_dropout:  # its own generator, so a run without dropout draws exactly as before
                    g_drop = torch.Generator().manual_seed(_mix(cfg.seed, k, 13))
                    text_idx[torch.rand(bsz, generator=g_drop) < cfg.caption_dropout] = empty_row
                if text_cache is not None:
                    hidden = text_cache[text_idx.to(text_cache.device)]
                else:
                    hidden = text_encoder(tokens[text_idx.to(device)])[0]
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
        artifacts = method.save(c, checkpoints, config_metadata(cfg))
        log.info("saved %s", ", ".join(str(p) for p in artifacts))
    steps_run = cfg.max_train_steps - start_step
    steady = (steps_run - 1) / (t_end - t_first) if steps_run > 1 else steps_run / train_seconds
    cost = {"train_seconds": train_seconds, "steps_per_second": steady,
            "peak_memory_mb": peak_memory_mb(device), "trainable_params": n_trainable,
            "artifact_bytes": sum(p.stat().st_size for p in artifacts)}
    unet.eval()
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
    """Images from the components as they are mid-training (adapter in place), then back to train mode."""
    from diffusers import StableDiffusionPipeline

    from research.models import make_sampler
    from research.sample import generate

    device = c.unet.device
    pipe = StableDiffusionPipeline(vae=c.vae.to(device), text_encoder=c.text_encoder.to(device),
                                   tokenizer=c.tokenizer, unet=c.unet, scheduler=c.noise_scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = make_sampler(pipe, cfg.sampler)
    pipe.set_progress_bar_config(disable=True)
    half = c.vae.dtype != torch.float32  # fp32 trainable weights inside a bf16/fp16 base: sample as training runs
    with torch.autocast(device.type, dtype=c.vae.dtype, enabled=half and device.type == "cuda"):
        images = generate(pipe, jobs, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                          resolution=cfg.resolution, batch_size=cfg.sample_batch_size, desc=desc,
                          prompt_fn=get_method(cfg).caption)
    c.unet.train()
    return images


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
    from research.sample import sample_run
    from research.tracking import SUBDIRS, Tracker, flatten_metrics, new_run_dir, setup_logging, write_metrics

    if not Path(cfg.style_dir).is_dir():  # fail before a run folder or MLflow run exists
        raise DataError(f"Style folder {cfg.style_dir} does not exist; pass a folder of images with --style-dir.")
    run_dir = Path(cfg.run_dir) if cfg.run_dir else new_run_dir(cfg.output_dir, cfg.experiment, cfg.resolved_run_name())
    for sub in SUBDIRS:
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir / "logs.txt")
    write_json(run_dir / "config.json", cfg.to_dict())
    tags = {"experiment": cfg.experiment, "method": cfg.method, "style": cfg.resolved_style_name(),
            "base_model": cfg.base_model, "run_dir": str(run_dir), **(tags or {})}
    tracker = Tracker(run_dir, cfg.experiment, cfg.resolved_run_name(), tags, enabled=track)
    log.info("run folder %s%s", run_dir, f" (MLflow run {tracker.run_id})" if tracker.run_id else "")
    try:
        tracker.log_params(cfg.to_dict())
        prompts = read_validation_prompts(Path(cfg.style_dir), cfg.resolved_style_name(), cfg.validation_prompts_file)
        result = train(cfg, run_dir, hooks=[MLflowHook(tracker), ValidationHook(cfg, tracker, prompts), *hooks])
        # free the training graph, then sample through the saved file, the way a user loads it
        device = result.components.unet.device
        del result.components
        pipe = load_pipeline(cfg.base_model, weight_dtype(pick_precision(cfg.mixed_precision, device))).to(device)
        samples = sample_run(run_dir, cfg, result.method, prompts=result.data.validation_prompts, base_pipe=pipe)
        metrics = {"n_images": len(samples["jobs"]), "adapter": {}, "baseline": {}, "cost": result.cost}
        metrics.update(_evaluate(cfg, samples, result.data, device))
        write_metrics(run_dir, metrics)
        tracker.log_metrics(flatten_metrics({k: v for k, v in metrics.items() if k != "cost"}))
        # large full-model checkpoints (DreamBooth's UNet) stay once, in the run folder; MLflow gets the
        # pointer file the method writes beside them instead of a second multi-GB copy
        stored_once = tuple(f"checkpoints/{p}" for p in result.method.stored_once)
        tracker.log_folder(skip=(f"checkpoints/{STATE_PREFIX}", *stored_once))
        tracker.finish("FINISHED")
    except USER_ERRORS as err:
        log.error("%s", err)  # the user's input, not a bug: one line, no traceback
        tracker.fail()
        raise
    except StopTraining as err:
        log.info("stopped early: %s", err)
        tracker.finish("KILLED")  # its params and the metrics logged so far stay with the run
        raise
    except BaseException:
        log.exception("run failed")
        tracker.fail()
        raise
    return run_dir


def _evaluate(cfg: TrainConfig, samples: dict, data, device) -> dict:
    """Adapter and baseline metrics against the held-out references (research/evaluate.py)."""
    from research.evaluate import evaluate_samples

    return evaluate_samples(cfg, samples, [e.image for e in data.heldout], device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m research.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--no-tracking", action="store_true", help="write the run folder only, no MLflow run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        run_dir = run(cfg, track=not args.no_tracking)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from research.evaluate import format_table

    print("\n" + format_table(json.loads((run_dir / "metrics.json").read_text())))
    print(f"\nDone. Run folder: {run_dir}\n  strips:  {run_dir / 'thumbnails'}\n  metrics: {run_dir / 'metrics.json'}"
          f"\n  browse:  make ui  (MLflow on http://127.0.0.1:5000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
