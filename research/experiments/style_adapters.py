"""Experiment I: one adapter per style folder, gathered into one result.

Every style folder under the data root (a folder with images; its own validation_prompts.txt) is
trained and evaluated by the one-run recipe (research.experiments.one_run.run), as a child MLflow run of one
parent run. The parent holds the results table (results.csv: every metric's mean, 95% interval and
n, per style and arm) and the style grid (grid.png: rows = prompts, columns = the base model and
each style's adapter, one seed per row), both also written to runs/<experiment>/<timestamp>_styles/.
research/styles.py is its command line.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import os
import time
from pathlib import Path

from PIL import Image, ImageDraw

from research.atomic import save_image, write_json
from research.config import ConfigError, TrainConfig
from research.data import read_validation_prompts, style_folders
from research.methods import get_method
from research.models import ModelNotFoundError, load_pipeline, make_sampler, pick_device, pick_precision, weight_dtype
from research.sampling import Job, generate
from research.tracking import experiment_id, new_run_dir, tracking_uri
from research.experiments.one_run import run

log = logging.getLogger("research")


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
            method.fuse(pipe)
            caption = method.caption
        columns[name] = generate(pipe, jobs, num_inference_steps=cfg.num_inference_steps,
                                 guidance_scale=cfg.guidance_scale, resolution=cfg.resolution,
                                 batch_size=cfg.sample_batch_size, desc=f"grid {name}", prompt_fn=caption)
    return columns


def draw_grid(columns: dict[str, list], prompts: list[str], path: Path, min_cell: int = 128) -> Path:
    """Rows = prompts, columns = base model and styles; small (toy, 64-px) images are scaled up by a whole
    factor, pixel for pixel, so the grid reads at the size it is shown."""
    w, h = next(iter(columns.values()))[0].size
    scale = max(1, -(-min_cell // max(w, h)))
    w, h = w * scale, h * scale
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(probe.textlength(p, font_size=12) for p in prompts)) + 10
    label_h = 18
    grid = Image.new("RGB", (label_w + w * len(columns), label_h + h * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (name, images) in enumerate(columns.items()):
        draw.text((label_w + c * w + 4, 2), name, fill="black", font_size=12)
        for r, image in enumerate(images):
            grid.paste(image.resize((w, h), Image.NEAREST), (label_w + c * w, label_h + r * h))
    for r, prompt in enumerate(prompts):
        draw.text((4, label_h + r * h + h // 2 - 7), prompt, fill="black", font_size=12)
    save_image(grid, path)
    return path


# ─── the experiment ─────────────────────────────────────────────────────────────────────────
def train_styles(cfg: TrainConfig, folders: list[Path], parent: str) -> tuple[list[dict], dict[str, Path]]:
    """One research.train run per style; a style that fails is a FAILED row, and the others still run."""
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
    import mlflow  # deferred, as everywhere in research/: its import takes seconds and --help needs none of it

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
