"""The whole study as one command: Experiments I–IV, then the report (research/experiments/study.py).

    python -m research.study                                   # the embedded toy default (make study)
    python -m research.study --data-root data/anime --config my_sd15.json   # real styles, on a GPU
    python -m research.study --force search,report             # redo these stages even if MLflow has them

Stages, each its own command, run one after another in fresh processes:

  styles   Exp I: one LoRA per style folder under --data-root   python -m research.styles
  search   Exp II: a small Optuna search on the first style       python -m research.search
  compare  Exp III: LoRA vs TI vs DreamBooth at the config budget python -m research.compare
  blend    Exp IV: blend the adapters of two Exp-I styles         python -m research.blend
  report   the HTML report from MLflow                            python reports/report.py

A stage whose result MLflow already holds is skipped (so a killed study resumes where it stopped)
unless --force names it. Each stage prints its name and elapsed time; a failed stage is reported
and the stages that do not need it still run. The timings go to a `study` run in MLflow experiment
`study` (metrics stage.<name>.seconds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from research.arguments import OneLineParser
from research.cli import user_errors_exit_2
from research.config import ConfigError
from research.experiments.study import STAGES, record, run_study
from research.tracking import REPO_ROOT, setup_logging

TOY_CONFIG = "research/configs/toy.json"
TOY_DATA_ROOT = "data/toy"
# data/toy's stand-ins for the seed's three styles; its `plain` folder is the base model's own look,
# a control for `python -m research.styles`, not a style of the study (the Makefile's TOY_STYLES)
TOY_STYLES = "pastel,vivid,comic"


def stage_list(text: str) -> set[str]:
    names = {s.strip() for s in text.split(",") if s.strip()}
    unknown = names - set(STAGES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {', '.join(sorted(unknown))}; stages are {', '.join(STAGES)}")
    return names


def default_styles(data_root: str, styles: str) -> str:
    """--styles as given; left empty on the toy data root, its three styles."""
    return styles or (TOY_STYLES if Path(data_root) == Path(TOY_DATA_ROOT) else "")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m research.study", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=TOY_CONFIG, help="run config every stage starts from")
    parser.add_argument("--data-root", "--data_root", dest="data_root", default=TOY_DATA_ROOT,
                        help="folder of style folders (one per style)")
    parser.add_argument("--styles", default="",
                        help=f"comma-separated style folders for Exp I (default: every one under --data-root; "
                             f"under {TOY_DATA_ROOT}: {TOY_STYLES}, leaving out the base model's `plain`)")
    parser.add_argument("--style", default="", help="style folder name for Exp II and III (default: the first of --styles)")
    # a small search: on 2 CPU cores each toy trial takes 1-3 minutes. Optuna's TPE draws its first 10
    # trials at random, so these few are a random search; `make search TRIALS=20` is the full one
    parser.add_argument("--trials", type=int, default=3, help="Exp II trials (default: 3)")
    parser.add_argument("--rank-choices", "--rank_choices", dest="rank_choices", default="4,8,16",
                        help="Exp II LoRA ranks")
    parser.add_argument("--steps-range", "--steps_range", dest="steps_range", default="150,600",
                        help="Exp II low,high training steps")
    parser.add_argument("--lr-range", "--lr_range", dest="lr_range", default="2e-4,2e-3",
                        help="Exp II low,high learning rate")
    # string defaults: argparse runs them through stage_list too, and MLproject can pass ""
    parser.add_argument("--force", type=stage_list, default="", help=f"comma-separated stages to redo, of {','.join(STAGES)}")
    parser.add_argument("--skip", type=stage_list, default="", help="comma-separated stages to leave out")
    return parser


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if not Path(args.config).is_file():
        raise ConfigError(f"config {args.config} does not exist; pass --config with a JSON run config.")
    args.styles = default_styles(args.data_root, args.styles)
    if args.trials <= 0:
        raise ConfigError(f"--trials must be a positive number, got {args.trials}.")
    start = time.perf_counter()
    results = run_study(args)
    total = time.perf_counter() - start
    record(results, total)
    print("\n" + "\n".join(f"  {k:<8} {v['status']:<8} {v['seconds']:7.0f} s" for k, v in results.items())
          + f"\n  total             {total:7.0f} s\nreport: {REPO_ROOT / 'reports' / 'out' / 'index.html'}")
    return 0 if all(v["status"] in ("done", "skipped") for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
