"""Evaluate a run again: adapter vs base model on the same prompts and seeds, against held-out references
(thin CLI over research/evaluation.py).

    python -m research.evaluate --run-dir runs/exp1/<run> --num-images 256 --metrics clip_score,fid,kid
    python -m research.evaluate --run-dir <a copy of the run> --num-images 256 --eval-seed-offset 2000

The second scores the adapter on seeds its reported numbers never used (seed + 2000, ...): a setting
chosen there is not chosen on the numbers that will be reported. Evaluate a copy of the run folder,
since metrics.json is rewritten; the seeds each image used are in inference/manifest.json.

It regenerates ``inference/`` (adapter) and ``inference/baseline/`` with the requested number of
images per arm, recomputes the metrics, rewrites ``metrics.json`` (keeping the training cost) and
logs the numbers to the run's MLflow run. Training calls the same code at its end, so every run's
metrics.json has both arms.
"""

from __future__ import annotations

import argparse
import sys

from research.arguments import OneLineParser, TypedFlag, add_config_arguments, add_run_dir_argument, finished_run_config
from research.cli import user_errors_exit_2
from research.config import TrainConfig
from research.data import style_folder_for
from research.evaluation import format_table, reevaluate_run
from research.methods import get_method
from research.tracking import setup_logging

EVAL_FLAGS = ["num_eval_images", "metrics", "clip_model", "feature_extractor", "inception_weights", "lpips_weights",
              "oracle", "num_inference_steps", "guidance_scale", "sampler", "device", "eval_seed_offset"]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m research.evaluate", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_dir_argument(parser)
    add_config_arguments(parser, names=EVAL_FLAGS)
    parser.add_argument("--num-images", dest="num_eval_images", type=int, default=TrainConfig.num_eval_images,
                        action=TypedFlag, help="alias of --num-eval-images: images per arm")
    return parser


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run_dir, cfg = finished_run_config(parser, args, EVAL_FLAGS)
    setup_logging(run_dir / "logs.txt")
    metrics, run_id = reevaluate_run(run_dir, cfg, get_method(cfg), style_folder_for(cfg))
    print(format_table(metrics))
    print(f"\nmetrics: {run_dir / 'metrics.json'}" + (f"  (MLflow run {run_id})" if run_id else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
