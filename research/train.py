"""Train a style adapter on a folder of images, then sample and evaluate it: one run (thin CLI over
research/experiments/one_run.py and the loop in research/training/).

    python -m research.train --style-dir data/ghibli --rank 16
    python -m research.train --config research/configs/toy.json          # the embedded toy default
    python -m research.train --run-dir runs/exp1/<run> --resume-from-checkpoint latest  # reads the run's config.json

Under `accelerate launch` / `torchrun` every process trains its share of each batch; the main process
keeps the run folder and MLflow run and prints the table.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from contextlib import contextmanager

from accelerate import PartialState

from research.arguments import OneLineParser, add_config_arguments, given_values
from research.cli import user_errors_exit_2
from research.config import TrainConfig
from research.errors import ENVIRONMENT_ERRNOS, RunInterrupted
from research.evaluation import format_table
from research.experiments.one_run import run
from research.training.checkpoints import resumed_config


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m research.train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--no-tracking", action="store_true", help="write the run folder only, no MLflow run")
    return parser


@contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise RunInterrupted in the main thread, so the run ends through its own
    bookkeeping (state kept, status KILLED); a second signal during that cleanup is ignored."""
    def handler(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise RunInterrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with stop_on_signals():
            values = given_values(args)
            resume = bool(values.get("resume_from_checkpoint"))
            cfg = resumed_config(values) if resume else TrainConfig.from_dict(values, source="command line")
            run_dir = run(cfg, track=not args.no_tracking)
    except RunInterrupted as stop:
        print(f"error: {stop.reason or f'stopped by {stop.signal_name} before the run started; nothing was written'}",
              file=sys.stderr)
        return 128 + signal.Signals[stop.signal_name].value
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"error: {err.strerror} ({err.filename or 'while writing'}); free space or fix permissions, then "
              "continue with --run-dir <the run folder> --resume-from-checkpoint latest.", file=sys.stderr)
        return 2
    if not PartialState().is_main_process:
        return 0  # the main process reports the run
    print("\n" + format_table(json.loads((run_dir / "metrics.json").read_text())))
    print(f"\nDone. Run folder: {run_dir}\n  strips:  {run_dir / 'thumbnails'}\n  metrics: {run_dir / 'metrics.json'}"
          f"\n  browse:  make ui  (MLflow on http://127.0.0.1:5000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
