"""`make bench`'s command line: training, sampling and evaluation speed beside the plain reference loop and the
machine's limit (research/benchmarking/).

    python -m research.bench                                    # the toy model and toy recipe, on this machine
    python -m research.bench --model sd15 --device cuda --resolution 512 --batch-size 8   # SD 1.5 shapes (GPU)
    python -m research.bench --parts memory --rounds 3         # side by side, no sampling/eval/growth

Our training step (research.training.loop.train, the real loop, with its cached latents and text
embeddings) and the reference loop (research/benchmarking/reference_loop.py, the plain diffusers-example style)
train the same LoRA on the same model, images and batch in one process, in alternating order round
after round, so the machine's drift and other users' load fall on both alike. Each arm's peak
memory is measured in a fresh process of its own. FLOPs of one training step are counted with
torch's FlopCounterMode and set against this machine's measured dense matmul rate (fp32 on CPU with
the threads in use, bf16 on GPU): model FLOP utilisation. Then: sampling and evaluation images/s,
and time per step as the dataset, the resolution and the LoRA rank grow.

Writes results.json, results.md and growth.png to --out-dir and one MLflow run in experiment `bench`.
Every number is a mean over n rounds (or steps, or batches) with a 95% t-interval (research.metrics.stats.summarize).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from research.arguments import OneLineParser
from research.benchmarking.measurements import GROWTH, PARTS, run_bench
from research.benchmarking.publish import publish
from research.cli import user_errors_exit_2
from research.config import TOY_CONFIG, ConfigError
from research.tracking import setup_logging

OUT_DIR = Path(__file__).resolve().parent.parent / "reports" / "bench"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m research.bench", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="embedded | tiny | sd15 (random weights) | a model folder or hub id")
    p.add_argument("--config", default=str(TOY_CONFIG), help="the training recipe (targets, batch, loss, sampler)")
    p.add_argument("--resolution", type=int, default=0, help="0 = the recipe's")
    p.add_argument("--batch-size", type=int, default=0, help="0 = the recipe's")
    p.add_argument("--rank", type=int, default=0, help="0 = the recipe's")
    p.add_argument("--dataset-size", type=int, default=64, help="training images")
    p.add_argument("--device", default="auto")
    p.add_argument("--mixed-precision", default="auto")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    p.add_argument("--steps", type=int, default=8, help="steps per arm per round (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of both arms, after one warm-up round")
    p.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per arm for peak memory")
    p.add_argument("--sample-images", type=int, default=32, help="images timed for sampling (after one warm-up batch)")
    p.add_argument("--sample-batch-size", type=int, default=0, help="0 = the recipe's")
    p.add_argument("--eval-images", type=int, default=64, help="images per arm timed for evaluation")
    p.add_argument("--eval-repeats", type=int, default=3)
    p.add_argument("--parts", type=lambda t: set(t.split(",")), default=set(PARTS),
                   help=f"what to measure besides training speed and MFU: any of {','.join(PARTS)}")
    p.add_argument("--growth-steps", type=int, default=4, help="steps per growth point (the first is warm-up)")
    p.add_argument("--growth-dataset-sizes", type=_ints, default=None)
    p.add_argument("--growth-resolutions", type=_ints, default=None)
    p.add_argument("--growth-ranks", type=_ints, default=None)
    p.add_argument("--before", default="", help="a results.json of an earlier version, shown beside this one")
    p.add_argument("--out-dir", default=str(OUT_DIR))
    p.add_argument("--no-tracking", action="store_true", help="no MLflow run")
    return p


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def check_args(args: argparse.Namespace) -> None:
    """Sanity checks before anything runs, each with the fix."""
    if args.steps < 3 or args.growth_steps < 3:
        raise ConfigError("--steps and --growth-steps must be at least 3: step 1 is warm-up, FLOPs are counted on step 2.")
    if min(args.rounds, args.memory_repeats, args.eval_repeats, args.threads, args.sample_images, args.eval_images) < 1:
        raise ConfigError("--rounds, --memory-repeats, --eval-repeats, --threads, --sample-images and --eval-images "
                          "must be at least 1.")
    if args.parts - set(PARTS):
        raise ConfigError(f"--parts takes a comma list of {', '.join(PARTS)}; got {','.join(sorted(args.parts))}.")
    if args.before and not Path(args.before).is_file():
        raise ConfigError(f"--before {args.before} does not exist; pass an earlier results.json or drop the flag.")
    device_type = "cuda" if args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    for axis, values in GROWTH[device_type].items():
        flag = {"dataset_size": "growth_dataset_sizes", "resolution": "growth_resolutions", "rank": "growth_ranks"}[axis]
        if getattr(args, flag) is None:
            setattr(args, flag, values)


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    check_args(args)
    report = run_bench(args)
    publish(report, Path(args.out_dir), before=args.before, track=not args.no_tracking)
    return 0


if __name__ == "__main__":
    sys.exit(main())
