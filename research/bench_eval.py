"""Benchmark: time compute_metrics on 256 synthetic 64 px images per arm with a tiny CLIP (toy-world scale).

    python -m research.bench_eval [--num-images 256] [--threads 2]

Uses the shipped toy CLIP (research/toyworld/weights/clip) when it exists, else a random tiny one.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TOY_CLIP = Path(__file__).parent / "toyworld" / "weights" / "clip"
TOY_ORACLE = Path(__file__).parent / "toyworld" / "weights" / "oracle"
from research.random_models import write_tiny_clip  # noqa: F401 (re-exported for tests)


def synthetic_images(n: int, seed: int, size: int = 64) -> list[Image.Image]:
    """Smooth random colour fields (noise-free enough that LPIPS and CLIP see structure)."""
    rng = np.random.default_rng(seed)
    base = rng.random((n, 8, 8, 3))
    return [Image.fromarray((b * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC) for b in base]


def main() -> None:
    from research.metrics import METRICS, compute_metrics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)  # per arm, as in the speed target
    parser.add_argument("--seeds-per-prompt", type=int, default=4)  # images per prompt, for LPIPS diversity
    parser.add_argument("--num-references", type=int, default=100)  # held-out style images
    parser.add_argument("--clip-model", default=None)  # a CLIPModel folder; default: the toy CLIP or a random tiny one
    parser.add_argument("--threads", type=int, default=2)  # the target machine has 2 cores
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        clip = args.clip_model or (TOY_CLIP if TOY_CLIP.exists() else write_tiny_clip(Path(tmp) / "clip"))
        prompts = [f"a red circle on a green hill, variant {i // args.seeds_per_prompt}" for i in range(args.num_images)]
        oracle = str(TOY_ORACLE) if TOY_ORACLE.exists() else None
        # without the oracle, IS needs Inception, which has no offline weights: time the rest
        metrics = METRICS if oracle else [m for m in METRICS if m != "inception_score"]
        timings: dict = {}
        start = time.perf_counter()
        result = compute_metrics(synthetic_images(args.num_images, 1), synthetic_images(args.num_images, 2), prompts,
                                 synthetic_images(args.num_references, 3), metrics=metrics, clip_model=str(clip),
                                 lpips_weights="random", oracle=oracle, target_style="pastel",
                                 feature_extractor="clip", progress=False, timings=timings)
        total = time.perf_counter() - start
    print(f"CLIP: {clip}  oracle: {oracle}  images per arm: {args.num_images}  references: {args.num_references}  threads: {args.threads}")
    for stage, seconds in timings.items():
        print(f"  {stage:<24} {seconds:7.2f} s")
    print(f"  {'total':<24} {total:7.2f} s")
    print("adapter:", {m: round(v["mean"], 4) for m, v in result["adapter"].items()})


if __name__ == "__main__":
    main()
