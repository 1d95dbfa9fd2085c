"""Experiment III's command line: LoRA vs Textual Inversion vs DreamBooth (research/experiments/method_comparison.py).

    python -m research.compare --style-dir data/ghibli
    python -m research.compare --config research/configs/toy.json --methods lora,textual_inversion

Every method trains on the same images and split, for the same --max-train-steps with the same
batch size, seeds, prompts, sampler and evaluation images: each is `research.experiments.one_run.run` with only
the method and its learning rate changed. Each method is its own MLflow run in experiment exp3,
tagged comparison=<id>; the comparison folder runs/exp3/<timestamp>_compare/ gets comparison.json
(quality from each run's metrics.json + cost) and comparison.png.

Learning rates: --learning-rate sets LoRA's rate and DreamBooth keeps its SD 1.5 ratio to it
(RECIPE_LEARNING_RATES scaled by --learning-rate / 1e-4: the toy config's 2e-3 gives DreamBooth 1e-4).
Textual Inversion keeps SD 1.5's 5e-3 as it is: it trains token vectors, whose scale is the text
encoder's, not the UNet's (at the scaled 0.1 its vectors grew to 30-40 times the longest word's and
content fell 28 points). --learning-rates method=value pins one.

Each method runs in a fresh process (default): timings get no warm-up advantage from an earlier
method, peak memory is that method's own (CPU peak RSS is per process), and a crash or
out-of-memory in one method is reported as failed without touching the others.
--fresh-processes false runs them one after another in this process (saves ~10 s of imports per
method on tiny models; CPU peak memory then only grows from method to method).

--reuse lora=runs/exp1/<run> takes a finished run as that method's arm instead of training it, when its
config.json is this comparison's recipe for the method (only the run's name, folder and experiment may
differ); otherwise it says why and trains. `make study` reuses Experiment I's LoRA of the style this way:
same config, same seed, and on the toy default the same metrics to the last digit. The arm keeps the cost
measured when it trained; tracked, a copy of its MLflow run (tagged reused_run_id) joins exp3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from research.arguments import OneLineParser, add_config_arguments, config_from_args
from research.cli import user_errors_exit_2
from research.config import RECIPE_LEARNING_RATES, ConfigError, parse_bool
from research.experiments.method_comparison import (REFERENCE_LR, compare, format_table, learning_rates,
                                                     run_in_fresh_process, run_in_this_process)
from research.data import require_style_dir
from research.methods import METHODS


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m research.compare", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods to compare (default: all of them)")
    parser.add_argument("--learning-rates", "--learning_rates", dest="learning_rates", default="",
                        help="pin a method's learning rate, e.g. dreambooth=2e-6,textual_inversion=1e-3 "
                             f"(default: {RECIPE_LEARNING_RATES}, LoRA's and DreamBooth's scaled by --learning-rate / {REFERENCE_LR:g})")
    parser.add_argument("--fresh-processes", "--fresh_processes", dest="fresh_processes", type=parse_bool,
                        default=True, metavar="BOOL",
                        help="train each method in its own fresh process (fair timings, per-method peak memory, "
                             "crash isolation); false = one process, faster for tiny models (default: true)")
    parser.add_argument("--reuse", default="", metavar="METHOD=RUN_DIR,...",
                        help="finished run folders to take as a method's arm when they ran this exact recipe "
                             "(e.g. lora=runs/exp1/20261126-005929_comic_lora); otherwise the method trains")
    parser.add_argument("--no-tracking", action="store_true", help="write the run folders only, no MLflow runs")
    add_config_arguments(parser)
    parser.set_defaults(experiment="exp3")  # Experiment III's MLflow experiment and runs/exp3/ folder
    return parser


def reuse_pairs(text: str, methods: list[str]) -> dict[str, Path]:
    """--reuse's method=run_dir pairs, each naming a compared method and an existing folder."""
    pairs = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, folder = (x.strip() for x in item.partition("="))
        if not sep or name not in methods:
            raise ConfigError(f"--reuse takes method=run_dir pairs for methods in --methods ({','.join(methods)}), "
                              f"got {item!r}.")
        if not Path(folder).is_dir():
            raise ConfigError(f"--reuse {name}={folder}: no such run folder; pass an existing runs/<experiment>/<run>.")
        pairs[name] = Path(folder)
    return pairs


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise ConfigError(f"--methods must list distinct methods from {','.join(METHODS)}, got {args.methods!r}.")
    reuse = reuse_pairs(args.reuse, methods)
    cfg = config_from_args(args)
    require_style_dir(cfg.style_dir)
    rates = learning_rates(cfg, methods, args.learning_rates)
    start = time.perf_counter()
    runner = run_in_fresh_process if args.fresh_processes else run_in_this_process
    folder = compare(cfg, methods, rates, track=not args.no_tracking, runner=runner, reuse=reuse)
    result = json.loads((folder / "comparison.json").read_text())
    print("\n" + format_table(result))
    print(f"\nDone in {time.perf_counter() - start:.0f} s. Comparison: {folder / 'comparison.json'}"
          f"\n  figure: {folder / 'comparison.png'}\n  browse: make ui  (experiment {cfg.experiment})")
    return 0 if all(r["status"] == "finished" for r in result["methods"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
