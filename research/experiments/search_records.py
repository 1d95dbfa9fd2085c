"""Experiment II's records: the study's parent MLflow run, the re-scoring of the best trials on the
reporting references, the trials table, the figures and the console summary (hyperparameter_search
and research/search.py call them)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from research.atomic import write_json
from research.config import TrainConfig
from research.data import style_folder_for
from research.evaluation import reevaluate_run
from research.methods import get_method
from research.tracking import (experiment_id, flatten_metrics, mlflow_run_for_dir, process_alive, process_identity,
                               tracking_uri)
from research.training.checkpoints import STATE_PREFIX

log = logging.getLogger("research")
PARENT_WAIT_SECONDS = 60  # a worker that lost the race to create the study waits this long for its parent run


def mlflow_client():
    import mlflow  # deferred, as everywhere in research/: its import takes seconds

    return mlflow.MlflowClient(tracking_uri())


# ─── the parent run ─────────────────────────────────────────────────────────────────────────
def create_parent_run(cfg, study_name: str, settings: dict) -> str:
    """The study's MLflow run: `mlflow run -e search`'s own run when there is one, else a new run in exp2."""
    client = mlflow_client()
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        run_id = client.create_run(experiment_id(cfg.experiment), run_name=study_name).info.run_id
    client.set_tag(run_id, "study_name", study_name)
    client.set_tag(run_id, "role", "study")
    client.set_tag(run_id, "experiment_kind", "search")
    for key, value in settings.items():
        client.set_tag(run_id, f"search.{key}", value)
    return run_id


def wait_for_parent(study, cfg, settings: dict) -> None:
    """Another worker created the study a moment ago and is creating its parent run: wait for its id."""
    deadline = time.monotonic() + PARENT_WAIT_SECONDS
    while "mlflow_parent_run_id" not in study.user_attrs:
        if time.monotonic() > deadline:  # a study from before parent runs existed: give it one now
            study.set_user_attr("mlflow_parent_run_id", create_parent_run(cfg, study.study_name, settings))
            return
        time.sleep(0.5)


def worker_name() -> str:
    me = process_identity()  # the identity run records use to tell a live process from a gone one
    return f"{me['host']}-{me['pid']}"


def tag_worker(parent_run_id: str, seed: int, threads: int) -> None:
    """Each worker leaves its sampler seed on the parent run, so its draws can be repeated."""
    worker = worker_name()
    client = mlflow_client()
    client.set_tag(parent_run_id, f"worker.{worker}.sampler_seed", str(seed))
    client.set_tag(parent_run_id, f"worker.{worker}.threads", str(threads or "all"))


def retry_stale_trial(experiment: str):
    """Heartbeat callback: the dead worker's MLflow run becomes FAILED, and the trial is retried with the
    same params (Optuna's RetryHeartbeatStaleTrialCallback, formerly RetryFailedTrialCallback)."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=2)

    def on_stale(study, trial) -> None:
        run_dir = trial.user_attrs.get("run_dir")
        if run_dir:
            client, run_id = mlflow_client(), mlflow_run_for_dir(Path(run_dir))
            if run_id:
                client.set_tag(run_id, "trial_state", "FAIL (worker lost, retried)")
                client.set_terminated(run_id, "FAILED")
        log.warning("trial %d lost its worker; retrying its params", trial.number)
        retry(study, trial)

    return on_stale


def recover_dead_local_trials(experiment: str):
    """The journal file has no heartbeat, so a worker killed on this machine would leave its trial RUNNING
    for ever. This callback (run at a worker's start and after each of its trials) fails every RUNNING
    trial whose worker ran on this machine and is gone, then retries it exactly as a stale trial of an
    RDB storage is retried. Workers on other machines cannot be checked: use an RDB URL there."""
    on_stale = retry_stale_trial(experiment)

    def recover(study, _finished=None) -> None:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            host, _, pid = trial.user_attrs.get("worker", "").rpartition("-")
            if process_alive(pid, host, trial.user_attrs.get("worker_pid_start")):  # or on another machine
                continue
            try:  # the storage's own lock makes one worker the winner when several notice the same trial
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # as Optuna's fail_stale_trials
            except UpdateFinishedTrialError:
                continue  # another worker failed (and retried) it first
            on_stale(study, study._storage.get_trial(trial._trial_id))

    return recover


# ─── honest numbers: re-score on the reporting references and fresh seeds ────────────────────
def rescore(run_dir: Path, seed_offset: int) -> Path:
    """Evaluate a trial's saved adapter again, on the held-out half the selection never saw and with fresh
    seeds, in a sibling folder <run>_reporting (the trial's own numbers stay as they were)."""
    out = run_dir.with_name(f"{run_dir.name}_reporting")
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg.update(heldout_split="reporting", eval_seed_offset=seed_offset, run_dir=str(out))
    if (out / "metrics.json").is_file() and json.loads((out / "config.json").read_text()) == cfg:
        return out  # finalizing again (a resumed study): this trial was re-scored already
    shutil.rmtree(out, ignore_errors=True)
    (out / "checkpoints").mkdir(parents=True)
    for path in (run_dir / "checkpoints").iterdir():
        if not path.name.startswith(STATE_PREFIX):  # resumable training states are not needed to sample
            # a link, not a copy: a DreamBooth UNet is gigabytes and is stored once
            (out / "checkpoints" / path.name).symlink_to(path.resolve(), target_is_directory=path.is_dir())
    write_json(out / "config.json", cfg)
    rescored = TrainConfig.from_json_file(out / "config.json")
    reevaluate_run(out, rescored, get_method(rescored), style_folder_for(rescored))
    return out


def interval(metrics: dict, key: str) -> dict:
    """{"mean", "ci95", "n"} of a flattened metrics.json key (cost keys have a mean only)."""
    node = metrics
    for part in key.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict) and "mean" in node:
        return {"mean": node["mean"], "ci95": node.get("ci95"), "n": node.get("n")}
    flat = flatten_metrics(metrics)
    return {"mean": flat.get(key), "ci95": None, "n": None}


def selection_and_reporting(trial, objectives: list[str], seed_offset: int) -> dict:
    run_dir = Path(trial.user_attrs["run_dir"])
    selection = json.loads((run_dir / "metrics.json").read_text())
    reporting_dir = rescore(run_dir, seed_offset)
    reporting = json.loads((reporting_dir / "metrics.json").read_text())
    return {"reporting_run_dir": str(reporting_dir),
            "selection": {o: interval(selection, o) for o in objectives},
            "reporting": {o: interval(reporting, o) for o in objectives}}


# ─── the study's table, figures and summary ─────────────────────────────────────────────────
def trial_row(t) -> dict:
    return {"number": t.number, "state": t.state.name, "values": t.values, "params": t.params,
            "lora_alpha_ratio": t.user_attrs.get("lora_alpha_ratio"), "run_dir": t.user_attrs.get("run_dir"),
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
            **({"error": t.user_attrs["error"]} if "error" in t.user_attrs else {})}


def write_trials_csv(study, path: Path) -> Path:
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "duration"),
                                   multi_index=False)
    tmp = path.with_suffix(".tmp")
    frame.to_csv(tmp, index=False, quoting=csv.QUOTE_MINIMAL)
    tmp.replace(path)
    return path


def draw_figures(study, out_dir: Path) -> list[Path]:
    """Optuna's own plots: history (or the Pareto front with several objectives) and intermediate values."""
    import matplotlib  # deferred: plotting libraries load slowly and only the study's end draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plotting libraries load only when a figure is drawn
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"pareto_front": ovm.plot_pareto_front} if len(study.directions) > 1 else \
        {"optimization_history": ovm.plot_optimization_history}
    if any(t.intermediate_values for t in study.trials):
        plots["intermediate_values"] = ovm.plot_intermediate_values
    written = []
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as err:  # e.g. nothing complete yet
                log.warning("figure %s skipped: %s", name, err)
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def finalize(study, cfg, opts) -> dict:
    """Summary JSON, trials CSV and figures in runs/<experiment>/, the best trial(s) re-scored, and all of it
    on the parent MLflow run, which then ends FINISHED."""
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = study.best_trials if complete else []
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    summary = {"study_name": study.study_name, "storage": opts.storage_label, "objectives": opts.objectives,
               "directions": opts.directions, "search_sampler": opts.search_sampler, "pruner": opts.pruner,
               "n_trials": len(study.trials), "states": states,
               "best": [dict(trial_row(t), **selection_and_reporting(t, opts.objectives, opts.reporting_seed_offset))
                        for t in best],
               "trials": [trial_row(t) for t in study.trials]}
    base = Path(cfg.output_dir) / cfg.experiment / study.study_name
    summary_path = base.with_name(f"{base.name}_summary.json")
    summary["files"] = {"summary": str(summary_path),
                        "trials": str(write_trials_csv(study, base.with_name(f"{base.name}_trials.csv"))),
                        "figures": [str(p) for p in draw_figures(study, base.with_name(f"{base.name}_figures"))]}
    write_json(summary_path, summary)
    log_to_parent(study.user_attrs["mlflow_parent_run_id"], summary)
    return summary


def log_to_parent(run_id: str, summary: dict) -> None:
    client = mlflow_client()
    for state, count in summary["states"].items():
        client.log_metric(run_id, f"trials.{state.lower()}", count)
    if len(summary["best"]) == 1:  # one objective: the best trial's params and both of its numbers
        best = summary["best"][0]
        client.set_tag(run_id, "best_trial", str(best["number"]))
        client.set_tag(run_id, "best_run_id", str(best["mlflow_run_id"]))
        for name, value in best["params"].items():
            client.log_metric(run_id, f"best.{name}", float(value))
        for part in ("selection", "reporting"):
            for objective, v in best[part].items():
                _log_interval(client, run_id, f"{part}.{objective}", v)
    files = summary["files"]
    client.log_artifact(run_id, files["summary"])
    client.log_artifact(run_id, files["trials"])
    for figure in files["figures"]:
        client.log_artifact(run_id, figure, "figures")
    client.set_terminated(run_id, "FINISHED")


def _log_interval(client, run_id: str, key: str, v: dict) -> None:
    if v["mean"] is None or not math.isfinite(v["mean"]):
        return
    client.log_metric(run_id, key, v["mean"])
    if v.get("ci95") and all(x is not None and math.isfinite(x) for x in v["ci95"]):
        client.log_metric(run_id, f"{key}.ci95_lo", v["ci95"][0])
        client.log_metric(run_id, f"{key}.ci95_hi", v["ci95"][1])
    if v.get("n") is not None:
        client.log_metric(run_id, f"{key}.n", v["n"])


def _fmt(v: dict) -> str:
    if v["mean"] is None:
        return "-"
    ci = f" [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]" if v.get("ci95") else ""
    return f"{v['mean']:.4f}{ci}" + (f" (n={v['n']})" if v.get("n") is not None else "")


def print_summary(summary: dict) -> int:
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary["states"].items()))
    goals = ", ".join(f"{d} {o}" for d, o in zip(summary["directions"], summary["objectives"]))
    print(f"\nStudy {summary['study_name']} ({summary['search_sampler']}, pruner {summary['pruner']}): "
          f"{summary['n_trials']} trials ({states}); {goals}.")
    if not summary["best"]:
        print(f"error: no trial of study {summary['study_name']} completed; read the failed runs' logs.txt "
              f"(listed in {summary['files']['summary']}).", file=sys.stderr)
        return 1
    print("Best trial" if len(summary["objectives"]) == 1 else f"Pareto front ({len(summary['best'])} trials)")
    for best in summary["best"]:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        print(f"  trial {best['number']}: {params}  ({best['run_dir']})")
        for objective in summary["objectives"]:
            print(f"    {objective}: selection {_fmt(best['selection'][objective])} -> "
                  f"reporting {_fmt(best['reporting'][objective])}")
    files = summary["files"]
    print(f"  selection = the trial's own score (selection references, seeds from --seed); reporting = re-scored "
          f"on the other held-out half with fresh seeds\n  summary: {files['summary']}\n  trials:  {files['trials']}"
          f"\n  figures: {', '.join(files['figures']) or '-'}")
    return 0
