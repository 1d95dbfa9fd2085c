"""Experiment II's command line: search LoRA rank, training steps and learning rate with Optuna.

    python -m research.search --config research/configs/toy.json --n-trials 12          # TPE (seeded), pruning
    python -m research.search --config research/configs/toy.json --search-sampler grid  # the original 4 x 4 x 2 grid
    python -m research.search --config research/configs/toy.json \
        --objectives adapter.style_similarity,adapter.clip_score                         # NSGA-II, Pareto front
    python -m research.search --config research/configs/toy.json --workers 2            # two processes, one study
    python -m research.search --storage postgresql://user:pw@db/optuna --study-name ghibli-v1 \
        --n-trials 8 --finalize false                                                    # on each of many machines

Each parameter means one thing: rank is categorical, steps and learning rate are log-scaled, and
LoRA alpha follows rank (alpha = rank x --lora-alpha-ratio), so a larger rank does not secretly
raise the learning rate. The ratio itself is searched when --lora-alpha-ratio lists several values.

Honest selection: every trial is evaluated on the *selection* half of the held-out images
(--heldout-split selection); when the study ends the best trial (every Pareto trial with several
objectives) is re-scored on the *reporting* half with fresh seeds, and both numbers are printed and
logged to the study's parent MLflow run.

Records: the study is one parent MLflow run; each trial is a child run (research.experiments.one_run.run) with its
params, trial number, intermediate and final metrics, adapter and sample strips. A pruned trial keeps
its run as KILLED with its partial metrics; a failed one is FAILED and the study goes on.

Storage: by default a JournalStorage file (optuna.journal in the repository root), safe for several
processes on one machine (SQLite is not). For many machines pass any RDB URL (PostgreSQL) and one
MLFLOW_TRACKING_URI; a trial whose worker dies is marked failed by heartbeat and retried.

Its logic is research/experiments/hyperparameter_search.py (trials, storage, samplers, pruning) and
research/experiments/search_records.py (parent run, re-scoring, table, figures, summary).
"""

from __future__ import annotations

import argparse
import sys

import torch

from research.arguments import OneLineParser, add_config_arguments, config_from_args
from research.cli import user_errors_exit_2
from research.config import ConfigError, TrainConfig, parse_bool
from research.experiments.hyperparameter_search import (DEFAULT_EXPERIMENT, DEFAULT_STORAGE, DEFAULT_TRIALS,
                                                        ORIGINAL_GRID, PRUNERS, SAMPLERS,
                                                        safe_storage, check_objectives, resolve_directions,
                                                        search, search_space)
from research.experiments.search_records import print_summary
from research.tracking import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m research.search", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    s = parser.add_argument_group("search")

    def flag(name: str, **kw):
        s.add_argument(f"--{name.replace('_', '-')}", *([f"--{name}"] if "_" in name else []), dest=name, **kw)

    flag("n_trials", type=int, default=-1, help="trials this command adds (between its --workers); -1 = 20, or "
         "the rest of the grid with --search-sampler grid; 0 = none, only summarise and re-score")
    flag("total_trials", type=int, default=0, help="stop every worker once the study holds this many finished "
         "(complete or pruned) trials; 0 = no such target")
    flag("objectives", type=str, default="adapter.style_similarity", help="comma-separated metrics.json keys "
         "to optimise, flattened: adapter.<metric>, delta.<metric>, cost.<field>; several = multi-objective")
    s.add_argument("--objective", dest="objectives", help="alias of --objectives")
    flag("direction", type=str, default="auto", help="auto (minimise fid/kid/cost, maximise the rest) or "
         "maximize/minimize, one per objective")
    flag("search_sampler", type=str, default="auto", choices=SAMPLERS,
         help="auto = tpe for one objective, nsga2 for several; grid = every point of --grid-*")
    flag("sampler_seed", type=int, default=-1, help="sampler seed (plus the trials already in the study); "
         "-1 = derived from --seed, this host and process, so parallel workers differ (the seed used is logged)")
    flag("rank_choices", type=str, default="4,8,16,32,64,128", help="LoRA ranks to try (categorical)")
    flag("steps_range", type=str, default="250,2000", help="low,high optimizer steps (log scale)")
    flag("lr_range", type=str, default="1e-5,1e-3", help="low,high learning rate (log scale)")
    flag("lora_alpha_ratio", type=str, default="1", help="LoRA alpha = rank x this ratio; several values = "
         "the ratio is searched too (categorical)")
    flag("grid_ranks", type=str, default=ORIGINAL_GRID["rank"], help="ranks of --search-sampler grid")
    flag("grid_steps", type=str, default=ORIGINAL_GRID["max_train_steps"], help="steps of --search-sampler grid")
    flag("grid_lrs", type=str, default=ORIGINAL_GRID["learning_rate"], help="learning rates of --search-sampler grid")
    flag("pruner", type=str, default="median", choices=PRUNERS, help="stop trials whose intermediate score "
         "lags (one image-metric objective only)")
    flag("report_every", type=int, default=250, help="steps between intermediate scores; 0 = no pruning")
    flag("prune_images", type=int, default=8, help="images per intermediate score (on the selection references)")
    flag("reporting_seed_offset", type=int, default=100_000, help="added to --seed for the re-scoring of the "
         "best trial(s): fresh seeds, never seen by the selection")
    flag("storage", type=str, default="", help="empty = a JournalStorage file optuna.journal (several processes, "
         "one machine); a file path = a journal there; postgresql://user:pw@host/db = many machines")
    flag("study_name", type=str, default="", help="study to create or resume (default <style>_<method>_<sampler>)")
    flag("workers", type=int, default=1, help="worker processes on this machine, sharing its cores")
    flag("grid_share", type=str, default="0/1", help="--search-sampler grid: this worker runs grid points i, i+K, "
         "i+2K, ... of i/K (--workers sets it; on K machines give each its own i)")
    flag("threads", type=int, default=0, help="torch/OpenMP threads of this worker; 0 = the machine's cores "
         "divided by --workers")
    flag("heartbeat_interval", type=int, default=60, help="RDB storage: seconds between a trial's heartbeats; "
         "a trial silent for 2x this is failed and retried; 0 = off")
    flag("finalize", type=parse_bool, default=True, help="after the trials: summary, re-scoring, the parent "
         "run's table and figures; false on all but one of many machines (finalize later with --n-trials 0)")
    add_config_arguments(parser)
    parser.set_defaults(experiment=DEFAULT_EXPERIMENT)  # trials go to exp2 unless --experiment says otherwise
    return parser


def check_options(opts: argparse.Namespace, cfg: TrainConfig) -> None:
    """Everything a person could get wrong, refused before a study or a run exists."""
    if cfg.run_dir or cfg.resume_from_checkpoint:
        raise ConfigError("--run-dir and --resume-from-checkpoint do not apply to a search; "
                          "resume a search by running it again with the same --study-name.")
    if "lora_alpha" in getattr(opts, "_typed", set()):
        raise ConfigError("--lora-alpha does not apply to a search: alpha follows rank; use --lora-alpha-ratio.")
    for name in ("workers", "prune_images"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}.")
    for name in ("total_trials", "report_every", "threads", "heartbeat_interval", "reporting_seed_offset"):
        if getattr(opts, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative, got {getattr(opts, name)}.")
    if opts.n_trials is not None and opts.n_trials < -1:
        raise ConfigError(f"--n-trials must be -1 (default), 0 or a positive number, got {opts.n_trials}.")
    share = opts.grid_share.split("/")
    if len(share) != 2 or not all(x.isdigit() for x in share) or not int(share[0]) < int(share[1]):
        raise ConfigError(f"--grid-share must be i/K with 0 <= i < K, e.g. 0/2, got {opts.grid_share!r}.")
    if opts.search_sampler == "grid" and len(opts.objectives) > 1:
        raise ConfigError("--search-sampler grid takes one objective; drop it for NSGA-II over several.")
    if opts.workers > 1 and opts.storage.startswith("sqlite"):
        raise ConfigError("SQLite is not safe for several writers; drop --storage (a journal file) or pass a "
                          "PostgreSQL URL for --workers > 1.")


def resolve_options(args: argparse.Namespace, argv: list[str], cfg: TrainConfig) -> argparse.Namespace:
    opts = argparse.Namespace(**vars(args))
    opts.argv = argv
    opts.objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    if not opts.objectives:
        raise ConfigError("--objectives must name at least one metrics.json key, e.g. adapter.style_similarity.")
    if opts.search_sampler == "auto":
        opts.search_sampler = "nsga2" if len(opts.objectives) > 1 else "tpe"
    opts.directions = resolve_directions(opts.objectives, args.direction)
    opts.space = search_space(args, opts.search_sampler, cfg.method)
    opts.storage = args.storage or DEFAULT_STORAGE
    opts.storage_label = safe_storage(opts.storage)  # no password in summaries
    if args.n_trials == -1:
        opts.n_trials = None if opts.search_sampler == "grid" else DEFAULT_TRIALS
    opts.study_name = args.study_name or f"{cfg.resolved_run_name()}_{opts.search_sampler}"
    check_options(opts, cfg)
    check_objectives(cfg, opts.objectives)
    return opts


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging()
    cfg = config_from_args(args)
    opts = resolve_options(args, argv, cfg)
    if opts.threads and opts.workers == 1:
        torch.set_num_threads(opts.threads)  # this worker's share of the machine's cores
    summary = search(cfg, opts)
    if not summary.get("finalized", True):
        return 0
    return print_summary(summary)


if __name__ == "__main__":
    sys.exit(main())
