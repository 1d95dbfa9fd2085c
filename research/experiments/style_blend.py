"""Experiment IV: blend two style LoRAs by linear interpolation of their weight deltas.

At weight t every adapted layer gets (1-t)·ΔW_A + t·ΔW_B (the maths: blend_math). Sampling uses
diffusers' multi-adapter (``set_adapters(["a", "b"], [1-t, t])``), which adds exactly those two
scaled deltas; an export weight also writes ONE adapter file with the same delta (blend_files).

Every t uses the same prompts and seeds. Output: ``runs/exp4/<timestamp>_<a>_x_<b>/`` with
``t_0.50/`` images, ``thumbnails/`` (one grid per prompt across t, and grid.png), ``metrics.json``
(per t: style similarity to A's and to B's held-out images, the oracle's probability of A's and B's
style when the configs name an oracle; blend_metrics) and ``checkpoints/`` (the exported blend); one
MLflow run in experiment exp4. research/blend.py is its command line.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageDraw

from research.atomic import save_image, write_json
from research.arguments import apply_overrides
from research.config import TrainConfig
from research.data import read_validation_prompts
from research.experiments.blend_files import WEIGHT_NAME, export_blend, load_adapter
from research.experiments.blend_math import Adapter, check_compatible, t_label
from research.experiments.blend_metrics import evaluate_blend
from research.models import load_pipeline, make_sampler, pick_device, pick_precision, weight_dtype
from research.sampling import generate, plan_jobs, save_set
from research.tracking import Tracker, flatten_metrics, new_run_dir, setup_logging

log = logging.getLogger("research")

DEFAULT_EXPERIMENT = "exp4"
# Flags that may override the sampling/evaluation settings read from adapter A's config.
FLAGS = ["base_model", "device", "mixed_precision", "sampler", "num_inference_steps", "guidance_scale",
         "num_eval_images", "sample_batch_size", "validation_prompts_file", "seed", "metrics", "clip_model",
         "feature_extractor", "inception_weights", "lpips_weights", "oracle", "experiment", "output_dir"]


# ─── sampling across t ──────────────────────────────────────────────────────────────────────
def load_blend_pipeline(cfg: TrainConfig, a: Adapter, b: Adapter):
    device = pick_device(cfg.device)
    pipe = load_pipeline(cfg.base_model, weight_dtype(pick_precision(cfg.mixed_precision, device))).to(device)
    pipe = make_sampler(pipe, cfg.sampler)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(a.checkpoint_dir), weight_name=WEIGHT_NAME, adapter_name="a")
    pipe.load_lora_weights(str(b.checkpoint_dir), weight_name=WEIGHT_NAME, adapter_name="b")
    return pipe


def render(pipe, cfg: TrainConfig, jobs, weights: list[float]) -> dict[float, list[Image.Image]]:
    images = {}
    for t in weights:
        # diffusers scales each adapter's delta by its weight and adds them: exactly (1-t)ΔW_A + tΔW_B.
        # Fused into the base weights for the sampling (two adapters beside the base made every forward pass
        # ~40% slower on the toy model), then taken out again, which leaves the base weights within float
        # rounding of where they were (one part in ~1e7)
        pipe.set_adapters(["a", "b"], adapter_weights=[1.0 - t, t])
        pipe.fuse_lora(adapter_names=["a", "b"])
        try:
            images[t] = generate(pipe, jobs, num_inference_steps=cfg.num_inference_steps,
                                 guidance_scale=cfg.guidance_scale, resolution=cfg.resolution,
                                 batch_size=cfg.sample_batch_size, desc=t_label(t))
        finally:
            pipe.unfuse_lora()
    return images


# ─── grids ──────────────────────────────────────────────────────────────────────────────────
def _grid(images: dict[float, list[Image.Image]], rows: list[int], names: list[str]) -> Image.Image:
    """Columns are t, rows are the given image indices, each row optionally named on the left."""
    weights, label = list(images), 14
    w, h = images[weights[0]][0].size
    side = max(4, max(len(n) for n in names) * 6 + 4) if names else 0
    canvas = Image.new("RGB", (side + w * len(weights), label + h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for col, t in enumerate(weights):
        draw.text((side + col * w + 2, 1), f"t={t:g}", fill="black")
        for row, k in enumerate(rows):
            canvas.paste(images[t][k], (side + col * w, label + row * h))
    for row, name in enumerate(names):
        draw.text((2, label + row * h + h // 2 - 5), name, fill="black")
    return canvas


def write_grids(images: dict[float, list[Image.Image]], jobs, out_dir: Path, per_prompt: int = 4) -> list[Path]:
    """Per prompt a grid: columns are t, rows are seeds; grid.png: one row per prompt (first seed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    prompts = sorted({j.prompt_index for j in jobs})
    for index in prompts:
        rows = [k for k, j in enumerate(jobs) if j.prompt_index == index][:per_prompt]
        path = out_dir / f"p{index:02d}_blend.png"
        save_image(_grid(images, rows, []), path)
        written.append(path)
    firsts = [next(k for k, j in enumerate(jobs) if j.prompt_index == index) for index in prompts]
    path = out_dir / "grid.png"
    save_image(_grid(images, firsts, [f"p{i:02d}" for i in prompts]), path)
    return written + [path]


# ─── the whole run ──────────────────────────────────────────────────────────────────────────
def load_pair(a_path: str, b_path: str) -> tuple[Adapter, Adapter]:
    a, b = load_adapter(a_path), load_adapter(b_path)
    if a.label == b.label:  # two runs of one style: tell them apart in folder names and legends
        a.label, b.label = f"{a.label}_a", f"{b.label}_b"
    check_compatible(a, b)
    return a, b


def blend_prompts(cfg: TrainConfig, a: Adapter, b: Adapter) -> list[str]:
    """Both styles' validation prompts, A's first, each once, so neither side is favoured."""
    prompts = []
    for x in (a, b):
        for p in read_validation_prompts(Path(x.cfg.style_dir), x.cfg.resolved_style_name(),
                                         cfg.validation_prompts_file):
            if p not in prompts:
                prompts.append(p)
    return prompts


def start_records(cfg: TrainConfig, a: Adapter, b: Adapter, blend_config: dict, track: bool) -> tuple[Path, Tracker]:
    """The run folder (config.json, logs.txt) and its MLflow run."""
    name = f"{a.label}_x_{b.label}"
    run_dir = new_run_dir(cfg.output_dir, cfg.experiment, name)
    (run_dir / "thumbnails").mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir / "logs.txt")
    write_json(run_dir / "config.json", {"adapter_a": str(a.checkpoint_dir), "adapter_b": str(b.checkpoint_dir),
                                         **blend_config, "config": cfg.to_dict()})
    tags = {"experiment": cfg.experiment, "method": "lora_blend", "adapter_a": a.label, "adapter_b": b.label,
            "style_a": a.cfg.resolved_style_name(), "style_b": b.cfg.resolved_style_name(),
            "base_model": cfg.base_model, "run_dir": str(run_dir),
            "mlflow.runName": name}  # also names the run `mlflow run -e blend` opened
    return run_dir, Tracker(run_dir, cfg.experiment, name, tags, enabled=track)


def blend_params(cfg: TrainConfig, a: Adapter, b: Adapter, paths: tuple[str, str], weights: list[float],
                 export_weight: float | None) -> dict:
    return {"adapter_a": str(paths[0]), "adapter_b": str(paths[1]), "weights": ",".join(f"{t:g}" for t in weights),
            "export_weight": "" if export_weight is None else f"{export_weight:g}",
            **{k: getattr(cfg, k) for k in FLAGS if k not in ("experiment", "output_dir")},
            "resolution": cfg.resolution, "rank_a": a.lora_meta.get("unet.r"), "rank_b": b.lora_meta.get("unet.r")}


def sample_and_score(cfg: TrainConfig, a: Adapter, b: Adapter, prompts: list[str], weights: list[float],
                     run_dir: Path) -> dict:
    """metrics.json's content: every t's images saved, gridded and scored."""
    metrics: dict = {"weights": weights, "n_images": 0, "a": {"label": a.label, "style": a.cfg.resolved_style_name()},
                     "b": {"label": b.label, "style": b.cfg.resolved_style_name()}}
    if not weights:
        return metrics
    jobs = plan_jobs(prompts, cfg.num_eval_images, cfg.seed)
    images = render(load_blend_pipeline(cfg, a, b), cfg, jobs, weights)
    for t, imgs in images.items():
        save_set(imgs, jobs, run_dir / t_label(t))
    write_grids(images, jobs, run_dir / "thumbnails")
    metrics["n_images"] = len(jobs)
    metrics.update(evaluate_blend(cfg, images, jobs, a, b))
    return metrics


def log_metrics(tracker: Tracker, metrics: dict) -> None:
    per_t = {k: v for k, v in metrics.items() if k.startswith("t_")}
    tracker.log_metrics(flatten_metrics(per_t))  # t_0.50.style_similarity_a: one column per t in the UI
    for step, key in enumerate(per_t):  # and one curve per metric, step = index of t
        tracker.log_metrics(flatten_metrics(per_t[key]), step=step)


def run_blend(a_path: str, b_path: str, weights: list[float], export_weight: float | None, args,
              track: bool = True) -> Path:
    """The blend run: adapters checked, samples at every t scored, the export written, all tracked."""
    a, b = load_pair(a_path, b_path)
    cfg = apply_overrides(a.cfg, args, FLAGS)
    prompts = blend_prompts(cfg, a, b)
    run_dir, tracker = start_records(cfg, a, b, {"weights": weights, "export_weight": export_weight,
                                                 "prompts": prompts}, track)
    log.info("blend %s x %s at t = %s -> %s", a.label, b.label, weights, run_dir)
    try:
        tracker.log_params(blend_params(cfg, a, b, (a_path, b_path), weights, export_weight))
        if export_weight is not None:
            files = export_blend(a, b, export_weight, run_dir / "checkpoints")
            log.info("exported the blend at t=%g: %s", export_weight, ", ".join(map(str, files)))
        metrics = sample_and_score(cfg, a, b, prompts, weights, run_dir)
        write_json(run_dir / "metrics.json", metrics)
        log_metrics(tracker, metrics)
        tracker.log_folder()
        tracker.finish("FINISHED")
    except BaseException:
        log.exception("blend failed")
        tracker.fail()
        raise
    return run_dir
