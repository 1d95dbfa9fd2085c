"""One section of the study report per experiment, built from MLflow runs (reports/study_runs.py):
its figures, the run ids and config behind each, and findings sentences generated from the numbers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

import findings
import mlflow
from blend_figure import draw as draw_blend, load_rows as blend_rows, side_colors
from search_figure import best_row, draw_all, importances, searched_params, trial_rows
from study_figures import cost_bars, delta_panels, image_grid, titled_image
from study_runs import FILL_COMMANDS, Experiment, RunView, artifact, artifact_json

from research.figures import BASE_COLOR, COST_LABELS, METHOD_COLORS, metric_label

KEY_PARAMS = ["base_model", "method", "style_dir", "rank", "lora_alpha", "learning_rate", "max_train_steps",
              "train_batch_size", "resolution", "seed", "num_eval_images", "sampler", "num_inference_steps",
              "guidance_scale", "metrics"]
GRID_ROWS = 6  # prompt/seed rows in an image grid: enough to see a style, small enough to read


@dataclass
class Figure:
    path: Path
    caption: str
    runs: list[RunView]


@dataclass
class Section:
    key: str
    title: str
    experiment: str
    table_link: str | None = None  # the experiment's MLflow runs table with its key columns
    notices: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)


def missing(section: Section, kind: str, what: str) -> Section:
    section.notices.append(f"{what} has no runs in MLflow experiment '{section.experiment}' yet; "
                           f"`{FILL_COMMANDS[kind]}` (or `make study`) fills it.")
    return section


def config_of(runs: list[RunView]) -> tuple[dict, dict[str, dict]]:
    """The key params all runs share, and per run the ones that differ."""
    keys = [k for k in KEY_PARAMS if any(k in r.params for r in runs)]
    shared = {k: runs[0].params.get(k) for k in keys if len({r.params.get(k) for r in runs}) == 1}
    varying = {r.name: {k: r.params.get(k, "-") for k in keys if k not in shared} for r in runs}
    return shared, varying


# ─── deltas and image grids, shared by Experiments I and III ────────────────────────────────
def delta_rows(runs: list[RunView], group_of) -> list[dict]:
    """Every logged paired difference delta.<m> of every run, with its interval, n and direction."""
    rows = []
    for run in runs:
        detail = artifact_json(run.run_id, "metrics.json").get("delta", {})
        for metric in run.metric_names("delta"):
            est = run.estimate("delta", metric)
            rows.append(dict(group=group_of(run), metric=metric, mean=est["mean"], lo=est["lo"], hi=est["hi"],
                             has_interval=est["has_interval"], n=detail.get(metric, {}).get("n", run.metrics.get("n_images")),
                             better=detail.get(metric, {}).get("better")))
    return rows


def delta_findings(rows: list[dict]) -> list[str]:
    return [findings.difference(r["group"], r["metric"], r["mean"], r["lo"], r["hi"], r["n"], r["better"],
                                r["has_interval"])
            for r in sorted(rows, key=lambda r: (r["metric"], r["group"]))]


def sample_sets(run: RunView) -> tuple[dict, dict]:
    """{(prompt, seed): image path} for the adapter and the baseline images of a run."""
    folder = artifact(run.run_id, "inference")
    sets = []
    for sub in (folder, folder / "baseline" if folder else None):
        manifest = sub / "manifest.json" if sub else None
        entries = json.loads(manifest.read_text()) if manifest and manifest.is_file() else []
        sets.append({(e["prompt"], int(e["seed"])): sub / e["file"] for e in entries})
    return sets[0], sets[1]


def shared_grid(runs: list[RunView], labels: list[str], colors: list[str], title: str, out: Path) -> Path | None:
    """Rows: (prompt, seed) pairs every run sampled; columns: the base model, then each run's adapter."""
    sets = [sample_sets(r) for r in runs]
    common = set.intersection(*(set(adapter) for adapter, _ in sets)) if sets else set()
    if not common:
        return None
    first_seed = {}
    for prompt, seed in sorted(common):  # one row per prompt, its lowest seed
        first_seed.setdefault(prompt, seed)
    keys = list(first_seed.items())[:GRID_ROWS]
    cells = [[Image.open(sets[0][1][k]).convert("RGB") if k in sets[0][1] else None]
             + [Image.open(adapter[k]).convert("RGB") for adapter, _ in sets] for k in keys]
    return image_grid(cells, [f"{p} (seed {s})" for p, s in keys], ["base model"] + labels,
                      [BASE_COLOR] + colors, title, out)


# ─── Experiment I ───────────────────────────────────────────────────────────────────────────
def styles_section(found: Experiment, style_colors: dict[str, str], out: Path) -> Section:
    section = Section("exp1", "Experiment I: one LoRA per style", found.experiment)
    if not found.runs:
        return missing(section, "styles", "Experiment I")
    runs, styles = found.runs, [r.tags["style"] for r in found.runs]
    grid = shared_grid(runs, styles, [style_colors[s] for s in styles],
                       "Experiment I: same prompt and seed per row", out / "exp1_style_grid.png")
    if grid is None and found.parent is not None:
        grid = _parent_grid(found.parent, out / "exp1_style_grid.png")
    if grid is not None:
        section.figures.append(Figure(grid, "Style grid: rows are prompts (one seed each), columns the base model "
                                            "and each style's adapter.", ([found.parent] if found.parent else []) + runs))
    else:
        section.notices.append("The styles share no prompt and seed, so no style grid can be drawn from their samples.")
    rows = delta_rows(runs, lambda r: r.tags["style"])
    if not rows:
        section.notices.append("These runs log no delta.<metric> (paired differences adapter − base model); "
                               "rerun them with the current code to get intervals.")
        return section
    path = delta_panels(rows, styles, style_colors, "Experiment I: each style vs the base model", out / "exp1_deltas.png",
                        "style")
    section.figures.append(Figure(path, "Paired difference adapter − base model per metric and style; "
                                        "a dashed line marks zero.", runs))
    section.findings = delta_findings(rows)
    return section


def _parent_grid(parent: RunView, out: Path) -> Path | None:
    """The style grid the styles driver logged on its parent run, when the children share no samples."""
    names = [a.path for a in mlflow.MlflowClient().list_artifacts(parent.run_id) if a.path.endswith(".png")]
    local = next((artifact(parent.run_id, n) for n in names if "grid" in n), None)
    return titled_image(local, f"Experiment I: style grid of run {parent.name}", "base model and each style", out) \
        if local else None


# ─── Experiment III ─────────────────────────────────────────────────────────────────────────
def compare_section(found: Experiment, out: Path) -> Section:
    section = Section("exp3", "Experiment III: LoRA vs Textual Inversion vs DreamBooth", found.experiment)
    if not found.runs:
        return missing(section, "compare", "Experiment III")
    done = [r for r in found.runs if r.status == "FINISHED"]
    failed = [r.tags.get("method", r.name) for r in found.runs if r.status != "FINISHED"]
    if failed:
        section.notices.append(f"Failed in comparison {found.label}: {', '.join(failed)}.")
    methods = [r.tags.get("method", r.name) for r in done]
    colors = {m: METHOD_COLORS.get(m, BASE_COLOR) for m in methods}
    rows = delta_rows(done, lambda r: r.tags.get("method", r.name))
    if rows:
        path = delta_panels(rows, methods, colors, f"Experiment III ({found.label}): quality per method",
                            out / "exp3_quality.png", "method")
        section.figures.append(Figure(path, "Quality: paired difference adapter − base model per method.", done))
    costs = {m: {k: r.metrics[f"cost.{k}"] for k in COST_LABELS if f"cost.{k}" in r.metrics}
             for m, r in zip(methods, done)}
    if any(costs.values()):
        path = cost_bars(costs, colors, f"Experiment III ({found.label})", out / "exp3_cost.png")
        section.figures.append(Figure(path, "Cost: training time, peak memory, trainable parameters, file size.", done))
    strips = shared_grid(done, methods, [colors[m] for m in methods],
                         "Experiment III: each method on the same prompts and seeds", out / "exp3_samples.png")
    if strips is not None:
        section.figures.append(Figure(strips, "Samples: the same prompt and seed per row for every method.", done))
    section.findings = delta_findings(rows) + [
        findings.ranking(label, {m: c[k] * scale for m, c in costs.items() if k in c}, "")
        for k, (label, scale) in COST_LABELS.items() if any(k in c for c in costs.values())]
    return section


# ─── Experiment IV ──────────────────────────────────────────────────────────────────────────
def blend_section(found: Experiment, style_colors: dict[str, str], out: Path) -> Section:
    section = Section("exp4", "Experiment IV: blending two style LoRAs", found.experiment)
    if not found.runs:
        return missing(section, "blend", "Experiment IV")
    run = found.runs[0]
    metrics = artifact_json(run.run_id, "metrics.json")
    labels = {s.upper(): metrics.get(s, {}).get("label", s.upper()) for s in ("a", "b")}
    styles = {s.upper(): metrics.get(s, {}).get("style", s.upper()) for s in ("a", "b")}
    grid = artifact(run.run_id, "thumbnails/grid.png")
    if grid is not None:
        path = titled_image(grid, f"Experiment IV: A = {labels['A']} to B = {labels['B']}",
                            "blend weight t (columns: 0 = A only ... 1 = B only)", out / "exp4_strips.png")
        section.figures.append(Figure(path, f"Interpolation strips: A = {labels['A']} (t = 0) to B = {labels['B']} "
                                            "(t = 1), one seed per prompt row, same seeds in every column.", [run]))
    rows = blend_rows(metrics)
    if not rows:
        section.notices.append(f"Blend run {run.name} logged no metrics over t.")
        return section
    palette = side_colors(labels, styles, style_colors if set(styles.values()) <= set(style_colors) else None)
    path = draw_blend(rows, None, out / "exp4_curves.png", f"Experiment IV ({run.name})", labels, palette)
    section.figures.append(Figure(path, "Curves over t: similarity to A's and to B's references, oracle style "
                                        "probabilities (toy world) and CLIP score, with 95% intervals.", [run]))
    section.findings = blend_findings(rows, labels)
    return section


def blend_findings(rows: list[dict], labels: dict[str, str]) -> list[str]:
    out = []
    for metric, side in sorted({(r["metric"], r["side"]) for r in rows}):
        curve = sorted((r for r in rows if r["metric"] == metric and r["side"] == side), key=lambda r: r["t"])
        if len(curve) < 2:
            continue
        name = metric_label(metric) + (f" against {side} ({labels.get(side, side)})" if side else "")
        out.append(findings.change_over_t(name[0].upper() + name[1:], curve[0], curve[-1], curve[0].get("n")))
    return out


# ─── Experiment II ──────────────────────────────────────────────────────────────────────────
def search_section(found: Experiment, out: Path) -> Section:
    section = Section("exp2", "Experiment II: searching rank, steps and learning rate", found.experiment)
    if not found.runs:
        return missing(section, "search", "Experiment II")
    rows, objectives, directions = trial_rows(found.runs)
    if best_row(rows, objectives[0], directions[0]) is None:
        section.notices.append(f"Study {found.label} has no complete trial yet; `make search` adds trials.")
        return section
    paths = draw_all(rows, objectives, directions, f"Experiment II ({found.label})", out / "exp2_history.png")
    captions = {"history": "Optimisation history: each trial's objective with its 95% interval, the best so far, "
                           "pruned (x) and failed trials marked.",
                "surface": "Objective (colour) over rank x training steps, one panel per learning rate.",
                "importances": "Parameter importances (optuna fANOVA on the complete trials).",
                "pareto": "Pareto front of the first two objectives."}
    runs = ([found.parent] if found.parent else []) + found.runs
    section.figures = [Figure(path, captions[name], runs) for name, path in paths.items()]
    section.findings = search_findings(rows, objectives, directions, importances(rows, objectives, directions),
                                       searched_params(rows), found.parent.metrics if found.parent else {})
    return section


def search_findings(rows: list[dict], objectives: list[str], directions: list[str], weights: dict,
                    params: list[str], parent: dict | None = None) -> list[str]:
    """parent: the study's parent-run metrics, where the best trial's re-scoring lives (reporting.<objective>)."""
    states = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    objective, parent = objectives[0], parent or {}
    best = best_row(rows, objective, directions[0])
    setting = ", ".join(f"{p} = {findings.fmt(best[p])}" for p in params if p in best)
    selected = (f"{findings.fmt(best[objective])} ({findings.interval_text(best[objective + '.lo'], best[objective + '.hi'], parent.get(f'selection.{objective}.n'))}) "
                f"on the selection references it was chosen on")
    text = [f"{len(rows)} trials: {states['COMPLETE']} complete, {states['PRUNED']} pruned, {states['FAIL']} failed."]
    key = f"reporting.{objective}"
    head = f"The best trial ({directions[0]} {objective}) is trial {best['trial']} with {setting}"
    if key in parent:
        text.append(f"{head}. Re-scored on the reporting references with fresh seeds it gives {findings.fmt(parent[key])} "
                    f"({findings.interval_text(parent.get(key + '.ci95_lo'), parent.get(key + '.ci95_hi'), parent.get(key + '.n'))}), "
                    f"the number to quote; {selected}, which is optimistic.")
    else:
        text.append(f"{head}: {selected}; it has not been re-scored on the reporting references (run the search "
                    f"again with --n-trials 0), so this number is optimistic.")
    if weights:
        ranked = ", ".join(f"{k} {v:.2f}" for k, v in weights.items())
        text.append(f"Share of the objective's variance explained (fANOVA, n = {states['COMPLETE']} trials): {ranked}; "
                    f"{next(iter(weights))} matters most in this study.")
    return text
