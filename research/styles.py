"""Experiment I's command line: one adapter per style folder (research/experiments/style_adapters.py).

    python -m research.styles                                   # the toy world: data/toy/<style>/, toy config
    python -m research.styles --config "" --data-root data/anime --base-model <sd-1.5> --rank 16

Every style folder under --data-root (a folder with images; its own validation_prompts.txt) is trained
and evaluated by research.experiments.one_run.run, as a child MLflow run of one parent run. The parent holds the
results table (results.csv: every metric's mean, 95% interval and n, per style and arm) and the style
grid (grid.png: rows = prompts, columns = the base model and each style's adapter, one seed per row),
both also written to runs/<experiment>/<timestamp>_styles/.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from research.arguments import OneLineParser, add_config_arguments, config_from_args
from research.cli import user_errors_exit_2
from research.config import ConfigError, TOY_CONFIG
from research.experiments.style_adapters import styles
from research.tracking import REPO_ROOT, setup_logging



def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m research.styles", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", "--data_root", dest="data_root", default="data/toy",
                        help="folder with one sub-folder of images per style")
    parser.add_argument("--styles", default="", help="comma-separated style folder names; empty = all")
    parser.add_argument("--grid-prompts-file", "--grid_prompts_file", dest="grid_prompts_file", default="",
                        help="prompts of the style grid's rows; empty = the styles' validation prompts in turn")
    parser.add_argument("--grid-rows", "--grid_rows", dest="grid_rows", type=int, default=4,
                        help="rows (prompts) of the style grid")
    add_config_arguments(parser)
    # the embedded toy default, like its data root; --config "" for the real-model defaults
    parser.set_defaults(config=str(TOY_CONFIG.relative_to(REPO_ROOT)), experiment="exp1")
    return parser


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    # the runs go to --experiment (exp1 by default), not to the experiment a --config file names
    cfg = dataclasses.replace(config_from_args(args), experiment=args.experiment)
    if args.grid_rows < 1:
        raise ConfigError(f"--grid-rows must be at least 1, got {args.grid_rows}.")
    summary = styles(cfg, Path(args.data_root), args.styles, args.grid_prompts_file, args.grid_rows)
    keys = [k for k in ("adapter.style_similarity", "delta.style_similarity", "adapter.oracle_style_accuracy",
                        "cost.train_seconds") if any(k in r for r in summary["rows"])]
    print(f"\nExperiment I: {len(summary['rows'])} styles in {summary['wall_seconds']:.0f} s")
    print(f"{'style':<16}{'status':<12}" + "".join(f"{k:>32}" for k in keys))
    for row in summary["rows"]:
        cells = "".join(f"{_cell(row, k):>32}" for k in keys)
        print(f"{row['style']:<16}{row['status'][:10]:<12}{cells}")
    print(f"\n  table: {summary['folder']}/results.csv\n  grid:  {summary['folder']}/grid.png"
          f"\n  MLflow parent run {summary['parent_run_id']} (make ui)")
    return 0 if all(r["status"] == "FINISHED" for r in summary["rows"]) else 1


def _cell(row: dict, key: str) -> str:
    if row.get(key) is None:
        return "-"
    lo, hi = row.get(f"{key}.ci95_lo"), row.get(f"{key}.ci95_hi")
    ci = f" [{lo:.3f},{hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{row[key]:.3f}{ci}" + (f" n={row[f'{key}.n']}" if row.get(f"{key}.n") is not None else "")


if __name__ == "__main__":
    sys.exit(main())
