"""Experiment I on the tiny random model: one child run per style folder, a results table, a style grid."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from conftest import tiny_train_args
from research import styles


@pytest.fixture(scope="module")
def data_root(odd_style_dir, tmp_path_factory) -> Path:
    """Two style folders (each with its own prompts) and a folder without images, which is not a style."""
    root = tmp_path_factory.mktemp("styles")
    for name, prompt in [("inky", "a striped card"), ("bold", "a bold square")]:
        shutil.copytree(odd_style_dir, root / name)
        (root / name / "validation_prompts.txt").write_text(f"{prompt}\nanother {prompt}\n")
    (root / "notes").mkdir()
    (root / "notes" / "readme.md").write_text("no images here")
    return root


@pytest.fixture(scope="module")
def result(data_root, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp1")
    args = tiny_train_args(data_root / "inky", tiny_model, out / "runs", max_train_steps=2, checkpointing_steps=0,
                           experiment="exp1", num_eval_images=2, metrics="none")
    at = args.index("--style-dir")
    del args[at:at + 2]  # the styles come from --data-root
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
        assert styles.main(["--config", "", "--data-root", str(data_root), *args]) == 0
    summary = json.loads(next((out / "runs" / "exp1").glob("*_styles/summary.json")).read_text())
    return out, summary


def test_one_child_run_per_style_with_params_metrics_and_adapter(result):
    import mlflow

    out, summary = result
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("exp1").experiment_id
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["styles_finished"] == 2
    assert sorted(r.data.tags["style"] for r in children) == ["bold", "inky"]
    for run in children:
        assert run.info.status == "FINISHED" and run.data.params["max_train_steps"] == "2"
        assert "cost.train_seconds" in run.data.metrics
        files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert "checkpoints/pytorch_lora_weights.safetensors" in files
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.csv", "grid.png", "summary.json"}


def test_results_table_has_a_row_per_style(result):
    _, summary = result
    with open(Path(summary["folder"]) / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["style"] for r in rows] == ["bold", "inky"] and {r["status"] for r in rows} == {"FINISHED"}
    assert all(float(r["cost.train_seconds"]) > 0 and Path(r["run_dir"]).is_dir() for r in rows)


def test_style_grid_rows_are_prompts_columns_base_then_styles_one_seed_per_row(result):
    _, summary = result
    # the styles' validation prompts in turn, 4 rows by default
    assert summary["grid_prompts"] == ["a bold square", "a striped card", "another a bold square",
                                       "another a striped card"]
    assert summary["grid_columns"] == ["base", "bold", "inky"]
    assert summary["grid_seeds"] == [3, 4, 5, 6]  # --seed 3, then one seed per row shared by every column
    grid = Image.open(Path(summary["folder"]) / "grid.png")
    # 32-px samples are scaled 4x to 128-px cells; the label column fits the longest prompt
    label_w = grid.size[0] - 3 * 128
    assert grid.size[1] == 18 + 4 * 128
    assert ImageDraw.Draw(grid).textlength("another a striped card", font_size=12) < label_w < 300


def test_missing_or_unknown_styles_are_one_sentence(data_root, tmp_path, capsys):
    assert styles.main(["--data-root", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: --data-root")
    assert styles.main(["--data-root", str(data_root), "--styles", "inky,notes"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --styles names notes") and "bold, inky" in err
