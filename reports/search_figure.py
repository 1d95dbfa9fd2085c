"""Experiment II ablation: the search objective against rank, training steps and learning rate.

    python reports/search_figure.py --study-name pastel_lora          # -> reports/out/pastel_lora_search.png

Reads the study's trials from MLflow (experiment exp2, tag study_name), not from the Optuna storage,
so the figure can be redrawn wherever the MLflow store is. Draws one panel per searched parameter
(seaborn), marks the best trial, writes the PNG atomically and logs it to the best trial's run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PARAMS = [("rank", "LoRA rank", False), ("max_train_steps", "training steps", True),
          ("learning_rate", "learning rate", True)]


def load_trials(study_name: str, experiment: str = "exp2") -> list[dict]:
    import mlflow

    from research.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.study_name = '{study_name}'",
                              output_format="list")
    rows = []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        objective = tags.get("objective", "")
        if not all(p in params for p, _, _ in PARAMS):
            continue
        rows.append(dict(run_id=run.info.run_id, trial=int(tags.get("trial_number", -1)), status=run.info.status,
                         objective=objective, direction=tags.get("direction", "maximize"),
                         value=run.data.metrics.get(objective) if run.info.status == "FINISHED" else None,
                         rank=int(params["rank"]), max_train_steps=int(params["max_train_steps"]),
                         learning_rate=float(params["learning_rate"])))
    return rows


def best_row(rows: list[dict]) -> dict | None:
    done = [r for r in rows if r["value"] is not None]
    if not done:
        return None
    pick = min if done[0]["direction"] == "minimize" else max
    return pick(done, key=lambda r: r["value"])


def draw(rows: list[dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    from research.atomic import save_figure

    df = pd.DataFrame(rows)
    done = df[df.value.notna()]
    best = best_row(rows)
    objective = best["objective"] if best else df.objective.iloc[0]
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(PARAMS), figsize=(4.2 * len(PARAMS), 3.6), sharey=True)
    for ax, (param, label, log_x) in zip(axes, PARAMS):
        if param == "rank":
            # ranks are categories: a strip per rank, so repeated trials at one rank stay visible
            order = sorted(df["rank"].unique())
            sns.stripplot(data=done, x="rank", y="value", order=order, ax=ax, color="#4c72b0", size=7, jitter=0.15)
            if best:
                ax.scatter([order.index(best["rank"])], [best["value"]], marker="*", s=300, color="#d1495b",
                           zorder=5, label=f"best (trial {best['trial']})")
        else:
            sns.scatterplot(data=done, x=param, y="value", ax=ax, color="#4c72b0", s=50)
            if log_x:
                ax.set_xscale("log")
            if best:
                ax.scatter([best[param]], [best["value"]], marker="*", s=300, color="#d1495b", zorder=5,
                           label=f"best (trial {best['trial']})")
        ax.set_xlabel(label)
        ax.set_ylabel(objective)
    if best:
        axes[0].legend(loc="best", fontsize=8)
    failed = int((df.status != "FINISHED").sum())
    fig.suptitle(f"{title}: {len(done)} finished trials" + (f", {failed} failed or running" if failed else ""))
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study-name", "--study_name", dest="study_name", required=True,
                        help="Optuna study name (the study_name tag of its MLflow runs)")
    parser.add_argument("--experiment", default="exp2", help="MLflow experiment of the trials")
    parser.add_argument("--out", default="", help="PNG path (default reports/out/<study>_search.png)")
    args = parser.parse_args(argv)
    rows = load_trials(args.study_name, args.experiment)
    best = best_row(rows)
    if best is None:
        print(f"error: no finished trial of study {args.study_name!r} in experiment {args.experiment!r}; "
              "run `python -m research.search --study-name ...` first.", file=sys.stderr)
        return 2
    out = draw(rows, Path(args.out or REPO / "reports" / "out" / f"{args.study_name}_search.png"), args.study_name)
    import mlflow

    with mlflow.start_run(run_id=best["run_id"]):
        mlflow.log_artifact(str(out), artifact_path="reports")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
