"""Experiment II on the tiny random model: trials are MLflow runs, failures don't end the study, resume adds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_report, tiny_train_args
from research import search
from research import train as train_module
from research.random_models import write_tiny_clip

STUDY = "inky_search"


def one_line_error(stderr: str, fragment: str) -> bool:
    last = stderr.strip().splitlines()[-1]
    return last.startswith("error: ") and fragment in last and "Traceback" not in stderr


def search_args(style_dir, model, clip, out: Path, n_trials: int, study: str = STUDY, **overrides) -> list[str]:
    """The real CLI minus size: 2 training steps per trial, tiny CLIP for style_similarity."""
    values = dict(checkpointing_steps=0, metrics="style_similarity", clip_model=clip, experiment="exp2",
                  num_eval_images=2, sample_batch_size=2)
    values.update(overrides)
    return tiny_train_args(style_dir, model, out / "runs", **values) + [
        "--n-trials", str(n_trials), "--storage", f"sqlite:///{out / 'optuna.db'}", "--study-name", study,
        "--rank-choices", "2,4", "--steps-range", "2,2", "--lr-range", "1e-4,1e-3"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", image_size=32)


@pytest.fixture(scope="module")
def study_dir(tiny_model, odd_style_dir, tiny_clip, tmp_path_factory):
    """Three trials, the second forced to crash; then the same command once more with one trial."""
    out = tmp_path_factory.mktemp("search")
    real_train = train_module.train

    def crash_second_trial(cfg, run_dir, hooks=(), **kwargs):
        if cfg.run_name.endswith("_t001"):
            raise RuntimeError("simulated crash in trial 1")
        return real_train(cfg, run_dir, hooks, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
        mp.setattr(train_module, "train", crash_second_trial)
        assert search.main(search_args(odd_style_dir, tiny_model, tiny_clip, out, 3)) == 0
        first = json.loads((out / "runs" / "exp2" / f"{STUDY}_summary.json").read_text())
        assert search.main(search_args(odd_style_dir, tiny_model, tiny_clip, out, 1)) == 0
    return out, first


def _runs(out: Path, study: str = STUDY):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["exp2"], filter_string=f"tags.study_name = '{study}'",
                              output_format="list")
    return sorted(runs, key=lambda r: int(r.data.tags["trial_number"]))


def test_failed_trial_is_failed_and_the_study_goes_on(study_dir):
    out, first = study_dir
    assert first["n_trials"] == 3
    assert [t["state"] for t in first["trials"]] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "simulated crash" in first["trials"][1]["error"]
    assert first["best"]["number"] in (0, 2) and first["best"]["value"] == pytest.approx(
        max(t["value"] for t in first["trials"] if t["value"] is not None))
    assert [r.info.status for r in _runs(out)[:3]] == ["FINISHED", "FAILED", "FINISHED"]


def test_every_trial_is_an_mlflow_run_with_params_metrics_and_adapter(study_dir):
    import mlflow

    out, _ = study_dir
    runs = _runs(out)
    assert [r.data.tags["trial_number"] for r in runs] == ["0", "1", "2", "3"]
    client = mlflow.MlflowClient()
    for run in runs:
        assert run.data.params["max_train_steps"] == "2" and run.data.params["rank"] in {"2", "4"}
        assert run.data.tags["objective"] == "adapter.style_similarity"
        if run.info.status != "FINISHED":
            continue
        assert run.data.metrics["objective"] == run.data.metrics["adapter.style_similarity"]
        files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert "checkpoints/pytorch_lora_weights.safetensors" in files
        assert Path(run.data.tags["run_dir"]).name.endswith(f"t{int(run.data.tags['trial_number']):03d}")


def test_resume_adds_trials_to_the_same_study(study_dir):
    import optuna

    out, _ = study_dir
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert study.trials[3].state.name == "COMPLETE"
    summary = json.loads((out / "runs" / "exp2" / f"{STUDY}_summary.json").read_text())
    assert summary["n_trials"] == 4 and summary["best"]["run_dir"]


def test_missing_objective_key_is_one_sentence(study_dir, tiny_model, odd_style_dir, tiny_clip, monkeypatch, capsys):
    import optuna

    out, _ = study_dir  # the same stores, another study: no second database to initialise
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    args = search_args(odd_style_dir, tiny_model, tiny_clip, out, 2, study="bad_objective")
    # a metric the config does not compute fails before any training
    assert search.main(args + ["--objective", "adapter.fid"]) == 2
    assert one_line_error(capsys.readouterr().err, "add it to --metrics")
    # a key no run produces is found after the first trial, which is FAILED, and the error lists the keys
    assert search.main(args + ["--objective", "cost.nope"]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err, "'cost.nope' is not in") and "adapter.style_similarity" in err.splitlines()[-1]
    (trial,) = optuna.load_study(study_name="bad_objective", storage=f"sqlite:///{out / 'optuna.db'}").trials
    assert trial.state.name == "FAIL"
    assert [r.info.status for r in _runs(out, "bad_objective")] == ["FAILED"]


def test_objective_value_reads_flattened_keys():
    metrics = {"n_images": 4, "adapter": {"fid": {"mean": 3.0, "ci95": [2, 4], "n": 4}}, "cost": {"train_seconds": 1.5}}
    assert search.objective_value(metrics, "adapter.fid") == 3.0
    assert search.objective_value(metrics, "cost.train_seconds") == 1.5
    with pytest.raises(search.ObjectiveError, match="one of: adapter.fid, cost.train_seconds, n_images"):
        search.objective_value(metrics, "adapter.style_similarity")
    assert search.resolve_direction("adapter.fid", "auto") == "minimize"
    assert search.resolve_direction("adapter.oracle_style_accuracy", "auto") == "maximize"


def test_search_figure_draws_from_mlflow(study_dir, tmp_path, monkeypatch):
    import mlflow
    from PIL import Image

    out, _ = study_dir
    report = load_report("search_figure")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    png = tmp_path / "search.png"
    assert report.main(["--study-name", STUDY, "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 400
    best = json.loads((out / "runs" / "exp2" / f"{STUDY}_summary.json").read_text())["best"]
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(best["mlflow_run_id"], "reports")}
    assert "reports/search.png" in files
    assert report.main(["--study-name", "no-such-study"]) == 2
