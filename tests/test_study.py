"""The study orchestrator's plumbing: stage order, resume from MLflow, failures, and each stage's flags."""

from __future__ import annotations

import importlib

import pytest
from PIL import Image

from research import study
from research.experiments import study as study_stages


def args_for(tmp_path, *extra):
    for style in ("comic", "pastel"):  # a style folder is a folder with images
        (tmp_path / "data" / style).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / style / "0.png")
    (tmp_path / "data" / "notes").mkdir()  # not a style: no images
    return study.build_parser().parse_args(["--data-root", str(tmp_path / "data"), *extra])


def fake_stage(name, done=False, fails=False, error=None):
    def argv(args):
        if error:
            raise study_stages.StageError(error)
        return [name, "--fail" if fails else "--ok"]

    return study_stages.Stage(name, argv, lambda args: done)


def test_stages_run_in_order_skip_what_mlflow_holds_and_go_on_after_a_failure(tmp_path, capsys):
    stages = [fake_stage("styles", done=True), fake_stage("search", fails=True),
              fake_stage("blend", error="needs two adapters"), fake_stage("report")]
    ran = []
    results = study_stages.run_study(args_for(tmp_path), stages, runner=lambda argv: ran.append(argv) or ("--fail" in argv))
    assert [a[0] for a in ran] == ["search", "report"]
    assert {k: v["status"] for k, v in results.items()} == {"styles": "skipped", "search": "failed",
                                                           "blend": "not run", "report": "done"}
    out = capsys.readouterr().out
    assert "[1/4] styles: skipped" in out and "[3/4] blend: not run: needs two adapters" in out
    assert "[4/4] report: done in 0 s" in out
    # --force redoes a stage MLflow already holds; --skip leaves one out
    ran.clear()
    study_stages.run_study(args_for(tmp_path / "again", "--force", "styles", "--skip", "search,blend"), stages,
                    runner=lambda argv: ran.append(argv) or 0)
    assert [a[0] for a in ran] == ["styles", "report"]


def test_stage_commands_parse_with_their_modules_flags(tmp_path, monkeypatch):
    """Each stage's argv is accepted by the module it calls (catches a renamed flag after a merge)."""
    args = args_for(tmp_path)
    monkeypatch.setattr(study_stages, "style_adapters", lambda: {"comic": "runs/exp1/c", "pastel": "runs/exp1/p"})
    for stage in study_stages.STAGE_TABLE:
        if stage.name == "report":
            continue
        argv = stage.argv(args)
        module = importlib.import_module(argv[1])
        module.build_parser().parse_args(argv[2:])
    assert study_stages.search_argv(args)[study_stages.search_argv(args).index("--style-dir") + 1].endswith("comic")
    assert study_stages.blend_argv(args)[-4:] == ["--adapter-a", "runs/exp1/c", "--adapter-b", "runs/exp1/p"]


def test_the_toy_study_trains_the_three_styles_not_the_base_models_plain_look(tmp_path):
    assert study.default_styles("data/toy", "") == "pastel,vivid,comic"
    assert study.default_styles("data/toy/", "vivid") == "vivid"
    assert study.default_styles("data/anime", "") == ""  # elsewhere: every style folder
    args = args_for(tmp_path, "--styles", "pastel")
    assert study_stages.styles_argv(args)[-2:] == ["--styles", "pastel"]
    assert study_stages.first_style(args).name == "pastel"  # Exp II and III train on a chosen style
    assert "--styles" not in study_stages.styles_argv(args_for(tmp_path / "all"))


def test_blend_stage_takes_two_style_adapters_from_mlflow(tracking_store, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(tracking_store)
    args = args_for(tmp_path)
    with pytest.raises(study_stages.StageError, match="two Experiment-I adapters"):
        study_stages.blend_argv(args)
    mlflow.set_experiment("exp1")
    for style in ["vivid", "comic", "comic"]:  # newest comic run wins
        folder = tmp_path / "runs" / f"{style}{len(list(tmp_path.glob('runs/*')))}"
        folder.mkdir(parents=True)
        with mlflow.start_run(tags={"style": style, "method": "lora", "run_dir": str(folder)}):
            pass
    argv = study_stages.blend_argv(args)
    assert argv[argv.index("--adapter-a") + 1].endswith("comic2") and argv[argv.index("--adapter-b") + 1].endswith("vivid0")
    assert study_stages.STAGE_TABLE[3].done(args) is False


def test_main_prints_the_stage_table_and_records_a_study_run(tracking_store, tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study_stages, "STAGE_TABLE", [fake_stage("styles"), fake_stage("report", fails=True)])
    monkeypatch.setattr(study_stages, "run_command", lambda argv: int("--fail" in argv))
    config = tmp_path / "c.json"
    config.write_text("{}")
    (tmp_path / "data" / "pastel").mkdir(parents=True)
    assert study.main(["--config", str(config), "--data-root", str(tmp_path / "data")]) == 1  # report failed
    out = capsys.readouterr().out
    assert "styles   done" in out and "report   failed" in out and "total" in out
    mlflow.set_tracking_uri(tracking_store)
    (run,) = mlflow.search_runs(experiment_names=["study"], output_format="list")
    assert run.info.status == "FAILED" and run.data.tags["stage.report"] == "failed"
    assert {"stage.styles.seconds", "stage.report.seconds", "study.seconds"} <= set(run.data.metrics)
    assert study.main(["--config", str(tmp_path / "missing.json")]) == 2
