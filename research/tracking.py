"""MLflow run + run folder: the two records every run leaves.

The run folder (``runs/<experiment>/<timestamp>_<name>/``) has the layout users of the seed know;
its files are logged to MLflow as artifacts at the end. MLflow defaults to a SQLite store in the
repository root (``sqlite:///mlflow.db``, artifacts in ``mlartifacts/``); ``MLFLOW_TRACKING_URI``
points elsewhere (a team server). Under ``mlflow run`` the run it created (``MLFLOW_RUN_ID``) is the
parent of ours: it holds the MLproject parameters as given, ours the resolved config that ran.

Every run folder also holds ``run.json``: its status (RUNNING, FINISHED, FAILED, KILLED), why it
stopped, the MLflow run it belongs to (a resume reopens that run) and the process (pid, host) that
runs it. A run whose process is gone without saying so (SIGKILL, power loss) is marked KILLED the
next time a Tracker starts against the store, or by ``python -m research.tracking`` (``make clean-runs``).

A building block: it knows only atomic writes and errors. mlflow is imported inside the functions
that talk to the store: it takes seconds to import, and a --no-tracking run never needs it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from research.atomic import write_json
from research.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
SUBDIRS = ("checkpoints", "inference", "thumbnails")
RECORD = "run.json"  # the run folder's own record of its status and process
PID_TAG, HOST_TAG, START_TAG, REASON_TAG = "research.pid", "research.host", "research.pid_start", "research.end_reason"
log = logging.getLogger("research")
FILE_ONLY = {"file_only": True}  # log(..., extra=FILE_ONLY): logs.txt gets it, the console does not


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def new_run_dir(output_dir: str, experiment: str, name: str) -> Path:
    """Create and return a fresh run folder. mkdir without exist_ok is the claim itself, so two
    processes starting in the same second get distinct folders (no check-then-create race)."""
    parent = Path(output_dir) / experiment
    base = f"{time.strftime('%Y%m%d-%H%M%S')}_{name}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for i in range(10_000):
            path = parent / (f"{base}-{i}" if i else base)
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as err:
        raise ConfigError(f"Cannot create a run folder in {parent} ({err.strerror}); pass a writable "
                          "--output-dir.") from None
    raise ConfigError(f"{parent} already holds 10,000 runs named {base}; pass another --run-name.")


def check_store_writable(uri: str | None = None) -> None:
    """Refuse a read-only SQLite store up front (MLflow would retry for minutes, then fail mid-run)."""
    db = _sqlite_path(uri or tracking_uri())
    if db is None:
        return
    # SQLite writes the file and a journal beside it; a missing folder is created on first use
    target = db.parent if db.exists() else next(p for p in db.parents if p.exists())
    if not (target.is_dir() and os.access(target, os.W_OK)) or (db.exists() and not os.access(db, os.W_OK)):
        raise ConfigError(f"The MLflow store {db} is not writable; fix its permissions, set MLFLOW_TRACKING_URI "
                          "to a writable store, or pass --no-tracking.")


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a SQLite store across processes: two processes creating its tables (or
    one experiment) at once collide in alembic's migrations. Servers serialise on their own."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ─── the run folder's record, and finding runs whose process is gone ─────────────────────────
def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_identity() -> dict[str, str]:
    """pid, host and pid start time of this process: what tells later whether it is still running."""
    return {"pid": str(os.getpid()), "host": socket.gethostname(), "pid_start": _start_ticks(os.getpid())}


def process_alive(pid: str | None, host: str | None, pid_start: str | None = None) -> bool:
    """False only when sure: same host, and the pid is gone or now belongs to a later process."""
    if host != socket.gethostname() or not str(pid or "").isdigit():
        return True  # another machine's process cannot be checked from here
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return not pid_start or _start_ticks(int(pid)) in ("", pid_start)


def read_record(run_dir: Path) -> dict[str, Any]:
    try:
        value = json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def update_record(run_dir: Path, **fields: Any) -> None:
    write_json(Path(run_dir) / RECORD, {**read_record(run_dir), **fields})


def mark_dead_runs(output_dir: str | Path | None = None) -> list[str]:
    """Mark KILLED every MLflow run left RUNNING by a process of this host that is gone (and, given
    output_dir, every run folder whose run.json says RUNNING for such a process). Returns what it marked."""
    import mlflow  # deferred: mlflow takes seconds to import; untracked runs and refused commands never need it
    from mlflow.entities import ViewType

    marked = []
    client = mlflow.MlflowClient(tracking_uri())
    host = socket.gethostname()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    reason = "its process ended without closing the run (killed or crashed)"
    if experiments:
        for run in client.search_runs(experiments, f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
                                      run_view_type=ViewType.ALL, max_results=10_000):
            tags = run.data.tags
            if process_alive(tags.get(PID_TAG), tags.get(HOST_TAG), tags.get(START_TAG)):
                continue
            client.set_tag(run.info.run_id, REASON_TAG, reason)
            client.set_terminated(run.info.run_id, "KILLED")
            run_dir = run.data.tags.get("run_dir")
            if run_dir and read_record(Path(run_dir)).get("mlflow_run_id") == run.info.run_id:
                update_record(Path(run_dir), status="KILLED", reason=reason)
            marked.append(f"MLflow run {run.info.run_id} ({run.info.run_name})")
    for record_file in sorted(Path(output_dir).glob(f"*/*/{RECORD}")) if output_dir else []:
        record = read_record(record_file.parent)
        if record.get("status") == "RUNNING" and not process_alive(record.get("pid"), record.get("host"),
                                                                     record.get("pid_start")):
            update_record(record_file.parent, status="KILLED", reason=reason)
            marked.append(f"run folder {record_file.parent}")
    return marked


class _Console(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def filter(self, record):
        return not getattr(record, "file_only", False) and super().filter(record)


def setup_logging(log_file: Path | None = None, replay: list[logging.LogRecord] = ()) -> None:
    """Console and logs.txt get the same lines; third-party noise stays out of both. `replay` are records
    logged before the run folder existed (see early_records), written to logs.txt first."""
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
        for record in replay:
            handler.handle(record)


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def early_records() -> Iterator[list[logging.LogRecord]]:
    """Keep what is logged while a run is checked (skipped images, encodings) for its logs.txt, which
    can only be opened once the checks have passed and the folder exists."""
    keep = _Keep()
    logger = logging.getLogger("research")
    logger.addHandler(keep)
    try:
        yield keep.records
    finally:
        logger.removeHandler(keep)


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"delta": {"fid": {"mean": -3, "ci95": [-5, -1]}}} -> {"delta.fid": -3, "delta.fid.ci95_lo": -5,
    "delta.fid.ci95_hi": -1}: MLflow keys mirror metrics.json (non-finite values are left out)."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if "mean" in value:  # a NaN reads back from metrics.json as null
                flat[name] = _number(value["mean"])
                for bound, x in zip(("ci95_lo", "ci95_hi"), value.get("ci95") or ()):
                    flat[f"{name}.{bound}"] = _number(x)
            else:
                flat.update(flatten_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return {k: v for k, v in flat.items() if math.isfinite(v)}


def _number(x) -> float:
    return float("nan") if x is None else float(x)


# the experiment kind MLflow 3 records for model training (not GenAI traces); the 3.17 UI itself follows
# its global GenAI / Model training switch, which `make ui` sets through its URL
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(name: str) -> str:
    """The MLflow experiment of that name, created if missing (artifacts beside a SQLite store)."""
    import mlflow  # deferred: mlflow takes seconds to import; untracked runs and refused commands never need it

    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND[0] not in found.tags:
            mlflow.MlflowClient().set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:///"):  # artifacts beside the SQLite store, not in the cwd
        location = (Path(tracking_uri()[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(name).experiment_id  # another process created it first


class Tracker:
    """One MLflow run (or none, with ``enabled=False``) bound to one run folder and its run.json.
    ``resume=True`` reopens the MLflow run recorded in the folder's run.json instead of a new one."""

    def __init__(self, run_dir: Path, experiment: str, run_name: str, tags: dict[str, str], enabled: bool = True,
                 resume: bool = False):
        self.run_dir = run_dir
        self.enabled = enabled
        self.run_id: str | None = None
        identity = process_identity()
        if enabled:
            self._start(experiment, run_name, tags, identity, read_record(run_dir) if resume else {})
        update_record(run_dir, status="RUNNING", reason="", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      mlflow_run_id=self.run_id, tracking_uri=tracking_uri() if enabled else None, **identity)

    def _start(self, experiment: str, run_name: str, tags: dict[str, str], identity: dict[str, str],
               record: dict[str, Any]) -> None:
        import mlflow  # deferred: mlflow takes seconds to import; untracked runs and refused commands never need it

        self.mlflow = mlflow
        uri = tracking_uri()
        mlflow.set_tracking_uri(uri)
        # `mlflow run` opened a launcher run and logged every MLproject parameter, defaults included,
        # before --config was read, and MLflow forbids changing a param; so the values that ran go into
        # a run of our own in the named experiment, under the launcher. The variable is popped for
        # start_run only (it would resume the launcher) and kept for child processes (compare's methods).
        launcher = os.environ.pop("MLFLOW_RUN_ID", None)
        try:
            with store_lock(uri):
                for marked in mark_dead_runs():
                    log.warning("marked KILLED: %s (its process is gone)", marked)
                previous = record.get("mlflow_run_id") if record.get("tracking_uri") == uri else None
                if previous:  # a resume continues its own run: one loss curve, one record
                    run = mlflow.start_run(run_id=previous)
                else:
                    run = mlflow.start_run(experiment_id=self._experiment_id(experiment), run_name=run_name,
                                           tags={"mlflow.parentRunId": launcher, **tags} if launcher else tags)
        finally:
            if launcher:
                os.environ["MLFLOW_RUN_ID"] = launcher
        self.run_id = run.info.run_id
        mlflow.set_tags({**tags, PID_TAG: identity["pid"], HOST_TAG: identity["host"],
                         START_TAG: identity["pid_start"], REASON_TAG: ""})
        if launcher and not previous:
            mlflow.MlflowClient().set_tag(launcher, "mlflow.note.content",
                                          f"Launched run {run_name} ({self.run_id}) in experiment {experiment}. "
                                          "The params here are the entry point's inputs (MLproject defaults where "
                                          "none was given); that run's params are the values used.")

    def _experiment_id(self, name: str) -> str:
        return experiment_id(name)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the resolved config: the run is always our own, so these are the values that ran. A resumed
        run reopens its MLflow run, whose params are already there (MLflow forbids changing one, and the
        only ones a resume may change, such as --resume-from-checkpoint, do not change what trains)."""
        if not self.enabled:
            return
        existing = self.mlflow.get_run(self.run_id).data.params
        self.mlflow.log_params({k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in params.items()
                                if k not in existing})

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

    def fail(self, reason: str = "") -> None:
        """End the run as FAILED, keeping its log."""
        self.finish("FAILED", reason)

    def finish(self, status: str = "FINISHED", reason: str = "") -> None:
        """End the run with `status` (FINISHED, FAILED or KILLED) and say why in run.json and MLflow."""
        try:
            update_record(self.run_dir, status=status, reason=reason, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        except OSError as err:  # a full disk must not also keep the MLflow run from being closed
            log.warning("could not update %s (%s)", self.run_dir / RECORD, err.strerror)
        if not self.enabled:
            return
        if status != "FINISHED":
            self.mlflow.set_tag(REASON_TAG, reason)
            if (self.run_dir / "logs.txt").is_file():
                self.mlflow.log_artifact(str(self.run_dir / "logs.txt"))
        self.mlflow.end_run(status=status)


def mlflow_run_for_dir(run_dir: Path) -> str | None:
    """The MLflow run id of the run that wrote run_dir, or None: the run its run.json names when that run is
    tagged with this very folder (a copied folder carries the run.json of another run), else a search
    of the store for the run tagged with it."""
    import mlflow  # deferred: mlflow takes seconds to import; untracked runs and refused commands never need it

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    record = read_record(run_dir)
    if record.get("mlflow_run_id") and record.get("tracking_uri") == uri:
        try:
            if mlflow.get_run(record["mlflow_run_id"]).data.tags.get("run_dir") == str(run_dir):
                return record["mlflow_run_id"]
        except mlflow.exceptions.MlflowException:
            pass  # deleted from the store: look it up by its folder like any other
    found = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.run_dir = '{run_dir}'",
                               output_format="list")
    return found[0].info.run_id if found else None


def log_to_finished_run(run_dir: Path, metrics: dict[str, float], artifact: Path) -> str | None:
    """Add metrics and a file to the MLflow run of run_dir (a re-evaluation); returns its id, None if untracked."""
    import mlflow  # deferred: mlflow takes seconds to import; untracked runs and refused commands never need it

    run_id = mlflow_run_for_dir(run_dir)
    if run_id:
        mlflow.set_tracking_uri(tracking_uri())
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(artifact))
    return run_id


def copy_run(source_run_id: str, experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """A FINISHED copy of a finished MLflow run in another experiment: its tags (without MLflow's own and
    without ``run_dir``, which stays the source's), params, the latest value of each metric and every
    artifact, plus ``tags`` and ``reused_run_id``. For a run that stands in for another experiment's arm,
    so each experiment's runs table and report still hold all of its arms."""
    import tempfile

    import mlflow  # deferred: mlflow takes seconds to import; untracked runs and refused commands never need it
    from mlflow.entities import Metric, Param

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    source = client.get_run(source_run_id)
    kept = {k: v for k, v in source.data.tags.items()
            if not k.startswith("mlflow.") and k not in ("run_dir", "styles_parent")}
    run = client.create_run(experiment_id(experiment), run_name=run_name,
                            tags={**kept, **tags, "reused_run_id": source_run_id})
    run_id, now = run.info.run_id, int(time.time() * 1000)
    params = [Param(k, v) for k, v in source.data.params.items()]
    metrics = [Metric(k, v, now, 0) for k, v in source.data.metrics.items()]
    for i in range(0, max(len(params), len(metrics)), 100):  # log_batch takes at most 100 params a call
        client.log_batch(run_id, params=params[i:i + 100], metrics=metrics[i:i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=source_run_id, artifact_path="", dst_path=tmp)
        client.log_artifacts(run_id, local)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    write_json(run_dir / "metrics.json", metrics)


def main(argv: list[str] | None = None) -> int:
    """`make clean-runs`: mark KILLED the runs whose process is gone, in MLflow and in run folders."""
    parser = argparse.ArgumentParser(prog="python -m research.tracking", description=main.__doc__)
    parser.add_argument("--output-dir", default="runs", help="root of run folders to check as well")
    args = parser.parse_args(argv)
    import mlflow  # deferred: mlflow takes seconds to import; untracked runs and refused commands never need it

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        marked = mark_dead_runs(args.output_dir)
    print("\n".join(f"marked KILLED: {m}" for m in marked) or "no run left RUNNING by a process that is gone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
