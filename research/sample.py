"""Sample a finished run again: adapter and base model on the same prompts and seeds (thin CLI over
research/sampling.py).

    python -m research.sample --run-dir runs/exp1/20261124-120000_ghibli_lora
"""

from __future__ import annotations

import argparse
import sys

from research.arguments import OneLineParser, add_config_arguments, add_run_dir_argument, finished_run_config
from research.cli import user_errors_exit_2
from research.methods import get_method
from research.models import load_pipeline, pick_device, pick_precision, weight_dtype
from research.sampling import check_saved_artifacts, run_prompts, sample_run

OVERRIDES = ["num_eval_images", "num_inference_steps", "guidance_scale", "sampler", "device", "eval_seed_offset"]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m research.sample", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_dir_argument(parser)
    add_config_arguments(parser, names=OVERRIDES + ["validation_prompts_file"])
    return parser


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run_dir, cfg = finished_run_config(parser, args, OVERRIDES)
    prompts = run_prompts(run_dir, cfg, args.validation_prompts_file)
    check_saved_artifacts(run_dir / "checkpoints")  # before anything is overwritten
    device = pick_device(cfg.device)
    pipe = load_pipeline(cfg.base_model, weight_dtype(pick_precision(cfg.mixed_precision, device))).to(device)
    sample_run(run_dir, cfg, get_method(cfg), prompts=prompts, base_pipe=pipe)
    print(f"images in {run_dir / 'inference'}, strips in {run_dir / 'thumbnails'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
