"""Adapter vs base model, metric by metric, for every finished run of an MLflow experiment.

    python reports/metrics_figure.py --experiment quickstart        # -> reports/out/quickstart_metrics.png

Reads each run's metrics.json artifact (means with 95% intervals), draws one panel per metric
with a point and interval per run and arm, writes the PNG atomically and logs it to the newest run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import mlflow

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run as `python reports/metrics_figure.py`: research/ must be importable
sys.path.insert(0, str(HERE))  # and its sibling scripts, also when a test loads it from its path

from research.atomic import save_figure  # noqa: E402
from research.figures import BASE_COLOR, METHOD_COLORS, point_and_interval  # noqa: E402
from research.tracking import tracking_uri  # noqa: E402
from study_runs import attach_figure, interval_row  # noqa: E402


def load_rows(experiment: str) -> list[dict]:
    mlflow.set_tracking_uri(tracking_uri())
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'FINISHED'",
                              output_format="list")
    rows = []
    for run in runs:
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="metrics.json")
        metrics = json.loads(Path(path).read_text())
        label = run.info.run_name or run.info.run_id[:8]
        for arm in ("baseline", "adapter"):
            for name, value in metrics.get(arm, {}).items():
                if value.get("mean") is None:
                    continue
                rows.append(dict(run=label, run_id=run.info.run_id, start=run.info.start_time, arm=arm, metric=name,
                                 **interval_row(value)))
    return rows


def draw(rows: list[dict], out: Path, title: str) -> Path:
    df = pd.DataFrame(rows)
    metrics = sorted(df.metric.unique())
    sns.set_theme(style="whitegrid", context="notebook")
    cols = min(4, len(metrics))
    fig, axes = plt.subplots((len(metrics) + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * ((len(metrics) + cols - 1) // cols)),
                             squeeze=False)
    palette = {"baseline": BASE_COLOR, "adapter": METHOD_COLORS["lora"]}
    for ax, metric in zip(axes.flat, metrics):
        part = df[df.metric == metric]
        runs = list(dict.fromkeys(part.sort_values("start").run))
        for offset, arm in [(-0.12, "baseline"), (0.12, "adapter")]:
            sub = part[part.arm == arm].set_index("run").reindex(runs).dropna(subset=["mean"])
            xs = [runs.index(r) + offset for r in sub.index]
            point_and_interval(ax, xs, sub["mean"], sub["lo"], sub["hi"], palette[arm], label=arm)
        ax.set_xticks(range(len(runs)), runs, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(runs) - 0.5)
        ax.set_title(metric)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"{title}: adapter vs base model (95% intervals)")
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="quickstart", help="MLflow experiment name")
    parser.add_argument("--out", default="", help="PNG path (default reports/out/<experiment>_metrics.png)")
    args = parser.parse_args(argv)
    rows = load_rows(args.experiment)
    if not rows:
        print(f"error: no finished run with metrics in experiment {args.experiment!r}; run `make quickstart` first.",
              file=sys.stderr)
        return 2
    out = draw(rows, Path(args.out or REPO / "reports" / "out" / f"{args.experiment}_metrics.png"), args.experiment)
    attach_figure(max(rows, key=lambda r: r["start"])["run_id"], out)  # the newest run
    return 0


if __name__ == "__main__":
    sys.exit(main())
