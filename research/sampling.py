"""Sampling, a building block: prompts x seeds -> images, for the adapter and for the base model.

Every image has its own seeded generator, so image (prompt i, seed s) is the same whatever the
batch size, and the baseline and adapter images of one (prompt, seed) share their starting noise.
Here: the jobs (which prompt with which seed), generation, image sets on disk (manifest + PNGs,
thumbnail strips), the one pipeline builder over training components (validation strips, a
search's intermediate score, DreamBooth's class images), the base model's images made once per key
and read back by later runs, and the sampling of a finished run through its saved adapter. It sits
on data and models; a method is passed in (duck-typed ``load_into`` / ``fuse`` / ``caption``), never
imported. The CLI is research/sample.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from research.atomic import replace_folder, save_image, write_json
from research.data import read_validation_prompts
from research.errors import DataError
from research.models import make_sampler, resolve_base_model

log = logging.getLogger("research")

MANIFEST = "manifest.json"
BASELINE_CACHE = Path(".cache") / "baseline"  # under --output-dir: the base model's images, shared by runs


@dataclass(frozen=True)
class Job:
    prompt_index: int
    prompt: str
    seed: int

    @property
    def file_name(self) -> str:
        return f"p{self.prompt_index:02d}_s{self.seed:06d}.png"


def plan_jobs(prompts: list[str], num_images: int, seed: int) -> list[Job]:
    """Round-robin over prompts so every prompt gets ~num_images/len(prompts) seeds."""
    per_prompt = math.ceil(num_images / len(prompts))
    jobs = [Job(i, p, seed + k) for k in range(per_prompt) for i, p in enumerate(prompts)]
    return sorted(jobs[:num_images], key=lambda j: (j.prompt_index, j.seed))


@torch.no_grad()
def generate(pipe, jobs: list[Job], *, num_inference_steps: int, guidance_scale: float, resolution: int,
             batch_size: int = 8, desc: str = "sampling", prompt_fn=lambda p: p) -> list[Image.Image]:
    device = pipe.device
    images = []
    for start in tqdm(range(0, len(jobs), batch_size), desc=desc, unit="batch", leave=False):
        batch = jobs[start:start + batch_size]
        generators = [torch.Generator(device=device).manual_seed(j.seed) for j in batch]
        out = pipe([prompt_fn(j.prompt) for j in batch], num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, height=resolution, width=resolution, generator=generators)
        images.extend(out.images)
    return images


def components_pipeline(c, sampler: str, scheduler_config=None) -> StableDiffusionPipeline:
    """The one sampling pipeline over training components (unet, vae, text_encoder, tokenizer,
    noise_scheduler), with whatever adapter is in place right now, or none yet.

    scheduler_config: the noise schedule to sample with; None = the training scheduler's (the
    prediction type being trained). DreamBooth's class images pass the base model's own config.
    """
    scheduler = DDPMScheduler.from_config(scheduler_config or c.noise_scheduler.config)
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe = make_sampler(pipe, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_components(c, jobs: list[Job], cfg, desc: str, *, prompt_fn=lambda p: p,
                      scheduler_config=None) -> list[Image.Image]:
    """Images from training components as they are (see components_pipeline). The trainable weights are
    fp32 while the frozen base may be bf16/fp16, so on GPU sampling runs under autocast in the base's
    dtype, as the training step does."""
    pipe = components_pipeline(c, cfg.sampler, scheduler_config)
    device, dtype = pipe.unet.device, pipe.vae.dtype
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and device.type == "cuda"):
        return generate(pipe, jobs, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                        resolution=cfg.resolution, batch_size=cfg.sample_batch_size, desc=desc, prompt_fn=prompt_fn)


def save_set(images: list[Image.Image], jobs: list[Job], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image, job in zip(images, jobs):
        save_image(image, folder / job.file_name)
    write_json(folder / MANIFEST, [{"file": j.file_name, "prompt_index": j.prompt_index, "prompt": j.prompt,
                                    "seed": j.seed} for j in jobs])


def load_set(folder: Path) -> tuple[list[Image.Image], list[Job]]:
    entries = json.loads((folder / MANIFEST).read_text())
    jobs = [Job(int(e["prompt_index"]), e["prompt"], int(e["seed"])) for e in entries]
    return [Image.open(folder / e["file"]).convert("RGB") for e in entries], jobs


def write_thumbnails(baseline: list[Image.Image], adapter: list[Image.Image], jobs: list[Job], out_dir: Path,
                     per_prompt: int = 4) -> list[Path]:
    """One strip per prompt: top row baseline, bottom row adapter, same seeds column by column."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index in sorted({j.prompt_index for j in jobs}):
        picks = [k for k, j in enumerate(jobs) if j.prompt_index == index][:per_prompt]
        w, h = adapter[picks[0]].size
        label = 14
        strip = Image.new("RGB", (w * len(picks), 2 * h + 2 * label), "white")
        draw = ImageDraw.Draw(strip)
        for col, k in enumerate(picks):
            strip.paste(baseline[k], (col * w, label))
            strip.paste(adapter[k], (col * w, 2 * label + h))
        draw.text((2, 1), "baseline", fill="black")
        draw.text((2, label + h + 1), "adapter", fill="black")
        path = out_dir / f"p{index:02d}_strip.png"
        save_image(strip, path)
        written.append(path)
    return written


def baseline_key(cfg, jobs: list[Job], pipe) -> str | None:
    """A digest of everything that decides the base model's images for these jobs: the model's files (path,
    size, modification time), the jobs, the sampler settings, dtype, device and library versions. None
    when the base model is not a local folder or file (a hub id): its images are then not cached."""
    source = Path(resolve_base_model(cfg.base_model))
    if not source.exists():
        return None
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    stats = [(p, p.stat()) for p in files]
    what = {"model": [(str(p.resolve()), st.st_size, st.st_mtime_ns) for p, st in stats],
            "jobs": [(j.prompt_index, j.prompt, j.seed) for j in jobs], "sampler": cfg.sampler,
            "steps": cfg.num_inference_steps, "guidance": cfg.guidance_scale, "resolution": cfg.resolution,
            "batch": cfg.sample_batch_size, "dtype": str(pipe.unet.dtype), "device": pipe.device.type,
            "versions": [torch.__version__, diffusers.__version__]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def baseline_images(pipe, jobs: list[Job], cfg, **common) -> list[Image.Image]:
    """The base model's images for `jobs`: generated once, then read back by every run with the same key
    (Exp I's styles and Exp III's methods share prompts, seeds and base). Stored as lossless PNGs, so a
    read-back image is the generated one pixel for pixel; an entry appears whole (renamed into place) or not."""
    key = baseline_key(cfg, jobs, pipe)
    folder = Path(cfg.output_dir) / BASELINE_CACHE / key if key else None
    if folder is not None and (folder / MANIFEST).is_file():
        try:
            images, stored = load_set(folder)
        except (OSError, ValueError):  # a damaged entry (a PNG or the manifest) is generated again below
            images, stored = [], []
        if stored == jobs:
            log.info("baseline: %d base-model images read from %s", len(images), folder)
            return images
    images = generate(pipe, jobs, desc="baseline", **common)
    if folder is not None:
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        save_set(images, jobs, tmp)
        try:
            if folder.exists():  # damaged: replaced by the images just made
                shutil.rmtree(folder)
            tmp.rename(folder)
        except OSError:  # another run stored the same images first
            shutil.rmtree(tmp, ignore_errors=True)
    return images


def sample_run(run_dir: Path, cfg, method, *, prompts: list[str], base_pipe) -> dict:
    """Baseline images first (pristine base), then the saved adapter loaded the way users load it."""
    jobs = plan_jobs(prompts, cfg.num_eval_images, cfg.seed + cfg.eval_seed_offset)
    pipe = make_sampler(base_pipe, cfg.sampler)  # the base model as it is, with its own prediction type
    pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                  resolution=cfg.resolution, batch_size=cfg.sample_batch_size)
    baseline = baseline_images(pipe, jobs, cfg, **common)
    method.load_into(pipe, run_dir / "checkpoints")
    method.fuse(pipe)  # this pipeline only samples from here on
    pipe = make_sampler(pipe, cfg.sampler, prediction_type=cfg.prediction_type)  # what the adapter was trained to predict
    adapter = generate(pipe, jobs, desc="adapter", prompt_fn=method.caption, **common)
    # Each folder is built whole and swapped in: sampling a run again with fewer images must not leave
    # the earlier set's extra images beside the new ones, nor a half-written mix if it is killed.
    def fill_inference(folder: Path) -> None:
        save_set(adapter, jobs, folder)
        save_set(baseline, jobs, folder / "baseline")

    replace_folder(run_dir / "inference", fill_inference)
    replace_folder(run_dir / "thumbnails", lambda folder: write_thumbnails(baseline, adapter, jobs, folder))
    return {"jobs": jobs, "baseline": baseline, "adapter": adapter}


def run_prompts(run_dir: Path, cfg, prompts_file: str = "") -> list[str]:
    """The prompts to re-sample a finished run with: a given file, else the ones the run itself used
    (its manifest), else its style folder's; a run whose prompts cannot be found is refused, never
    silently sampled with generic ones."""
    manifest = run_dir / "inference" / MANIFEST
    if not prompts_file and manifest.is_file():
        try:
            entries = json.loads(manifest.read_text(encoding="utf-8"))
            return list(dict.fromkeys(e["prompt"] for e in entries))
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{manifest} is damaged; pass --validation-prompts-file with the prompts to use.") from None
    if not prompts_file and not Path(cfg.style_dir).is_dir():
        raise DataError(f"The run's style folder {cfg.style_dir} is gone and the run has no image manifest; pass "
                        "--validation-prompts-file with the prompts to use.")
    return read_validation_prompts(Path(cfg.style_dir), cfg.resolved_style_name(), prompts_file)


def check_saved_artifacts(checkpoint_dir: Path) -> None:
    """Read every adapter file in checkpoints/ before anything is sampled or overwritten: a truncated or
    damaged file is one clear error, not a traceback halfway through re-sampling."""
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        try:
            load_file(path)
        except (SafetensorError, OSError) as err:
            raise DataError(f"{path} is damaged ({str(err).splitlines()[0][:80]}); re-train the run or restore the "
                            "file from MLflow's artifacts.") from None
