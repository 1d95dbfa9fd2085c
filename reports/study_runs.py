"""The study's runs, found by MLflow queries only (search_runs, artifacts by run id).

Which runs belong to which experiment is read from tags, never from run folders:

- every experiment's runs may carry ``experiment_kind`` = styles | search | compare | blend | report;
- Exp I: runs with a ``style`` tag (LoRA) in the styles experiment; when a parent run tagged
  ``experiment_kind=styles`` exists, the children of the newest one (``mlflow.parentRunId``),
  otherwise the newest finished run per style;
- Exp II: trial runs tagged ``study_name`` and ``trial_number``, objective key in tag ``objective``
  (several objectives: comma-separated, directions likewise in ``direction``); a pruned trial is
  tagged ``trial_state=PRUNED`` (or is a KILLED run);
- Exp III: runs tagged ``comparison=<id>``, the newest comparison;
- Exp IV: runs tagged ``method=lora_blend``, the newest finished one.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import mlflow

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded file drowns the log

DEFAULT_EXPERIMENTS = {"styles": "exp1", "search": "exp2", "compare": "exp3", "blend": "exp4"}
FILL_COMMANDS = {"styles": "make styles", "search": "make search", "compare": "make compare",
                 "blend": "make blend A=runs/exp1/<a> B=runs/exp1/<b>"}
ARMS = ("adapter", "baseline", "delta")


@dataclass
class RunView:
    """What the report needs of one MLflow run."""

    run_id: str
    name: str
    status: str
    start: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]

    @classmethod
    def of(cls, run) -> "RunView":
        return cls(run.info.run_id, run.info.run_name or run.info.run_id[:8], run.info.status,
                   run.info.start_time or 0, dict(run.data.params), dict(run.data.metrics), dict(run.data.tags))

    def estimate(self, arm: str, metric: str) -> dict | None:
        """{"mean", "lo", "hi"} from the MLflow keys <arm>.<m>, <arm>.<m>.ci95_lo / _hi."""
        key = f"{arm}.{metric}"
        if key not in self.metrics:
            return None
        mean = self.metrics[key]
        return {"mean": mean, "lo": self.metrics.get(f"{key}.ci95_lo", mean),
                "hi": self.metrics.get(f"{key}.ci95_hi", mean),
                "has_interval": f"{key}.ci95_lo" in self.metrics}

    def metric_names(self, arm: str = "delta") -> list[str]:
        prefix = arm + "."
        return sorted({k[len(prefix):] for k in self.metrics
                       if k.startswith(prefix) and not k.endswith((".ci95_lo", ".ci95_hi"))})


@dataclass
class Experiment:
    kind: str
    experiment: str
    runs: list[RunView] = field(default_factory=list)
    parent: RunView | None = None
    label: str = ""  # the study name, comparison id or blend name the runs share

    @property
    def run_ids(self) -> list[str]:
        return ([self.parent.run_id] if self.parent else []) + [r.run_id for r in self.runs]


def search(experiment: str, filter_string: str = "") -> list[RunView]:
    if mlflow.get_experiment_by_name(experiment) is None:
        return []
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string, output_format="list",
                              order_by=["attributes.start_time DESC"])
    return [RunView.of(r) for r in runs]


def find_styles(experiment: str) -> Experiment:
    found = Experiment("styles", experiment)
    runs = search(experiment, "attributes.status = 'FINISHED'")
    parents = [r for r in runs if r.tags.get("experiment_kind") == "styles" and "mlflow.parentRunId" not in r.tags]
    candidates = [r for r in runs if "style" in r.tags and r.tags.get("method", "lora") == "lora"
                  and "study_name" not in r.tags and "comparison" not in r.tags]
    if parents:
        found.parent = parents[0]
        candidates = [r for r in candidates if r.tags.get("mlflow.parentRunId") == found.parent.run_id]
    newest = {}
    for run in candidates:  # newest first: the first run seen of a style is its newest
        newest.setdefault(run.tags["style"], run)
    found.runs = [newest[s] for s in sorted(newest)]
    return found


def trial_state(run: RunView) -> str:
    """COMPLETE, PRUNED, FAIL or RUNNING, from the tag the search writes or the run's status."""
    if "trial_state" in run.tags:
        return run.tags["trial_state"].upper()
    return {"FINISHED": "COMPLETE", "KILLED": "PRUNED", "FAILED": "FAIL"}.get(run.status, "RUNNING")


def find_search(experiment: str, study_name: str = "") -> Experiment:
    runs = search(experiment, f"tags.study_name = '{study_name}'" if study_name else "")
    trials = [r for r in runs if "trial_number" in r.tags]
    found = Experiment("search", experiment)
    if not trials:
        return found
    found.label = study_name or trials[0].tags["study_name"]  # newest trial's study
    found.runs = sorted((r for r in trials if r.tags["study_name"] == found.label),
                        key=lambda r: int(r.tags["trial_number"]))
    found.parent = next((r for r in runs if r.tags.get("study_name") == found.label and "trial_number" not in r.tags),
                        None)
    return found


def find_compare(experiment: str) -> Experiment:
    runs = [r for r in search(experiment) if "comparison" in r.tags]
    found = Experiment("compare", experiment)
    if runs:
        found.label = runs[0].tags["comparison"]
        found.runs = sorted((r for r in runs if r.tags["comparison"] == found.label), key=lambda r: r.start)
    return found


def find_blend(experiment: str) -> Experiment:
    runs = search(experiment, "attributes.status = 'FINISHED' and tags.method = 'lora_blend'")
    found = Experiment("blend", experiment)
    if runs:
        found.runs, found.label = [runs[0]], runs[0].name
    return found


# ─── artifacts, by run id ────────────────────────────────────────────────────────────────────
_SCRATCH = Path(tempfile.mkdtemp(prefix="study-report-"))
atexit.register(shutil.rmtree, _SCRATCH, True)  # downloads are only read while the report is drawn


def artifact(run_id: str, path: str) -> Path | None:
    """A run's artifact (file or folder) downloaded to a scratch folder; None when the run has none."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        dst_path=str(_SCRATCH / run_id)))
    except Exception:  # MLflow raises several types for "no such artifact"; absence is a normal case here
        return None


def artifact_json(run_id: str, path: str) -> dict:
    local = artifact(run_id, path)
    return json.loads(local.read_text()) if local is not None and local.is_file() else {}


def interval_row(value: dict) -> dict:
    """{"mean", "lo", "hi", "n"} of a metrics.json entry; a missing bound is the mean (no interval drawn)."""
    mean = value["mean"]
    lo, hi = value.get("ci95") or [None, None]
    return {"mean": mean, "lo": mean if lo is None else lo, "hi": mean if hi is None else hi, "n": value.get("n")}


def attach_figure(run_id: str, path: Path) -> None:
    """Log a figure to the run it was drawn from (artifact folder reports/) and say where it is."""
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(path), artifact_path="reports")
    print(f"wrote {path}")


def safe_uri(uri: str) -> str:
    """The tracking URI without a password in it, for the page."""

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}"
                                            + (f":{parts.port}" if parts.port else "")))


# ─── the runs table as a researcher reads it ────────────────────────────────────────────────
VIEW_KEY = "key-columns"
UI = "http://127.0.0.1:5000"  # where `make ui` serves
KEY_TAGS = ["method", "style", "comparison", "study_name", "trial_number", "trial_state"]
KEY_PARAMS = ["rank", "lora_alpha", "learning_rate", "max_train_steps"]
KEY_METRICS = ["objective", "cost.train_seconds", "cost.peak_memory_mb"]


def key_columns_link(found: Experiment) -> str | None:
    """Store a shared view of the experiment's runs table with its key columns (method, style, rank,
    lr, steps, headline metrics) and return the `make ui` URL that opens it.

    MLflow 3.17's runs table shows no param or metric column until a user picks them; a view state
    stored as the experiment tag mlflow.sharedViewState.<key> is what its URL parameter
    viewStateShareKey opens (the same mechanism as the UI's own "share" link)."""
    runs = found.runs + ([found.parent] if found.parent else [])
    experiment = mlflow.get_experiment_by_name(found.experiment)
    if not runs or experiment is None:
        return None
    deltas = sorted({m for r in runs for m in r.metric_names("delta")})
    present = {kind: set().union(*(getattr(r, kind) for r in runs)) for kind in ("tags", "params", "metrics")}
    columns = ([f"tags.`{k}`" for k in KEY_TAGS if k in present["tags"]]
               + [f"params.`{k}`" for k in KEY_PARAMS if k in present["params"]]
               + [f"metrics.`{k}`" for k in KEY_METRICS + [f"delta.{m}" for m in deltas] if k in present["metrics"]])
    mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}",
                                             json.dumps({"selectedColumns": columns}))
    return f"{UI}/#/experiments/{experiment.experiment_id}/runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"
