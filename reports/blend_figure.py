"""Experiment IV: metrics of a blend against the weight t, beside its image grid.

    python reports/blend_figure.py                                   # newest run of experiment exp4
    python reports/blend_figure.py --run-dir runs/exp4/<run>         # -> reports/out/<name>_blend.png

Reads the run's metrics.json and thumbnails/grid.png from MLflow. A metric measured against each
style (style_similarity_a / _b, oracle_style_prob_a / _b, ...) is one panel with a curve per style,
with 95% intervals; the PNG is written atomically and logged to the run.
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
sys.path.insert(0, str(REPO))  # run as `python reports/blend_figure.py`: research/ must be importable
sys.path.insert(0, str(HERE))  # and its sibling scripts, also when a test loads it from its path

from research.atomic import save_figure  # noqa: E402
from research.figures import METHOD_COLORS, metric_label, style_colors as colors_for  # noqa: E402
from research.tracking import tracking_uri  # noqa: E402
from study_runs import attach_figure, interval_row  # noqa: E402


def find_run(experiment: str, run_dir: str = ""):
    mlflow.set_tracking_uri(tracking_uri())
    flt = "attributes.status = 'FINISHED'" + (f" and tags.run_dir = '{run_dir}'" if run_dir else "")
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=flt, output_format="list",
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def load_rows(metrics: dict) -> list[dict]:
    """One row per (t, metric, side): side is "A", "B" or "" for metrics that do not name a style."""
    rows = []
    for key, values in metrics.items():
        if not key.startswith("t_"):
            continue
        t = float(key[2:])
        for name, value in values.items():
            if value.get("mean") is None:
                continue
            base, side = (name[:-2], name[-1].upper()) if name.endswith(("_a", "_b")) else (name, "")
            rows.append(dict(t=t, metric=base, side=side, **interval_row(value)))
    return rows


def side_colors(labels: dict[str, str], styles: dict[str, str], style_colors: dict[str, str] | None = None) -> dict:
    """A and B drawn in their styles' colours (the report's palette when given), the shared curves in the blend's."""
    palette = style_colors or colors_for(styles.values())
    return {"A": palette[styles["A"]], "B": palette[styles["B"]], "": METHOD_COLORS["lora_blend"]}


def draw(rows: list[dict], grid: Path | None, out: Path, title: str, labels: dict[str, str],
         palette: dict[str, str]) -> Path:
    df = pd.DataFrame(rows)
    metrics = list(dict.fromkeys(df.metric)) if len(df) else []
    sns.set_theme(style="whitegrid", context="notebook")
    panels = len(metrics) + (grid is not None)
    cols = min(3, max(panels, 1))  # three panels a row: nine in one row were too small to read on a page
    nrows = -(-max(panels, 1) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows + 0.6), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, metrics):
        part = df[df.metric == metric].sort_values("t")
        for side, sub in part.groupby("side", sort=True):
            name = labels.get(side, "") if side else "blend"
            ax.plot(sub.t, sub["mean"], marker="o", color=palette[side], label=f"{side}: {name}" if side else name)
            ax.fill_between(sub.t, sub.lo, sub.hi, color=palette[side], alpha=0.15)
        ax.set_xlabel("blend weight t (0 = A only, 1 = B only)")
        ax.set_ylabel(metric_label(metric), fontsize=8)
        ax.set_title(metric.replace("_", " "), fontsize=10)
        ax.legend(loc="best", fontsize=7)
    if grid is not None:
        ax = axes.flat[panels - 1]
        ax.imshow(plt.imread(str(grid)))
        ax.set_title("one seed per prompt, across t")
        ax.axis("off")
    n = int(df.n.max()) if len(df) and "n" in df else "?"
    fig.suptitle(f"{title}\nblend (1-t)·ΔW_A + t·ΔW_B; 95% intervals, n = {n} images per t", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="exp4", help="MLflow experiment of the blend runs")
    parser.add_argument("--run-dir", "--run_dir", dest="run_dir", default="",
                        help="blend run folder (its run_dir tag); default the newest finished blend")
    parser.add_argument("--out", default="", help="PNG path (default reports/out/<name>_blend.png)")
    args = parser.parse_args(argv)
    run = find_run(args.experiment, args.run_dir)
    if run is None:
        print(f"error: no finished blend run in experiment {args.experiment!r}"
              f"{' with run_dir ' + args.run_dir if args.run_dir else ''}; run `python -m research.blend` first.",
              file=sys.stderr)
        return 2
    run_id = run.info.run_id
    metrics = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="metrics.json")).read_text())
    try:
        grid = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="thumbnails/grid.png"))
    except Exception:  # an export-only blend has no images
        grid = None
    name = run.info.run_name or run_id[:8]
    labels = {"A": metrics.get("a", {}).get("label", "A"), "B": metrics.get("b", {}).get("label", "B")}
    styles = {"A": metrics.get("a", {}).get("style", "A"), "B": metrics.get("b", {}).get("style", "B")}
    rows = load_rows(metrics)
    if not rows and grid is None:
        print(f"error: blend run {name} sampled no images (export only); pass --run-dir of a blend run with --weights.",
              file=sys.stderr)
        return 2
    out = draw(rows, grid, Path(args.out or REPO / "reports" / "out" / f"{name}_blend.png"), name, labels,
               side_colors(labels, styles))
    attach_figure(run_id, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
