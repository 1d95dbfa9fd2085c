"""What `make bench` measures: training speed beside the plain reference loop and the machine's limit.

Our training step (research.training.loop.train, the real loop, with its cached latents and text
embeddings) and the reference loop (reference_loop, the plain diffusers-example style) train the
same LoRA on the same model, images and batch in one process, in alternating order round after
round, so the machine's drift and other users' load fall on both alike. Each arm's peak memory is
measured in a fresh process of its own. FLOPs of one training step are counted with torch's
FlopCounterMode and set against this machine's measured dense matmul rate (fp32 on CPU with the
threads in use, bf16 on GPU): model FLOP utilisation. Then: sampling and evaluation images/s, and
time per step as the dataset, the resolution and the LoRA rank grow.

Every number is a mean over n rounds (or steps, or batches) with a 95% t-interval
(research.metrics.stats.summarize). `run_bench` runs them all; research/bench.py is the command line
and publish writes the results.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from research.benchmarking.evaluation_speed import time_evaluation
from research.benchmarking.reference_loop import reference_train
from research.config import TrainConfig
from research.data import style_folder_for
from research.methods import get_method
from research.metrics.stats import summarize
from research.models import load_pipeline, make_sampler, pick_device, pick_precision, weight_dtype
from research.random_models import build_random_pipeline
from research.sampling import generate, plan_jobs
from research.training.loop import train

ARMS = ("ours", "reference")
GROWTH = {"cpu": dict(dataset_size=[16, 64, 256], resolution=[64, 128, 256], rank=[4, 8, 32]),
          "cuda": dict(dataset_size=[16, 64, 256], resolution=[256, 512, 768], rank=[4, 16, 64])}
PARTS = ("memory", "sampling", "evaluation", "growth")


def make_style_folder(folder: Path, n: int, size: int) -> Path:
    """n random-pattern images at the training size (no captions: the caption template applies)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


@dataclass
class Bench:
    """What every measurement shares: the parsed flags, the device, the model folder, scratch space."""

    args: argparse.Namespace
    device: torch.device
    model: str
    tmp: Path

    def config(self, steps: int, dataset_size: int | None = None, resolution: int | None = None,
               rank: int | None = None) -> TrainConfig:
        """The --config recipe (targets, batch, loss) at this size; LoRA alpha follows rank at the recipe's ratio."""
        recipe = TrainConfig.from_json_file(self.args.config)
        n, res, r = dataset_size or self.args.dataset_size, resolution or self.resolution, rank or self.rank
        style = self.tmp / "data" / f"n{n}_{res}px" / "style"
        if not style.is_dir():
            make_style_folder(style, n, res)
        values = dict(recipe.to_dict(), style_dir=str(style), base_model=self.model, resolution=res, rank=r,
                      lora_alpha=r * recipe.lora_alpha / recipe.rank, train_batch_size=self.batch_size,
                      max_train_steps=steps, lr_warmup_steps=0, holdout_fraction=0.0, checkpointing_steps=0,
                      validation_steps=0, device=self.args.device, mixed_precision=self.args.mixed_precision,
                      output_dir=str(self.tmp / "runs"))
        return TrainConfig.from_dict(values, source="bench config")

    @property
    def recipe(self) -> TrainConfig:
        return TrainConfig.from_json_file(self.args.config)

    @property
    def resolution(self) -> int:
        return self.args.resolution or self.recipe.resolution

    @property
    def batch_size(self) -> int:
        return self.args.batch_size or self.recipe.train_batch_size

    @property
    def rank(self) -> int:
        return self.args.rank or self.recipe.rank


# ─── hooks that watch the real loops from outside ─────────────────────────────────────────────
class StepClock:
    """A training hook: wall time at each step's end. GPU work is waited for only where a time is read
    that a rate is computed from (the first and last step, or every step with every_step)."""

    def __init__(self, device: torch.device, last_step: int, every_step: bool = False):
        self.device, self.last_step, self.every_step = device, last_step, every_step
        self.start, self.times = time.perf_counter(), []

    def on_step(self, info, components) -> None:
        if self.device.type == "cuda" and (self.every_step or info.step in (1, self.last_step)):
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def on_checkpoint(self, step, path) -> None:
        pass

    def on_end(self, result) -> None:
        pass

    @property
    def first_step_seconds(self) -> float:
        """From the call to the end of step 1: loading, caching, compiling and the first step."""
        return self.times[0] - self.start

    def samples_per_second(self, batch: int) -> float:
        """Steady state: steps 2..N, the first step's warm-up left out."""
        return (len(self.times) - 1) * batch / (self.times[-1] - self.times[0])

    def step_seconds(self) -> list[float]:
        return list(np.diff(self.times))


class FlopCount:
    """A training hook: counts the FLOPs of step 2 (the mode opens when step 1 ends, closes when step 2 ends)."""

    def __init__(self, device: torch.device):
        self.device, self.flops, self._stack = device, None, None

    def on_step(self, info, components) -> None:
        if info.step == 1:
            self._stack = contextlib.ExitStack()
            if self.device.type == "cpu":  # FlopCounterMode has no formula for CPU fused attention: count its matmuls
                self._stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            self._mode = self._stack.enter_context(FlopCounterMode(display=False))
        elif info.step == 2:
            self._stack.close()
            self.flops = self._mode.get_total_flops()

    def on_checkpoint(self, step, path) -> None:
        pass

    def on_end(self, result) -> None:
        pass


def run_arm(arm: str, cfg: TrainConfig, hooks: list, run_dir: Path) -> dict:
    """Train cfg.max_train_steps steps with our loop or the reference loop; returns its cost dict."""
    if arm == "ours":
        return train(cfg, run_dir, hooks).cost
    return reference_train(cfg, hooks)


# ─── 1. side by side ──────────────────────────────────────────────────────────────────────────
def side_by_side(bench: Bench) -> tuple[dict, Path]:
    """Round 0 warms up and counts FLOPs; rounds 1..R are timed, alternating which arm goes first."""
    cfg = bench.config(bench.args.steps)
    per_round = {arm: {"samples_per_second": [], "time_to_first_step_s": []} for arm in ARMS}
    flops = {}
    keep = bench.tmp / "ours-last"  # the last round's adapter, for the sampling benchmark
    for r in range(bench.args.rounds + 1):
        for arm in (ARMS if r % 2 else ARMS[::-1]):
            run_dir = bench.tmp / f"{arm}-{r}"
            clock, counter = StepClock(bench.device, cfg.max_train_steps), FlopCount(bench.device)
            run_arm(arm, cfg, [counter] if r == 0 else [clock], run_dir)
            if r == 0:
                flops[arm] = counter.flops / cfg.train_batch_size
            else:
                per_round[arm]["samples_per_second"].append(clock.samples_per_second(cfg.train_batch_size))
                per_round[arm]["time_to_first_step_s"].append(clock.first_step_seconds)
            if arm == "ours":
                shutil.rmtree(keep, ignore_errors=True)
                run_dir.rename(keep)
            shutil.rmtree(run_dir, ignore_errors=True)
    result = {arm: {k: summarize(v) for k, v in per_round[arm].items()} | {"flops_per_sample": flops[arm]}
              for arm in ARMS}
    ratios = np.divide(per_round["ours"]["samples_per_second"], per_round["reference"]["samples_per_second"])
    result["speedup"] = summarize(ratios)  # paired by round: both arms ran back to back
    result["rounds"] = per_round
    return result, keep


def add_utilisation(train: dict, matmul: dict) -> None:
    """MFU: FLOPs a step needs x samples/s over the measured matmul rate. `mfu` counts each loop's own
    FLOPs (the reference's include its per-step VAE and text encoder); `useful_mfu` counts only the
    FLOPs training needs (ours: the UNet with its LoRA), so the two loops are judged on the same work."""
    useful = train["ours"]["flops_per_sample"]
    for arm in ARMS:
        rates = np.asarray(train["rounds"][arm]["samples_per_second"])
        train[arm]["mfu"] = summarize(rates * train[arm]["flops_per_sample"] / matmul["mean"])
        train[arm]["useful_mfu"] = summarize(rates * useful / matmul["mean"])


# ─── 2. peak memory, each arm in a fresh process ─────────────────────────────────────────────
def _peak_in_child(arm: str, cfg_dict: dict, threads: int, run_dir: str) -> dict:
    torch.set_num_threads(threads)
    cfg = TrainConfig.from_dict(cfg_dict)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cost = run_arm(arm, cfg, [], Path(run_dir))
    return {"peak_memory_mb": cost["peak_memory_mb"], "start_rss_mb": start}


def peak_memory(bench: Bench) -> dict:
    """Peak RSS (CPU; Linux's high-water mark) or peak allocated GPU memory of a process that trains a
    few steps of one arm. Children fork from a server that has imported the libraries and nothing
    else, so both arms start from the same memory and neither inherits the other's high-water mark."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["research.benchmarking.reference_loop", "research.training.loop"])
    cfg = bench.config(steps=3).to_dict()
    workers = 1 if bench.device.type == "cuda" else len(ARMS)  # a GPU child has the card to itself
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, max_tasks_per_child=1) as pool:
        runs = [(arm, pool.submit(_peak_in_child, arm, cfg, bench.args.threads, str(bench.tmp / f"mem-{arm}-{i}")))
                for i in range(bench.args.memory_repeats) for arm in ARMS]
        results = [(arm, future.result()) for arm, future in runs]
    return {arm: summarize([r["peak_memory_mb"] for a, r in results if a == arm])
            | {"process_start_mb": max(r["start_rss_mb"] for a, r in results if a == arm)} for arm in ARMS}


# ─── 3. the machine's limit ───────────────────────────────────────────────────────────────────
def matmul_rate(device: torch.device, repeats: int = 10) -> dict:
    """Dense matmul FLOP/s: fp32 1024² on CPU (the threads in use), bf16 8192² on GPU; n timed repeats."""
    size, dtype, inner = (8192, torch.bfloat16, 20) if device.type == "cuda" else (1024, torch.float32, 4)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    rates = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first repeat warms up
            rates.append(inner * 2 * size**3 / (time.perf_counter() - t))
    return summarize(rates) | {"dtype": str(dtype).removeprefix("torch."), "size": size}


# ─── 4. sampling and evaluation ───────────────────────────────────────────────────────────────
def sampling_speed(bench: Bench, adapter_run: Path) -> dict:
    """Images/s of the run's sampler with our trained adapter loaded, timed per batch after one warm-up batch."""
    cfg = bench.config(bench.args.steps)
    dtype = weight_dtype(pick_precision(cfg.mixed_precision, bench.device))
    pipe = make_sampler(load_pipeline(cfg.base_model, dtype).to(bench.device), cfg.sampler)
    get_method(cfg).load_into(pipe, adapter_run / "checkpoints")
    pipe.set_progress_bar_config(disable=True)
    batch = min(bench.args.sample_batch_size or cfg.sample_batch_size, bench.args.sample_images)
    jobs = plan_jobs(style_folder_for(cfg).validation_prompts, bench.args.sample_images + batch, cfg.seed)
    rates = []
    for start in range(0, len(jobs), batch):
        t = time.perf_counter()
        generate(pipe, jobs[start:start + batch], num_inference_steps=cfg.num_inference_steps, batch_size=batch,
                 guidance_scale=cfg.guidance_scale, resolution=cfg.resolution)  # returns PIL images: synced
        if start:
            rates.append(batch / (time.perf_counter() - t))
    return summarize(rates) | {"sampler": cfg.sampler, "num_inference_steps": cfg.num_inference_steps,
                               "guidance_scale": cfg.guidance_scale, "batch_size": batch}


def evaluation_speed(bench: Bench) -> dict:
    """Images/s of the evaluation (adapter + baseline images scored per second of compute_metrics),
    with the recipe's metrics and backbones, repeated n times."""
    recipe = bench.recipe
    metrics = None if recipe.metrics == "none" else recipe.metrics.split(",")  # none: time every metric
    runs = [time_evaluation(bench.args.eval_images, metrics=metrics, clip_model=recipe.clip_model,
                            oracle=recipe.oracle, device=str(bench.device))
            for _ in range(bench.args.eval_repeats)]
    # MLflow keys allow no ':' (stages are named like features:clip)
    stages = {k.replace(":", "_"): summarize([r["stages"][k] for r in runs]) for k in runs[0]["stages"]}
    return summarize([r["images_per_second"] for r in runs]) | {
        "images_per_arm": bench.args.eval_images, "metrics": runs[0]["metrics"], "stage_seconds": stages}


# ─── 5. cost growth ───────────────────────────────────────────────────────────────────────────
def growth(bench: Bench) -> dict:
    """Seconds per step (steps 2..N, each timed, n = N-1) for each arm as one knob moves off the base point."""
    axes = {"dataset_size": bench.args.growth_dataset_sizes, "resolution": bench.args.growth_resolutions,
            "rank": bench.args.growth_ranks}
    out, point = {}, 0
    for axis, values in axes.items():
        out[axis] = {}
        for value in values:
            cfg = bench.config(bench.args.growth_steps, **{axis: value})
            out[axis][str(value)] = {}
            point += 1
            for arm in (ARMS if point % 2 else ARMS[::-1]):  # alternate which arm goes first
                clock = StepClock(bench.device, cfg.max_train_steps, every_step=True)
                run_dir = bench.tmp / f"growth-{arm}"
                run_arm(arm, cfg, [clock], run_dir)
                shutil.rmtree(run_dir, ignore_errors=True)
                out[axis][str(value)][arm] = {"seconds_per_step": summarize(clock.step_seconds()),
                                              "time_to_first_step_s": clock.first_step_seconds}
    return out


# ─── the whole benchmark ──────────────────────────────────────────────────────────────────────
def machine(device: torch.device, threads: int) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": device.type, "device_name": name, "threads": threads, "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__, "python": platform.python_version()}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def run_bench(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(build_random_pipeline(tmp / "model", args.model)) if args.model in {"tiny", "sd15"} else args.model
        bench = Bench(args, device, model, tmp)
        report = {"machine": machine(device, args.threads)}
        report["limit"] = {"matmul_flops_per_second": matmul_rate(device)}
        report["train"], adapter_run = side_by_side(bench)
        add_utilisation(report["train"], report["limit"]["matmul_flops_per_second"])
        if "memory" in args.parts:
            for arm, peak in peak_memory(bench).items():
                report["train"][arm]["peak_memory_mb"] = peak
        if "sampling" in args.parts:
            report["sampling"] = sampling_speed(bench, adapter_run)
        if "evaluation" in args.parts:
            report["evaluation"] = evaluation_speed(bench)
        if "growth" in args.parts:
            report["growth"] = growth(bench)
        cfg = bench.config(args.steps)
        report["setup"] = {"model": args.model, "config": os.path.relpath(args.config), "resolution": cfg.resolution,
                           "batch_size": cfg.train_batch_size, "rank": cfg.rank, "lora_alpha": cfg.lora_alpha,
                           "unet_target_modules": cfg.unet_target_modules, "dataset_size": args.dataset_size,
                           "steps_per_round": args.steps, "rounds": args.rounds,
                           "precision": pick_precision(cfg.mixed_precision, device)}
    report["machine"]["load_average_after"] = list(os.getloadavg())
    return report
