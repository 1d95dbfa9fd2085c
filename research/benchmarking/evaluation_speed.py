"""Benchmark: time compute_metrics on synthetic 64 px images per arm with a tiny CLIP (toy-world scale).

    python -m research.benchmarking.evaluation_speed [--num-images 256] [--threads 2]

Uses the shipped toy CLIP (research/toyworld/weights/clip) when it exists, else a random tiny one.
`python -m research.bench` calls time_evaluation (through measurements) for its evaluation images/s.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from research.evaluation import load_oracle
from research.metrics import METRICS, compute_metrics
from research.random_models import write_tiny_clip
from research.toyworld import CLIP_DIR as TOY_CLIP, ORACLE_DIR as TOY_ORACLE


def synthetic_images(n: int, seed: int, size: int = 64) -> list[Image.Image]:
    """Smooth random colour fields (noise-free enough that LPIPS and CLIP see structure)."""
    rng = np.random.default_rng(seed)
    base = rng.random((n, 8, 8, 3))
    return [Image.fromarray((b * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC) for b in base]


def time_evaluation(num_images: int, *, metrics=None, clip_model: str | None = None, oracle: str | None = None,
                    seeds_per_prompt: int = 4, num_references: int = 100, device: str = "cpu") -> dict:
    """One compute_metrics call on `num_images` adapter and as many baseline images: seconds per stage,
    total seconds and images/s (both arms' images over the total, backbone loading included)."""
    with tempfile.TemporaryDirectory() as tmp:
        clip = clip_model or (TOY_CLIP if TOY_CLIP.exists() else write_tiny_clip(Path(tmp) / "clip"))
        oracle = oracle if oracle is not None else (str(TOY_ORACLE) if TOY_ORACLE.exists() else None)
        metrics = list(metrics or METRICS)
        if not oracle:  # without the oracle, IS needs Inception, which has no offline weights: time the rest
            metrics = [m for m in metrics if m != "inception_score" and not m.startswith("oracle_")]
        prompts = [f"a red circle on a green hill, variant {i // seeds_per_prompt}" for i in range(num_images)]
        adapter, baseline = synthetic_images(num_images, 1), synthetic_images(num_images, 2)
        references = synthetic_images(num_references, 3)
        timings: dict = {}
        start = time.perf_counter()
        compute_metrics(adapter, baseline, prompts, references, metrics=metrics, clip_model=str(clip),
                        lpips_weights="random", oracle=load_oracle(oracle or "", device), target_style="pastel",
                        feature_extractor="clip", device=device, progress=False, timings=timings)
        total = time.perf_counter() - start
    return {"stages": timings, "total_seconds": total, "images_per_second": 2 * num_images / total,
            "metrics": metrics, "clip_model": str(clip), "oracle": oracle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)  # per arm, as in the speed target
    parser.add_argument("--seeds-per-prompt", type=int, default=4)  # images per prompt, for LPIPS diversity
    parser.add_argument("--num-references", type=int, default=100)  # held-out style images
    parser.add_argument("--clip-model", default=None)  # a CLIPModel folder; default: the toy CLIP or a random tiny one
    parser.add_argument("--threads", type=int, default=2)  # the target machine has 2 cores
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = time_evaluation(args.num_images, clip_model=args.clip_model, seeds_per_prompt=args.seeds_per_prompt,
                          num_references=args.num_references)
    print(f"CLIP: {out['clip_model']}  oracle: {out['oracle']}  images per arm: {args.num_images}  "
          f"references: {args.num_references}  threads: {args.threads}")
    for stage, seconds in out["stages"].items():
        print(f"  {stage:<24} {seconds:7.2f} s")
    print(f"  {'total':<24} {out['total_seconds']:7.2f} s  ({out['images_per_second']:.1f} images/s)")


if __name__ == "__main__":
    main()
