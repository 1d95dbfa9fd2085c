"""Experiment I: one adapter per style folder, gathered into one result.

    python -m research.styles                                   # the toy world: data/toy/<style>/, toy config
    python -m research.styles --config "" --data-root data/anime --base-model <sd-1.5> --rank 16

Every style folder under --data-root (a folder with images; its own validation_prompts.txt) is trained
and evaluated by research.train.run, as a child MLflow run of one parent run. The parent holds the
results table (results.csv: every metric's mean, 95% interval and n, per style and arm) and the style
grid (grid.png: rows = prompts, columns = the base model and each style's adapter, one seed per row),
both also written to runs/<experiment>/<timestamp>_styles/.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

from research.atomic import save_image, write_json
from research.arguments import add_config_arguments, config_from_args
from research.config import ConfigError, TOY_CONFIG, TrainConfig
from research.data import IMAGE_EXTENSIONS, DataError, read_validation_prompts
from research.models import ModelNotFoundError
from research.tracking import REPO_ROOT, experiment_id, new_run_dir, setup_logging, tracking_uri

log = logging.getLogger("research")
USER_ERRORS = (ConfigError, DataError, ModelNotFoundError)


def style_folders(data_root: Path, only: str = "") -> list[Path]:
    """Sub-folders of data_root that hold images, in name order (--styles picks some by name)."""
    if not data_root.is_dir():
        raise DataError(f"--data-root {data_root} does not exist; pass a folder with one sub-folder per style "
                        "(make data builds data/toy).")
    found = [d for d in sorted(data_root.iterdir())
             if d.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in d.iterdir())]
    if only:
        wanted = [s.strip() for s in only.split(",") if s.strip()]
        missing = sorted(set(wanted) - {d.name for d in found})
        if missing:
            raise DataError(f"--styles names {', '.join(missing)}, not style folders of {data_root} "
                            f"({', '.join(d.name for d in found) or 'none'}).")
        found = [d for d in found if d.name in wanted]
    if not found:
        raise DataError(f"No style folder (a sub-folder with images) under {data_root}; add one per style.")
    return found


# ─── results table ──────────────────────────────────────────────────────────────────────────
def result_row(style: str, run_dir: Path | None, status: str) -> dict:
    """One table row: every metric of every arm as mean / ci95_lo / ci95_hi / n, plus the training cost."""
    row = {"style": style, "status": status, "run_dir": str(run_dir or "")}
    path = run_dir / "metrics.json" if run_dir else None
    if not path or not path.is_file():
        return row
    metrics = json.loads(path.read_text())
    for arm in ("adapter", "baseline", "delta"):
        for name, value in (metrics.get(arm) or {}).items():
            if isinstance(value, dict) and "mean" in value:
                lo, hi = (value.get("ci95") or [None, None])[:2]
                row.update({f"{arm}.{name}": value["mean"], f"{arm}.{name}.ci95_lo": lo,
                            f"{arm}.{name}.ci95_hi": hi, f"{arm}.{name}.n": value.get("n")})
    row.update({f"cost.{k}": v for k, v in (metrics.get("cost") or {}).items()})
    return row


def write_table(rows: list[dict], path: Path) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


# ─── style grid ─────────────────────────────────────────────────────────────────────────────
def grid_prompts(cfg: TrainConfig, folders: list[Path], prompts_file: str, rows: int) -> list[str]:
    """--grid-prompts-file's lines, else the styles' validation prompts taken in turn (first of each style,
    then second, ...), distinct, `rows` of them."""
    if prompts_file:
        return read_validation_prompts(Path(prompts_file).parent, "", prompts_file)[:rows]
    per_style = [read_validation_prompts(d, d.name, cfg.validation_prompts_file) for d in folders]
    in_turn = [p for group in itertools.zip_longest(*per_style) for p in group if p is not None]
    return list(dict.fromkeys(in_turn))[:rows]


def grid_columns(cfg: TrainConfig, runs: dict[str, Path], prompts: list[str]) -> dict[str, list]:
    """Images per column: the base model, then each style's saved adapter; row i uses seed cfg.seed + i in
    every column, so a row differs only by the adapter."""
    from research.methods import get_method
    from research.models import load_pipeline, make_sampler, pick_device, pick_precision, weight_dtype
    from research.sampling import Job, generate

    device = pick_device(cfg.device)
    dtype = weight_dtype(pick_precision(cfg.mixed_precision, device))
    jobs = [Job(i, p, cfg.seed + i) for i, p in enumerate(prompts)]
    columns = {}
    for name, run_dir in {"base": None, **runs}.items():
        pipe = make_sampler(load_pipeline(cfg.base_model, dtype).to(device), cfg.sampler)
        pipe.set_progress_bar_config(disable=True)
        caption = str  # the base model gets the prompt as written
        if run_dir is not None:
            run_cfg = TrainConfig.from_json_file(run_dir / "config.json")
            method = get_method(run_cfg)
            method.load_into(pipe, run_dir / "checkpoints")
            caption = method.caption
        columns[name] = generate(pipe, jobs, num_inference_steps=cfg.num_inference_steps,
                                 guidance_scale=cfg.guidance_scale, resolution=cfg.resolution,
                                 batch_size=cfg.sample_batch_size, desc=f"grid {name}", prompt_fn=caption)
    return columns


def draw_grid(columns: dict[str, list], prompts: list[str], path: Path) -> Path:
    from PIL import Image, ImageDraw

    w, h = next(iter(columns.values()))[0].size
    label_w, label_h = max(120, w), 14
    grid = Image.new("RGB", (label_w + w * len(columns), label_h + h * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (name, images) in enumerate(columns.items()):
        draw.text((label_w + c * w + 2, 1), name, fill="black")
        for r, image in enumerate(images):
            grid.paste(image, (label_w + c * w, label_h + r * h))
    for r, prompt in enumerate(prompts):
        draw.text((2, label_h + r * h + 2), prompt[:40], fill="black")
    save_image(grid, path)
    return path


# ─── the experiment ─────────────────────────────────────────────────────────────────────────
def train_styles(cfg: TrainConfig, folders: list[Path], parent: str) -> tuple[list[dict], dict[str, Path]]:
    """One research.train run per style; a style that fails is a FAILED row, and the others still run."""
    from research.experiments.one_run import run

    rows, done = [], {}
    for folder in folders:
        style_cfg = dataclasses.replace(cfg, style_dir=str(folder), style_name="", run_name="", run_dir="")
        style_cfg.validate()
        try:
            run_dir = run(style_cfg, tags={"mlflow.parentRunId": parent, "styles_parent": parent})
        except (ConfigError, ModelNotFoundError):
            raise  # every style would fail the same way
        except Exception as err:  # this style's folder or training: its run is FAILED, the next style goes on
            log.error("style %s failed: %s", folder.name, err)
            rows.append(result_row(folder.name, None, f"FAILED: {err}"))
            continue
        done[folder.name] = run_dir
        rows.append(result_row(folder.name, run_dir, "FINISHED"))
    return rows, done


def styles(cfg: TrainConfig, data_root: Path, only: str = "", prompts_file: str = "", grid_rows: int = 4) -> dict:
    import mlflow

    folders = style_folders(data_root, only)
    out = new_run_dir(cfg.output_dir, cfg.experiment, "styles")
    client = mlflow.MlflowClient(tracking_uri())
    parent = os.environ.pop("MLFLOW_RUN_ID", None)  # under `mlflow run -e styles` its run is the parent
    outer = parent
    if parent is None:
        parent = client.create_run(experiment_id(cfg.experiment), run_name=f"styles_{data_root.name}").info.run_id
    client.set_tag(parent, "role", "styles")
    client.set_tag(parent, "experiment_kind", "styles")  # how research.study finds a finished Experiment I
    client.set_tag(parent, "data_root", str(data_root))
    t0 = time.perf_counter()
    try:
        rows, done = train_styles(cfg, folders, parent)
        prompts = grid_prompts(cfg, folders, prompts_file, grid_rows)
        files = [write_table(rows, out / "results.csv")]
        if done:
            files.append(draw_grid(grid_columns(cfg, done, prompts), prompts, out / "grid.png"))
        summary = {"data_root": str(data_root), "wall_seconds": time.perf_counter() - t0, "rows": rows,
                   "grid_prompts": prompts, "grid_seeds": [cfg.seed + i for i in range(len(prompts))],
                   "grid_columns": ["base", *done], "folder": str(out), "parent_run_id": parent}
        write_json(out / "summary.json", summary)
        for path in [*files, out / "summary.json"]:
            client.log_artifact(parent, str(path))
        client.log_metric(parent, "wall_seconds", summary["wall_seconds"])
        client.log_metric(parent, "styles_finished", len(done))
        client.set_terminated(parent, "FINISHED" if done else "FAILED")
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    finally:
        if outer:
            os.environ["MLFLOW_RUN_ID"] = outer
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m research.styles", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", "--data_root", dest="data_root", default="data/toy",
                        help="folder with one sub-folder of images per style")
    parser.add_argument("--styles", default="", help="comma-separated style folder names; empty = all")
    parser.add_argument("--grid-prompts-file", "--grid_prompts_file", dest="grid_prompts_file", default="",
                        help="prompts of the style grid's rows; empty = the styles' validation prompts in turn")
    parser.add_argument("--grid-rows", "--grid_rows", dest="grid_rows", type=int, default=4,
                        help="rows (prompts) of the style grid")
    add_config_arguments(parser)
    # the embedded toy default, like its data root; --config "" for the real-model defaults
    parser.set_defaults(config=str(TOY_CONFIG.relative_to(REPO_ROOT)), experiment="exp1")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        # the runs go to --experiment (exp1 by default), not to the experiment a --config file names
        cfg = dataclasses.replace(config_from_args(args), experiment=args.experiment)
        if args.grid_rows < 1:
            raise ConfigError(f"--grid-rows must be at least 1, got {args.grid_rows}.")
        summary = styles(cfg, Path(args.data_root), args.styles, args.grid_prompts_file, args.grid_rows)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    keys = [k for k in ("adapter.style_similarity", "delta.style_similarity", "adapter.oracle_style_accuracy",
                        "cost.train_seconds") if any(k in r for r in summary["rows"])]
    print(f"\nExperiment I: {len(summary['rows'])} styles in {summary['wall_seconds']:.0f} s")
    print(f"{'style':<16}{'status':<12}" + "".join(f"{k:>32}" for k in keys))
    for row in summary["rows"]:
        cells = "".join(f"{_cell(row, k):>32}" for k in keys)
        print(f"{row['style']:<16}{row['status'][:10]:<12}{cells}")
    print(f"\n  table: {summary['folder']}/results.csv\n  grid:  {summary['folder']}/grid.png"
          f"\n  MLflow parent run {summary['parent_run_id']} (make ui)")
    return 0 if all(r["status"] == "FINISHED" for r in summary["rows"]) else 1


def _cell(row: dict, key: str) -> str:
    if row.get(key) is None:
        return "-"
    lo, hi = row.get(f"{key}.ci95_lo"), row.get(f"{key}.ci95_hi")
    ci = f" [{lo:.3f},{hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{row[key]:.3f}{ci}" + (f" n={row[f'{key}.n']}" if row.get(f"{key}.n") is not None else "")


if __name__ == "__main__":
    sys.exit(main())
