"""MLflow run + run folder: the two records every run leaves.

The run folder (``runs/<experiment>/<timestamp>_<name>/``) has the layout users of the seed know;
its files are logged to MLflow as artifacts at the end. MLflow defaults to a SQLite store in the
repository root (``sqlite:///mlflow.db``, artifacts in ``mlartifacts/``); ``MLFLOW_TRACKING_URI``
points elsewhere (a team server). Under ``mlflow run`` the run it created (``MLFLOW_RUN_ID``) is the
parent of ours: it holds the MLproject parameters as given, ours the resolved config that ran.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from research.atomic import write_json

REPO_ROOT = Path(__file__).resolve().parent.parent
SUBDIRS = ("checkpoints", "inference", "thumbnails")
log = logging.getLogger("research")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def new_run_dir(output_dir: str, experiment: str, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / experiment / f"{stamp}_{name}"
    path, i = base, 1
    while path.exists():  # two runs in the same second get distinct folders
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


class _Console(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(log_file: Path | None = None) -> None:
    """Console and logs.txt get the same lines; third-party noise stays out of both."""
    root = logging.getLogger("research")
    root.setLevel(logging.INFO)
    root.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, _Console) for h in root.handlers):
        console = _Console()
        console.setFormatter(fmt)
        root.addHandler(console)
    if log_file is not None:
        for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(h)
            h.close()
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(fmt)
        root.addHandler(handler)


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"adapter": {"fid": {"mean": 3}}} -> {"adapter.fid": 3}: MLflow keys mirror metrics.json."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if "mean" in value:
                flat[name] = float(value["mean"])
            else:
                flat.update(flatten_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


class Tracker:
    """One MLflow run (or none, with ``enabled=False``) bound to one run folder."""

    def __init__(self, run_dir: Path, experiment: str, run_name: str, tags: dict[str, str], enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled
        self.run_id: str | None = None
        if not enabled:
            return
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri())
        experiment_id = self._experiment_id(experiment)
        # `mlflow run` opened a launcher run and logged every MLproject parameter, defaults included,
        # before --config was read, and MLflow forbids changing a param; so the values that ran go into
        # a run of our own in the named experiment, under the launcher. The variable is popped for
        # start_run only (it would resume the launcher) and kept for child processes (compare's methods).
        launcher = os.environ.pop("MLFLOW_RUN_ID", None)
        try:
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                   tags={"mlflow.parentRunId": launcher, **tags} if launcher else tags)
        finally:
            if launcher:
                os.environ["MLFLOW_RUN_ID"] = launcher
        self.run_id = run.info.run_id
        if launcher:
            mlflow.MlflowClient().set_tag(launcher, "mlflow.note.content",
                                          f"Launched run {run_name} ({self.run_id}) in experiment {experiment}. "
                                          "The params here are the entry point's inputs (MLproject defaults where "
                                          "none was given); that run's params are the values used.")

    def _experiment_id(self, name: str) -> str:
        # the experiment kind MLflow 3 records for model training (not GenAI traces); the 3.17 UI itself
        # follows its global GenAI / Model training switch, which `make ui` sets through its URL
        kind = ("mlflow.experimentKind", "custom_model_development")
        found = self.mlflow.get_experiment_by_name(name)
        if found is not None:
            if kind[0] not in found.tags:
                self.mlflow.MlflowClient().set_experiment_tag(found.experiment_id, *kind)
            return found.experiment_id
        location = None
        if tracking_uri().startswith("sqlite:///"):  # artifacts beside the SQLite store, not in the cwd
            location = (Path(tracking_uri()[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        return self.mlflow.create_experiment(name, artifact_location=location, tags=dict([kind]))

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the resolved config: the run is always our own, so these are the values that ran."""
        if self.enabled:
            self.mlflow.log_params({k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled and metrics:
            self.mlflow.log_metrics(metrics, step=step)

    def log_image(self, image, name: str, step: int | None = None) -> None:
        if self.enabled:
            stem = name if step is None else f"{Path(name).stem}_step{step:06d}{Path(name).suffix}"
            self.mlflow.log_image(image, f"validation/{stem}")

    def log_folder(self, skip: tuple[str, ...] = ()) -> None:
        """Log the run folder's files as artifacts (keeping its layout)."""
        if not self.enabled:
            return
        for path in sorted(self.run_dir.rglob("*")):
            rel = path.relative_to(self.run_dir)
            if path.is_file() and not any(rel.parts[0] == s or str(rel).startswith(s) for s in skip):
                parent = str(rel.parent) if str(rel.parent) != "." else None
                self.mlflow.log_artifact(str(path), artifact_path=parent)

    def fail(self) -> None:
        """End the run as FAILED, keeping its log."""
        if self.enabled:
            self.mlflow.log_artifact(str(self.run_dir / "logs.txt"))
        self.finish("FAILED")

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.mlflow.end_run(status=status)


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    write_json(run_dir / "metrics.json", metrics)
