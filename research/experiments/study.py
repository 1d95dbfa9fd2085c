"""The whole study as one sequence: Experiments I-IV, then the report, each stage its own command.

  styles   Exp I: one LoRA per style folder under --data-root   python -m research.styles
  search   Exp II: a small Optuna search on the first style       python -m research.search
  compare  Exp III: LoRA vs TI vs DreamBooth at the config budget python -m research.compare
  blend    Exp IV: blend the adapters of two Exp-I styles         python -m research.blend
  report   the HTML report from MLflow                            python reports/report.py

The stages run one after another in fresh processes. A stage whose result MLflow already holds is
skipped (so a killed study resumes where it stopped) unless --force names it; a failed stage is
reported and the stages that do not need it still run. `record` keeps the timings as a `study` run
in MLflow experiment `study` (metrics stage.<name>.seconds). research/study.py is its command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from research.atomic import write_json
from research.data import DataError, style_folders
from research.errors import StageError
from research.tracking import REPO_ROOT, Tracker, new_run_dir, tracking_uri

log = logging.getLogger("research")
STAGES = ("styles", "search", "compare", "blend", "report")
EXPERIMENTS = {"styles": "exp1", "search": "exp2", "compare": "exp3", "blend": "exp4"}


@dataclass
class Stage:
    name: str
    argv: Callable[[argparse.Namespace], list[str]]  # the command after the python executable
    done: Callable[[argparse.Namespace], bool]  # does MLflow already hold its result?


# ─── what MLflow already holds ──────────────────────────────────────────────────────────────
def finished_runs(experiment: str, filter_string: str) -> list:
    import mlflow  # deferred: its import takes seconds, and only a stage's done-check needs it

    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(experiment) is None:
        return []
    flt = "attributes.status = 'FINISHED'" + (f" and {filter_string}" if filter_string else "")
    return mlflow.search_runs(experiment_names=[experiment], filter_string=flt, output_format="list",
                              order_by=["attributes.start_time DESC"])


def style_adapters() -> dict[str, str]:
    """{style: run folder} of the newest finished Exp-I LoRA run of each style (tags style, run_dir)."""
    newest = {}
    for run in finished_runs(EXPERIMENTS["styles"], "tags.method = 'lora'"):
        tags = run.data.tags
        if "style" in tags and "run_dir" in tags and "study_name" not in tags and Path(tags["run_dir"]).is_dir():
            newest.setdefault(tags["style"], tags["run_dir"])
    return newest


def study_name(args) -> str:
    return f"study_{first_style(args).name}"


def first_style(args) -> Path:
    """The style folder Experiments II and III train on: --style, or the first of --styles under --data-root."""
    try:
        return style_folders(Path(args.data_root), args.style or args.styles)[0]
    except DataError as err:  # this stage cannot start; the stages that do not need a style folder still run
        raise StageError(str(err)) from None


# ─── the stages' commands ───────────────────────────────────────────────────────────────────
def styles_argv(args) -> list[str]:
    return ["-m", "research.styles", "--config", args.config, "--data-root", args.data_root,
            *(["--styles", args.styles] if args.styles else [])]


def search_argv(args) -> list[str]:
    return ["-m", "research.search", "--config", args.config, "--style-dir", str(first_style(args)),
            "--study-name", study_name(args), "--n-trials", str(args.trials), "--rank-choices", args.rank_choices,
            "--steps-range", args.steps_range, "--lr-range", args.lr_range]


def compare_argv(args) -> list[str]:
    """Exp III on the first style; its LoRA arm is Exp I's LoRA of that style when that run has the same recipe
    (research.compare checks, and trains the arm when it does not)."""
    style = first_style(args)
    exp1 = style_adapters().get(style.name)
    return ["-m", "research.compare", "--config", args.config, "--style-dir", str(style),
            *(["--reuse", f"lora={exp1}"] if exp1 else [])]


def blend_argv(args) -> list[str]:
    adapters = style_adapters()
    if len(adapters) < 2:
        raise StageError(f"Experiment IV blends two Experiment-I adapters; MLflow has {len(adapters)} finished "
                         "style run(s) with a run folder here. Run the styles stage first.")
    a, b = sorted(adapters)[:2]
    return ["-m", "research.blend", "--adapter-a", adapters[a], "--adapter-b", adapters[b]]


def report_argv(args) -> list[str]:
    return [str(REPO_ROOT / "reports" / "report.py")]


STAGE_TABLE = [
    Stage("styles", styles_argv, lambda a: bool(finished_runs("exp1", "tags.experiment_kind = 'styles'"))),
    Stage("search", search_argv,
          lambda a: len(finished_runs("exp2", f"tags.study_name = '{study_name(a)}'")) >= a.trials),
    Stage("compare", compare_argv, lambda a: bool(finished_runs("exp3", "tags.comparison LIKE '%'"))),
    Stage("blend", blend_argv, lambda a: bool(finished_runs("exp4", "tags.method = 'lora_blend'"))),
    Stage("report", report_argv, lambda a: False),  # cheap, and must show what the others just added
]


# ─── running them ───────────────────────────────────────────────────────────────────────────
def run_command(argv: list[str]) -> int:
    """One stage in a fresh process. Not under `mlflow run`'s launcher run: each stage's runs belong
    to their own experiment, and the launcher's params are not theirs."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=env).returncode


def run_study(args, stages: list[Stage] | None = None, runner: Callable[[list[str]], int] | None = None) -> dict:
    """{stage: {"status": done|skipped|failed|not run, "seconds": s}}, printing each stage as it goes."""
    results, runner = {}, runner or run_command
    chosen = [s for s in (stages or STAGE_TABLE) if s.name not in args.skip]
    for number, stage in enumerate(chosen, 1):
        head = f"[{number}/{len(chosen)}] {stage.name}"
        start = time.perf_counter()
        try:
            if stage.name not in args.force and stage.done(args):
                status = "skipped"
                print(f"{head}: skipped, MLflow already holds its result (--force {stage.name} redoes it)", flush=True)
            else:
                argv = stage.argv(args)
                print(f"{head}: python {' '.join(argv)}", flush=True)
                status = "done" if runner(argv) == 0 else "failed"
        except StageError as err:
            status = "not run"
            print(f"{head}: not run: {err}", flush=True)
        elapsed = time.perf_counter() - start
        results[stage.name] = {"status": status, "seconds": elapsed}
        print(f"{head}: {status} in {elapsed:.0f} s", flush=True)
    return results


def record(results: dict, total: float) -> None:
    """The stages' status and wall time as a `study` run in MLflow (and its run folder)."""
    run_dir = new_run_dir("runs", "study", "study")
    write_json(run_dir / "stages.json", results)
    tracker = Tracker(run_dir, "study", "study", {"experiment_kind": "study"})
    tracker.log_metrics({f"stage.{k}.seconds": v["seconds"] for k, v in results.items()} | {"study.seconds": total})
    tracker.mlflow.set_tags({f"stage.{k}": v["status"] for k, v in results.items()})
    tracker.log_folder()
    tracker.finish("FINISHED" if all(v["status"] in ("done", "skipped") for v in results.values()) else "FAILED")
