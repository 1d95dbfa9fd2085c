"""MLproject, conda.yaml, requirements.txt and the CLIs speak one vocabulary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_train_args
from research.arguments import config_from_args
from research.config import ConfigError, TOY_CONFIG, TrainConfig
from research.train import build_parser

REPO = Path(__file__).resolve().parent.parent
MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())


def cli_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt.lstrip("-"): action for action in parser._actions for opt in action.option_strings}


def entry_parsers() -> dict[str, argparse.ArgumentParser]:
    from conftest import load_report
    from research import blend, compare, evaluate, sample, search, styles, study

    captured = {}

    class Capture(Exception):
        pass

    def grab(self, *a, **k):
        captured["parser"] = self
        raise Capture

    parsers = {"train": build_parser()}
    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        for name, module in [("sample", sample), ("evaluate", evaluate), ("compare", compare), ("search", search),
                             ("styles", styles), ("blend", blend), ("study", study), ("report", load_report("report"))]:
            with pytest.raises(Capture):
                module.main([])
            parsers[name] = captured["parser"]
    finally:
        argparse.ArgumentParser.parse_args = original
    return parsers


def test_every_entry_point_is_tested():
    assert set(MLPROJECT["entry_points"]) == {"train", "sample", "evaluate", "quickstart", "compare", "styles", "search",
                                              "blend", "study", "report"}


@pytest.mark.parametrize("entry", ["train", "sample", "evaluate", "compare", "styles", "search", "blend", "study", "report"])
def test_every_mlproject_parameter_is_a_cli_flag_with_the_same_default(entry):
    spec = MLPROJECT["entry_points"][entry]
    options = cli_options(entry_parsers()[entry])
    for name, param in spec["parameters"].items():
        assert name in options, f"MLproject {entry}.{name} is not a flag of the CLI"
        assert f"--{name} {{{name}}}" in spec["command"], f"{entry}.{name} is not passed by the command"
        action = options[name]
        if "default" in param:
            default = action.default
            if isinstance(default, bool):
                assert param["default"] == str(default).lower(), name
            else:
                assert param["default"] == default, name
            kind = {str: "string", bool: "string", int: "int", float: "float"}[type(default)]
            assert param["type"] == kind, name


def test_every_config_field_is_an_mlproject_train_parameter():
    params = MLPROJECT["entry_points"]["train"]["parameters"]
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(params)


def test_conda_pins_equal_requirements():
    reqs = [l.strip() for l in (REPO / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(reqs)
    assert "python=3.11" in conda["dependencies"]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^\s]*", r) for r in reqs), "every requirement is pinned"


def test_config_precedence_defaults_file_flags(tmp_path, monkeypatch):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"rank": 4, "learning_rate": 0.01, "max_train_steps": 50, "style_dir": "x"}))
    argv = ["--config", str(cfg_file), "--learning-rate", "0.5", "--max-train-steps", "1000"]
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.learning_rate == 0.5 and cfg.max_train_steps == 1000  # typed flags win, even at their default
    assert cfg.rank == 4 and cfg.style_dir == "x" and cfg.seed == TrainConfig.seed  # the file beats defaults
    # under `mlflow run` every parameter is passed, so only values that differ from the default override
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    cfg = config_from_args(build_parser().parse_args(argv + ["--rank", "32"]))
    assert cfg.learning_rate == 0.5 and cfg.max_train_steps == 50 and cfg.rank == 4


def test_config_json_round_trip_and_bad_values(tmp_path):
    cfg = TrainConfig(rank=8, train_text_encoder=True)
    path = tmp_path / "c.json"
    path.write_text(cfg.to_json())
    assert TrainConfig.from_json_file(path) == cfg
    path.write_text(json.dumps({"rnak": 3}))
    with pytest.raises(ConfigError, match="unknown keys"):
        TrainConfig.from_json_file(path)
    path.write_text(json.dumps({"rank": "many"}))
    with pytest.raises(ConfigError, match="rank must be int"):
        TrainConfig.from_json_file(path)
    with pytest.raises(ConfigError, match="holdout"):
        TrainConfig.from_dict({"holdout_fraction": 1.5})


def test_toy_config_is_valid():
    cfg = TrainConfig.from_json_file(TOY_CONFIG)
    assert cfg.base_model == "embedded" and cfg.resolution == 64


def test_make_help_lists_every_target():
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for target in ["setup", "quickstart", "test", "train", "sample", "evaluate", "ui", "clean", "toyworld", "compare",
                   "styles", "search", "blend", "report", "study", "bench", "clean-runs"]:
        assert re.search(rf"make {target}\s", out), target


def test_mlflow_run_entry_point(tiny_model, odd_style_dir, tmp_path):
    """`mlflow run . -e train -P config=...` with the local environment: the run lands in the experiment
    and under the run name the parameters name, with the values that ran (the config's rank, not the
    MLproject default), nested under the launcher run MLflow opened in its own experiment."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"rank": 2}))  # the MLproject default is 32
    args = tiny_train_args(odd_style_dir, tiny_model, tmp_path / "runs", max_train_steps=2, checkpointing_steps=0,
                           run_name="from-mlflow-run")
    params = ["-P", f"config={config}"]
    for flag, value in zip(args[::2], args[1::2]):
        if flag != "--rank":
            params += ["-P", f"{flag[2:].replace('-', '_')}={value}"]
    # `--env-manager local` runs the command with the `python` on PATH: the activated venv's
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for leaked in ["MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"]:
        env.pop(leaked, None)  # mlflow.set_experiment in earlier in-process tests exports these
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.run([str(mlflow_bin), "run", ".", "-e", "train", "--env-manager", "local", *params],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert run.info.status == "FINISHED" and run.info.run_name == "from-mlflow-run"
    assert run.data.params["rank"] == "2" and run.data.params["max_train_steps"] == "2"
    assert not any(k.startswith("resolved.") for k in run.data.params) and "cost.train_seconds" in run.data.metrics
    launcher = mlflow.get_run(run.data.tags["mlflow.parentRunId"])
    assert launcher.data.params["rank"] == "32" and run.info.run_id in launcher.data.tags["mlflow.note.content"]
    assert mlflow.get_experiment_by_name("test").tags["mlflow.experimentKind"] == "custom_model_development"
