"""Experiment II figures from the trials' MLflow runs: optimisation history, the objective over
rank x steps per learning rate, parameter importances, and the Pareto front of a multi-objective study.

    python reports/search_figure.py --study-name pastel_lora      # -> reports/out/<study>_search*.png

Trials are read from MLflow (tags study_name, trial_number, objective, direction; params rank,
max_train_steps, learning_rate), not from the Optuna storage, so the figures can be redrawn wherever
the MLflow store is. Importances come from optuna's evaluator run on an in-memory copy of the
complete trials, so they need no access to the study's database either.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import mlflow
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_figures import plt, save_figure, sns, theme  # noqa: E402
from study_runs import find_search, trial_state  # noqa: E402

from research.figures import METHOD_COLORS, metric_label, point_and_interval  # noqa: E402
from research.tracking import tracking_uri  # noqa: E402

SEARCHED = [("rank", int, "LoRA rank"), ("max_train_steps", int, "training steps"),
            ("learning_rate", float, "learning rate"), ("lora_alpha", float, "LoRA alpha")]
STATE_STYLE = {"PRUNED": ("#949494", "x", "pruned"), "FAIL": ("#d55e00", "X", "failed")}


def trial_rows(trials) -> tuple[list[dict], list[str], list[str]]:
    """One row per trial: number, state, run id, searched params and each objective's value (+ interval)."""
    if not trials:
        return [], [], []
    objectives = trials[0].tags.get("objective", "objective").split(",")
    directions = trials[0].tags.get("direction", "maximize").split(",")
    rows = []
    for run in trials:
        row = {"trial": int(run.tags["trial_number"]), "state": trial_state(run), "run_id": run.run_id}
        for name, kind, _ in SEARCHED:
            if name in run.params:
                row[name] = kind(float(run.params[name]))
        for key in objectives:
            value = run.metrics.get(key, run.metrics.get("objective") if len(objectives) == 1 else None)
            row[key] = float("nan") if value is None else value
            row[f"{key}.lo"] = run.metrics.get(f"{key}.ci95_lo", row[key])
            row[f"{key}.hi"] = run.metrics.get(f"{key}.ci95_hi", row[key])
        rows.append(row)
    return rows, objectives, directions


def searched_params(rows: list[dict]) -> list[str]:
    """The params that vary across trials (alpha only when it is searched on its own)."""
    return [name for name, _, _ in SEARCHED if len({r.get(name) for r in rows}) > 1]


def best_row(rows: list[dict], objective: str, direction: str) -> dict | None:
    done = [r for r in rows if r["state"] == "COMPLETE" and math.isfinite(r[objective])]
    if not done:
        return None
    return (min if direction == "minimize" else max)(done, key=lambda r: r[objective])


def _label(objective: str) -> str:
    arm, _, metric = objective.partition(".")
    return f"{arm} {metric_label(metric)}" if metric else objective


def draw_history(rows: list[dict], objective: str, direction: str, title: str, out: Path) -> Path:
    """Objective per trial in order, best-so-far as a step line, pruned and failed trials marked."""
    theme()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    done = [r for r in rows if r["state"] == "COMPLETE" and math.isfinite(r[objective])]
    point_and_interval(ax, [r["trial"] for r in done], [r[objective] for r in done],
                       [r[f"{objective}.lo"] for r in done], [r[f"{objective}.hi"] for r in done],
                       METHOD_COLORS["lora"], label="complete trial (95% CI)")
    best, pick = [], (min if direction == "minimize" else max)
    for r in done:
        best.append(r[objective] if not best else pick(best[-1], r[objective]))
    ax.step([r["trial"] for r in done], best, where="post", color="black", lw=1.2, label="best so far")
    floor = min((r[objective] for r in done), default=0.0)
    for state, (color, marker, name) in STATE_STYLE.items():
        marked = [r for r in rows if r["state"] == state]
        if marked:  # their last reported value when there is one, else on the floor of the axis
            ys = [r[objective] if math.isfinite(r[objective]) else floor for r in marked]
            ax.scatter([r["trial"] for r in marked], ys, color=color, marker=marker, s=60, label=name, zorder=4)
    ax.set_xlabel("trial number")
    ax.set_ylabel(_label(objective), fontsize=8)
    ax.set_title(f"{title}: optimisation history ({direction} {objective}, n = {len(rows)} trials)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def lr_groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Trials grouped by learning rate: each value when there are few (a grid), else three log-bins."""
    rates = sorted({r["learning_rate"] for r in rows if "learning_rate" in r})
    if len(rates) <= 4:
        return [(f"lr = {lr:.0e}", [r for r in rows if r.get("learning_rate") == lr]) for lr in rates]
    lo, hi = math.log10(rates[0]), math.log10(rates[-1])
    edges = [10 ** (lo + (hi - lo) * k / 3) for k in range(4)]

    def bin_of(lr: float) -> int:
        return min(2, int((math.log10(lr) - lo) / (hi - lo) * 3))

    return [(f"lr {edges[k]:.0e} – {edges[k + 1]:.0e}",
             [r for r in rows if "learning_rate" in r and bin_of(r["learning_rate"]) == k]) for k in range(3)]


def draw_surface(rows: list[dict], objective: str, title: str, out: Path) -> Path:
    """Objective (colour) over training steps x rank, one panel per learning-rate group."""
    theme()
    groups = lr_groups(rows) or [("all trials", rows)]
    done = [r for r in rows if r["state"] == "COMPLETE" and math.isfinite(r[objective])]
    vmin, vmax = (min(r[objective] for r in done), max(r[objective] for r in done)) if done else (0, 1)
    ranks = sorted({r["rank"] for r in rows if "rank" in r}) or [0]
    fig, axes = plt.subplots(1, len(groups), figsize=(3.8 * len(groups) + 1.4, 3.6), squeeze=False, sharey=True,
                             layout="constrained")
    points = None
    for ax, (name, part) in zip(axes.flat, groups):
        ok = [r for r in part if r in done]
        if ok:
            points = ax.scatter([r["max_train_steps"] for r in ok], [ranks.index(r.get("rank", 0)) for r in ok],
                                c=[r[objective] for r in ok], cmap="viridis", vmin=vmin, vmax=vmax, s=90,
                                edgecolor="black")
        for state, (color, marker, label) in STATE_STYLE.items():
            marked = [r for r in part if r["state"] == state]
            ax.scatter([r["max_train_steps"] for r in marked], [ranks.index(r.get("rank", 0)) for r in marked],
                       color=color, marker=marker, s=60, label=label if marked else None)
        ax.set_xscale("log")
        ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
        ax.set_xlabel("training steps (log scale)")
        ax.set_title(f"{name} ({len(part)} trials)", fontsize=9)
        if any(r["state"] in STATE_STYLE for r in part):
            ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("LoRA rank")
    if points is not None:
        fig.colorbar(points, ax=list(axes.flat), label=_label(objective), shrink=0.9)
    fig.suptitle(f"{title}: objective over rank x steps, per learning rate", fontsize=10)
    return save_figure(fig, out, dpi=110)


def in_memory_study(rows: list[dict], objectives: list[str], directions: list[str]):
    """The complete trials as an optuna study, so optuna's own importance and Pareto code can run."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = searched_params(rows)
    done = [r for r in rows if r["state"] == "COMPLETE" and all(math.isfinite(r[o]) for o in objectives)]
    dists = {}
    for name in names:
        values = sorted({r[name] for r in done if name in r}) or [0]
        if name == "rank":
            dists[name] = CategoricalDistribution(values)
        elif isinstance(values[0], int):
            dists[name] = IntDistribution(values[0], max(values[-1], values[0] + 1), log=values[0] > 0)
        else:
            dists[name] = FloatDistribution(values[0], max(values[-1], values[0] * 1.001), log=values[0] > 0)
    study = optuna.create_study(directions=directions)
    for r in done:
        study.add_trial(optuna.trial.create_trial(params={n: r[n] for n in names}, distributions=dists,
                                                  values=[r[o] for o in objectives]))
    return study


def importances(rows: list[dict], objectives: list[str], directions: list[str]) -> dict[str, float]:
    """optuna's fANOVA importances of the searched params for the first objective ({} below 2 trials)."""
    study = in_memory_study(rows, objectives, directions)
    if len(study.trials) < 2 or not searched_params(rows):
        return {}
    target = (lambda t: t.values[0]) if len(objectives) > 1 else None
    # fANOVA: share of the objective variance per param, whatever the direction (optuna 5 defaults to PED-ANOVA)
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    return optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)


def draw_importances(values: dict[str, float], objective: str, n: int, title: str, out: Path) -> Path:
    theme()
    fig, ax = plt.subplots(figsize=(5.5, 0.5 * len(values) + 1.6))
    names = list(values)
    sns.barplot(x=[values[k] for k in names], y=names, color="#0173b2", ax=ax)
    ax.set_xlabel("importance (fraction of objective variance, fANOVA)")
    ax.set_ylabel("searched parameter")
    ax.set_title(f"{title}: what moved {objective} (n = {n} complete trials)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def draw_pareto(rows: list[dict], objectives: list[str], directions: list[str], title: str, out: Path) -> Path:
    """The first two objectives of every complete trial, the Pareto-optimal ones joined and labelled."""
    theme()
    study = in_memory_study(rows, objectives, directions)
    front = sorted(study.best_trials, key=lambda t: t.values[0])
    x, y = objectives[0], objectives[1]
    done = [r for r in rows if r["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter([r[x] for r in done], [r[y] for r in done], color="#949494", s=40, label="trial")
    ax.plot([t.values[0] for t in front], [t.values[1] for t in front], "o-", color="#0173b2", label="Pareto front")
    ax.set_xlabel(f"{_label(x)} ({directions[0]})", fontsize=8)
    ax.set_ylabel(f"{_label(y)} ({directions[1]})", fontsize=8)
    ax.set_title(f"{title}: Pareto front ({len(front)} of {len(done)} complete trials)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def draw_all(rows: list[dict], objectives: list[str], directions: list[str], title: str, out: Path) -> dict:
    """Every Exp II figure the trials support, {name: path}: the history at `out`, the others beside it."""
    def beside(suffix: str) -> Path:
        return out.with_name(f"{out.stem}_{suffix}.png")

    figures = {"history": draw_history(rows, objectives[0], directions[0], title, out)}
    if "max_train_steps" in searched_params(rows):
        figures["surface"] = draw_surface(rows, objectives[0], title, beside("rank_steps"))
    values = importances(rows, objectives, directions)
    if values:
        n = sum(r["state"] == "COMPLETE" for r in rows)
        figures["importances"] = draw_importances(values, objectives[0], n, title, beside("importances"))
    if len(objectives) > 1:
        figures["pareto"] = draw_pareto(rows, objectives, directions, title, beside("pareto"))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study-name", "--study_name", dest="study_name", default="",
                        help="Optuna study name (the study_name tag of its MLflow runs); default the newest")
    parser.add_argument("--experiment", default="exp2", help="MLflow experiment of the trials")
    parser.add_argument("--out", default="", help="history PNG (default reports/out/<study>_search.png); "
                                                  "the other figures are written beside it")
    args = parser.parse_args(argv)
    mlflow.set_tracking_uri(tracking_uri())
    found = find_search(args.experiment, args.study_name)
    rows, objectives, directions = trial_rows(found.runs)
    best = best_row(rows, objectives[0], directions[0]) if rows else None
    if best is None:
        print(f"error: no complete trial of study {args.study_name or '(any)'!r} in experiment {args.experiment!r}; "
              "run `make search` first.", file=sys.stderr)
        return 2
    out = Path(args.out or REPO / "reports" / "out" / f"{found.label}_search.png")
    for path in draw_all(rows, objectives, directions, found.label, out).values():
        mlflow.MlflowClient().log_artifact(best["run_id"], str(path), artifact_path="reports")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
