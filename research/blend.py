"""Experiment IV's command line: blend two style LoRAs (research/experiments/style_blend.py).

    python -m research.blend --adapter-a runs/exp1/<pastel run> --adapter-b runs/exp1/<comic run> \
        --weights 0,0.25,0.5,0.75,1 --export-weight 0.5

At weight t every adapted layer gets (1-t)·ΔW_A + t·ΔW_B with ΔW = (alpha/r)·B·A. Sampling uses
diffusers' multi-adapter, which adds exactly those two scaled deltas. ``--export-weight t`` writes ONE
adapter file with the same delta (the two ranks concatenated, alpha = rank so the loaded scale is 1),
in diffusers keys plus the kohya/A1111 copy; it loads with plain ``load_lora_weights``.

Output: ``runs/exp4/<timestamp>_<a>_x_<b>/`` with ``t_0.50/`` images, ``thumbnails/`` grids across t,
``metrics.json`` (per t: style similarity to A's and to B's held-out images, the oracle's probability
of each style) and ``checkpoints/`` (the exported blend); one MLflow run in experiment exp4.
"""

from __future__ import annotations

import argparse
import math
import sys

from research.arguments import OneLineParser, add_config_arguments
from research.cli import user_errors_exit_2
from research.config import ConfigError
from research.experiments.blend_files import WEIGHT_NAME
from research.experiments.style_blend import DEFAULT_EXPERIMENT, FLAGS, run_blend
from research.tracking import setup_logging


def parse_weights(text: str) -> list[float]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        weights = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--weights must be comma-separated numbers like 0,0.25,0.5,0.75,1, got {text!r}.") from None
    if not all(math.isfinite(t) for t in weights):
        raise ConfigError(f"--weights must be finite numbers, got {text!r}.")
    return list(dict.fromkeys(weights))


def parse_export_weight(text: str) -> float | None:
    if not str(text).strip():
        return None
    try:
        export = float(text)
    except ValueError:
        export = float("nan")
    if not math.isfinite(export):
        raise ConfigError(f"--export-weight must be a finite number like 0.5, got {text!r}.")
    return export


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m research.blend", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter-a", "--adapter_a", dest="adapter_a", required=True,
                        help="LoRA run folder (or its checkpoints folder) of style A (t=0)")
    parser.add_argument("--adapter-b", "--adapter_b", dest="adapter_b", required=True,
                        help="LoRA run folder (or its checkpoints folder) of style B (t=1)")
    parser.add_argument("--weights", default="0,0.25,0.5,0.75,1",
                        help="blend weights t to sample (0 = A, 1 = B); 'none' = export only")
    parser.add_argument("--export-weight", "--export_weight", dest="export_weight", default="",
                        help="also write one blended adapter file at this t; empty = none")
    add_config_arguments(parser, names=FLAGS)
    parser.set_defaults(experiment=DEFAULT_EXPERIMENT)  # blends go to exp4 unless --experiment says otherwise
    parser.add_argument("--no-tracking", action="store_true", help="write the run folder only, no MLflow run")
    return parser


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    weights, export = parse_weights(args.weights), parse_export_weight(args.export_weight)
    if not weights and export is None:
        raise ConfigError("Nothing to do: pass --weights to sample or --export-weight to write a blended adapter.")
    run_dir = run_blend(args.adapter_a, args.adapter_b, weights, export, args, track=not args.no_tracking)
    print(f"\nDone. Blend folder: {run_dir}\n  grids:   {run_dir / 'thumbnails'}\n  metrics: {run_dir / 'metrics.json'}"
          + (f"\n  adapter: {run_dir / 'checkpoints' / WEIGHT_NAME}" if export is not None else "")
          + f"\n  figure:  python reports/blend_figure.py --run-dir {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
