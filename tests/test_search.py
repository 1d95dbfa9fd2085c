"""Experiment II on the tiny random model: a parent run with a child run per trial, alpha following rank,
failures that don't end the study, resume, the exact grid, pruning, two workers on one journal file."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest

from conftest import load_report, tiny_train_args
from research import search
from research.experiments import hyperparameter_search, one_run
from research.random_models import write_tiny_clip

STUDY = "inky_search"


def one_line_error(stderr: str, fragment: str) -> bool:
    last = stderr.strip().splitlines()[-1]
    return last.startswith("error: ") and fragment in last and "Traceback" not in stderr


def search_args(style_dir, model, clip, out: Path, n_trials: int | None, study: str = STUDY, **overrides) -> list[str]:
    """The real CLI minus size: 2 training steps per trial, tiny CLIP for style_similarity, 6 held-out images
    (3 selection + 3 reporting)."""
    values = dict(checkpointing_steps=0, metrics="style_similarity", clip_model=clip, experiment="exp2",
                  num_eval_images=2, sample_batch_size=2, holdout_fraction=0.4, max_train_steps=2)
    values.update(overrides)
    search_flags = {k: values.pop(k) for k in list(values) if k in SEARCH_FLAGS}
    args = tiny_train_args(style_dir, model, out / "runs", **values)
    at = args.index("--lora-alpha")
    del args[at:at + 2]  # a search derives alpha from rank
    args += [
        "--storage", str(out / "optuna.journal"), "--study-name", study, "--sampler-seed", "7",
        "--rank-choices", "2,4", "--steps-range", "2,2", "--lr-range", "1e-4,1e-3", "--report-every", "0"]
    for key, value in search_flags.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + ([] if n_trials is None else ["--n-trials", str(n_trials)])


SEARCH_FLAGS = {"steps_range", "lora_alpha_ratio", "search_sampler", "grid_ranks", "grid_steps", "grid_lrs", "objectives", "pruner",
                "report_every", "prune_images", "workers", "direction", "finalize", "total_trials"}


def _client(out: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    return mlflow.MlflowClient()


def _children(out: Path, study: str = STUDY):
    runs = _client(out).search_runs([_client(out).get_experiment_by_name("exp2").experiment_id],
                                    filter_string=f"tags.study_name = '{study}'")
    trials = [r for r in runs if "trial_number" in r.data.tags]
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    return sorted(trials, key=lambda r: int(r.data.tags["trial_number"])), parents


def _study(out: Path, study: str = STUDY):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return optuna.load_study(study_name=study, storage=JournalStorage(JournalFileBackend(str(out / "optuna.journal"))))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", image_size=32)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """One MLflow store and one journal file for the module (a new MLflow SQLite store costs seconds);
    every test has its own study name."""
    return tmp_path_factory.mktemp("search")


@pytest.fixture(autouse=True)
def _store(out, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")


@pytest.fixture(scope="module")
def study_dir(out, tiny_model, odd_style_dir, tiny_clip):
    """Three TPE trials (alpha = 2 x rank), the second forced to crash; then the same command with one more."""
    real_train = one_run.train

    def crash_second_trial(cfg, run_dir, hooks=(), **kwargs):
        if cfg.run_name.endswith("_t001"):
            raise RuntimeError("simulated crash in trial 1")
        return real_train(cfg, run_dir, hooks, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
        mp.setattr(one_run, "train", crash_second_trial)
        assert search.main(search_args(odd_style_dir, tiny_model, tiny_clip, out, 3, lora_alpha_ratio=2)) == 0
        first = json.loads((out / "runs" / "exp2" / f"{STUDY}_summary.json").read_text())
        assert search.main(search_args(odd_style_dir, tiny_model, tiny_clip, out, 1, lora_alpha_ratio=2)) == 0
    return out, first


def test_failed_trial_is_failed_and_the_study_goes_on(study_dir):
    out, first = study_dir
    assert first["n_trials"] == 3
    assert [t["state"] for t in first["trials"]] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "simulated crash" in first["trials"][1]["error"]
    (best,) = first["best"]
    assert best["number"] in (0, 2) and best["values"][0] == pytest.approx(
        max(t["values"][0] for t in first["trials"] if t["values"]))
    assert [r.info.status for r in _children(out)[0][:3]] == ["FINISHED", "FAILED", "FINISHED"]


def test_every_trial_is_a_child_run_with_params_metrics_and_adapter(study_dir):
    out, _ = study_dir
    children, (parent,) = _children(out)
    assert [r.data.tags["trial_number"] for r in children] == ["0", "1", "2", "3"]
    client = _client(out)
    for run in children:
        p = run.data.params
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert p["trial_number"] == run.data.tags["trial_number"] and p["max_train_steps"] == "2"
        assert p["rank"] in {"2", "4"} and float(p["lora_alpha"]) == 2 * int(p["rank"])  # alpha follows rank
        assert p["heldout_split"] == "selection"
        if run.info.status != "FINISHED":
            continue
        assert run.data.metrics["objective"] == run.data.metrics["adapter.style_similarity"]
        files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert "checkpoints/pytorch_lora_weights.safetensors" in files
        assert any(a.path.endswith("_strip.png") for a in client.list_artifacts(run.info.run_id, "thumbnails"))


def test_parent_run_holds_best_params_both_scores_table_and_figures(study_dir):
    out, _ = study_dir
    summary = json.loads((out / "runs" / "exp2" / f"{STUDY}_summary.json").read_text())
    (best,) = summary["best"]
    _, (parent,) = _children(out)
    m = parent.data.metrics
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == str(best["number"])
    assert m["best.rank"] == best["params"]["rank"]
    selection, reporting = best["selection"]["adapter.style_similarity"], best["reporting"]["adapter.style_similarity"]
    assert m["selection.adapter.style_similarity"] == pytest.approx(selection["mean"]) == best["values"][0]
    assert m["reporting.adapter.style_similarity"] == pytest.approx(reporting["mean"])
    assert selection["mean"] != reporting["mean"]  # other references, other seeds: another number
    assert reporting["ci95"][0] <= reporting["mean"] <= reporting["ci95"][1] and reporting["n"] == 2
    rescored = json.loads((Path(best["reporting_run_dir"]) / "config.json").read_text())
    assert rescored["heldout_split"] == "reporting" and rescored["eval_seed_offset"] == 100_000
    files = {a.path for a in _client(out).list_artifacts(parent.info.run_id)}
    assert {f"{STUDY}_summary.json", f"{STUDY}_trials.csv", "figures"} <= files
    with open(summary["files"]["trials"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


def test_resume_continues_the_numbering(study_dir):
    out, _ = study_dir
    study = _study(out)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert study.trials[3].state.name == "COMPLETE"
    # the resumed worker drew with seed 7 + the 3 trials already there (not 7 again), logged on the parent
    _, (parent,) = _children(out)
    assert "10" in {v for k, v in parent.data.tags.items() if k.endswith(".sampler_seed")}


def test_alpha_follows_rank_and_the_ratio_can_be_searched():
    import optuna

    space = {"rank": [4, 16], "max_train_steps": (10, 100), "learning_rate": (1e-5, 1e-3), "lora_alpha_ratio": [0.5, 2.0]}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(8):
        trial = study.ask()
        params = hyperparameter_search.suggest(trial, space)
        assert params["lora_alpha"] == params["rank"] * trial.params["lora_alpha_ratio"]
        assert 10 <= params["max_train_steps"] <= 100
    dists = trial.distributions
    assert dists["max_train_steps"].log and dists["learning_rate"].log
    assert isinstance(dists["rank"], optuna.distributions.CategoricalDistribution)


def test_grid_enumerates_exactly_the_configured_grid(tiny_model, odd_style_dir, tiny_clip, out):
    args = search_args(odd_style_dir, tiny_model, tiny_clip, out, None, study="grid", search_sampler="grid",
                       grid_ranks="2,4", grid_steps="1,2", grid_lrs="1e-3", metrics="none",
                       objectives="cost.trainable_params", num_eval_images=1)
    assert search.main(args) == 0
    trials = _study(out, "grid").trials
    drawn = [(t.params["rank"], t.params["max_train_steps"]) for t in trials]
    assert sorted(drawn) == sorted(itertools.product([2, 4], [1, 2]))  # every point once, nothing else
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len(_children(out, "grid")[0]) == 4


def test_two_workers_run_every_grid_point_once(tiny_model, odd_style_dir, tiny_clip, out):
    """Optuna's GridSampler alone, in two processes on one journal, ran 9 trials for 8 points (3 twice,
    2 never); each worker now owns every other point."""
    args = search_args(odd_style_dir, tiny_model, tiny_clip, out, None, study="grid2", search_sampler="grid",
                       grid_ranks="2,4", grid_steps="1,2", grid_lrs="1e-4,1e-3", metrics="none",
                       objectives="cost.trainable_params", num_eval_images=1, workers=2)
    assert search.main(args) == 0
    trials = _study(out, "grid2").trials
    drawn = [(t.params["rank"], t.params["max_train_steps"], t.params["learning_rate"]) for t in trials]
    assert sorted(drawn) == sorted(itertools.product([2, 4], [1, 2], [1e-4, 1e-3]))  # every point once
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert search.main(args) == 0  # run again: the grid is done, nothing is added
    assert len(_study(out, "grid2").trials) == 8


def test_grid_share_splits_the_grid_and_refuses_a_bad_share(odd_style_dir, capsys):
    grid = {"rank": [4, 16], "learning_rate": [1e-4, 5e-4], "max_train_steps": [100]}
    points = hyperparameter_search.grid_points(grid)
    assert len(points) == 4 and len({tuple(sorted(p.items())) for p in points}) == 4
    assert points[0::2] + points[1::2] != points and sorted(map(str, points[0::2] + points[1::2])) == sorted(map(str, points))
    with pytest.raises(SystemExit):
        search.build_parser().parse_args(["--grid-share"])
    assert search.main(["--style-dir", str(odd_style_dir), "--search-sampler", "grid", "--grid-share", "2/2"]) == 2
    assert "--grid-share must be i/K" in capsys.readouterr().err


def test_original_grid_is_the_default_grid():
    args = search.build_parser().parse_args(["--search-sampler", "grid"])
    space = hyperparameter_search.search_space(args, "grid", "lora")
    assert hyperparameter_search.grid_of(space) == {"rank": [16, 32, 64, 128], "max_train_steps": [500, 1000, 1500, 2000],
                                     "learning_rate": [1e-4, 5e-4]}


def test_pruning_stops_the_trial_whose_intermediate_value_is_worst(tiny_model, odd_style_dir, tiny_clip, out,
                                                                    monkeypatch):
    """Three trials score 0.5-0.7 at step 2, the fourth 0.1: the median pruner stops the fourth there."""
    scores = iter([0.5, 0.6, 0.7, 0.1])
    monkeypatch.setattr(hyperparameter_search, "intermediate_score", lambda *a, **k: next(scores))
    args = search_args(odd_style_dir, tiny_model, tiny_clip, out, 4, study="prune", steps_range="4,4",
                       report_every=2, pruner="median", prune_images=2)
    assert search.main(args) == 0
    trials = _study(out, "prune").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert trials[3].intermediate_values == {2: 0.1} and trials[0].intermediate_values == {2: 0.5}
    children, _ = _children(out, "prune")
    pruned = children[3]
    assert pruned.info.status == "KILLED" and pruned.data.tags["trial_state"] == "PRUNED"
    assert pruned.data.metrics["intermediate.style_similarity"] == 0.1 and "train.loss" in pruned.data.metrics
    assert "adapter.style_similarity" not in pruned.data.metrics  # stopped before its full evaluation


def test_intermediate_score_is_the_adapter_metric_alone_and_nan_without_its_backbone(tiny_clip, odd_style_dir):
    import math

    from research.config import TrainConfig
    from research.data import load_style_folder
    from research.metrics import compute_metrics
    from research.sampling import plan_jobs

    images = [e.image for e in load_style_folder(odd_style_dir, resolution=32).train]
    refs, shots = images[:4], images[4:8]
    jobs = plan_jobs(["a striped card", "a red card"], len(shots), 3)
    cfg = TrainConfig(clip_model=str(tiny_clip), device="cpu", seed=3)
    value = hyperparameter_search.intermediate_score(cfg, shots, jobs, refs, "style_similarity", "cpu")
    expected = compute_metrics(shots, None, [j.prompt for j in jobs], refs, metrics=["style_similarity"],
                               clip_model=str(tiny_clip), seed=3, progress=False)["adapter"]["style_similarity"]
    assert math.isfinite(value) and value == pytest.approx(expected["mean"])
    missing = TrainConfig(clip_model=str(odd_style_dir / "no-clip-here"), device="cpu")
    assert math.isnan(hyperparameter_search.intermediate_score(missing, shots, jobs, refs, "style_similarity", "cpu"))


def test_several_objectives_use_nsga2_and_report_the_pareto_front(tiny_model, odd_style_dir, tiny_clip, out,
                                                                  monkeypatch, capsys):
    args = search_args(odd_style_dir, tiny_model, tiny_clip, out, 2, study="pareto",
                       objectives="adapter.style_similarity,cost.trainable_params")
    assert search.main(args) == 0
    study = _study(out, "pareto")
    assert study.user_attrs["search_sampler"] == "nsga2"
    summary = json.loads((out / "runs" / "exp2" / "pareto_summary.json").read_text())
    assert summary["directions"] == ["maximize", "minimize"]
    assert {b["number"] for b in summary["best"]} == {t.number for t in study.best_trials}
    assert "Pareto front" in capsys.readouterr().out


@pytest.mark.slow  # two fresh Python processes importing torch: 78 s on the shared 2-core machine
def test_two_workers_on_one_journal_file_share_the_trials(tiny_model, odd_style_dir, tiny_clip, out,
                                                         monkeypatch):
    """--workers 2: two processes, 4 trials between them, every trial once in Optuna and once in MLflow."""
    args = search_args(odd_style_dir, tiny_model, tiny_clip, out, 4, study="pair", metrics="none",
                       objectives="cost.trainable_params", workers=2, num_eval_images=1, max_train_steps=1)
    assert search.main(args) == 0
    trials = _study(out, "pair").trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert 4 <= len(complete) <= 5  # a worker mid-trial when the other reaches 4 finishes its trial
    assert [t.number for t in trials] == list(range(len(trials)))
    children, (parent,) = _children(out, "pair")
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == [t.number for t in trials]  # none twice
    seeds = {v for k, v in parent.data.tags.items() if k.endswith(".sampler_seed")}
    assert len(seeds) == 2  # each worker drew with its own seed


def test_a_dead_local_workers_journal_trial_is_failed_and_retried(tmp_path):
    """The journal has no heartbeat: a RUNNING trial whose worker process on this machine is gone becomes
    FAIL and is retried with its params; a live worker's trial is left alone."""
    import os
    import socket
    import subprocess

    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from research.experiments.search_records import recover_dead_local_trials

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(study_name="dead", storage=storage)
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process
    host = socket.gethostname()
    for pid, rank in ((gone.pid, 8), (os.getpid(), 16)):
        trial = study.ask()
        trial.suggest_int("rank", rank, rank)
        trial.set_user_attr("worker", f"{host}-{pid}")
    recover_dead_local_trials("exp2")(study)
    dead, alive, retry = study.trials
    assert (dead.state.name, alive.state.name, retry.state.name) == ("FAIL", "RUNNING", "WAITING")
    assert retry.params == dead.params == {"rank": 8} and retry.system_attrs["failed_trial"] == dead.number
    recover_dead_local_trials("exp2")(study)  # a second look retries nothing twice
    assert len(study.trials) == 3


def test_objective_errors_are_one_sentence(study_dir, tiny_model, odd_style_dir, tiny_clip, capsys):
    out, _ = study_dir  # the same stores, another study
    args = search_args(odd_style_dir, tiny_model, tiny_clip, out, 2, study="bad_objective")
    # a metric the config does not compute fails before any training
    assert search.main(args + ["--objectives", "adapter.fid"]) == 2
    assert one_line_error(capsys.readouterr().err, "add it to --metrics")
    # a key no run produces is found after the first trial, which is FAILED, and the error lists the keys
    assert search.main(args + ["--objective", "cost.nope"]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err, "'cost.nope' is not in") and "adapter.style_similarity" in err.splitlines()[-1]
    (trial,) = _study(out, "bad_objective").trials
    assert trial.state.name == "FAIL"
    assert [r.info.status for r in _children(out, "bad_objective")[0]] == ["FAILED"]
    # a trial research.train refuses before it starts (a rank above the layers' size) leaves no stub folder
    assert search.main(args + ["--rank-choices", "4096", "--study-name", "too_big"]) == 2
    assert one_line_error(capsys.readouterr().err, "rank")
    assert [t.state.name for t in _study(out, "too_big").trials] == ["FAIL"]  # it was a trial, refused by train
    assert not [d for d in (out / "runs" / "exp2").iterdir() if d.is_dir() and not any(d.iterdir())]
    # --lora-alpha would undo "alpha follows rank"
    assert search.main(args + ["--lora-alpha", "16"]) == 2
    assert one_line_error(capsys.readouterr().err, "--lora-alpha-ratio")


def test_objective_value_reads_flattened_keys():
    metrics = {"n_images": 4, "adapter": {"fid": {"mean": 3.0, "ci95": [2, 4], "n": 4}}, "cost": {"train_seconds": 1.5}}
    assert hyperparameter_search.objective_value(metrics, "adapter.fid") == 3.0
    assert hyperparameter_search.objective_value(metrics, "cost.train_seconds") == 1.5
    with pytest.raises(hyperparameter_search.ObjectiveError, match="one of: adapter.fid, cost.train_seconds, n_images"):
        hyperparameter_search.objective_value(metrics, "adapter.style_similarity")
    assert hyperparameter_search.resolve_directions(["adapter.fid", "adapter.oracle_style_accuracy"], "auto") == ["minimize", "maximize"]


def test_search_figure_draws_from_mlflow(study_dir, tmp_path):
    import mlflow
    from PIL import Image

    out, _ = study_dir
    report = load_report("search_figure")
    png = tmp_path / "search.png"
    assert report.main(["--study-name", STUDY, "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 400
    (best,) = json.loads((out / "runs" / "exp2" / f"{STUDY}_summary.json").read_text())["best"]
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(best["mlflow_run_id"], "reports")}
    assert "reports/search.png" in files
    assert report.main(["--study-name", "no-such-study"]) == 2


# ─── many machines: a real PostgreSQL server, one worker killed mid-trial ────────────────────
@pytest.fixture()
def postgresql_url():
    """A throwaway PostgreSQL server on 127.0.0.1, stopped and deleted after the test. initdb refuses
    to run as root, so under root (CI containers) the server runs as the unprivileged user `nobody`."""
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not on PATH: apt-get install postgresql")
    try:
        import psycopg  # noqa: F401  (SQLAlchemy 2.1's default PostgreSQL driver)
    except ImportError:
        pytest.skip("no PostgreSQL driver for SQLAlchemy: pip install -r requirements.txt")
    as_user = []
    home = Path(tempfile.mkdtemp(prefix="pg-"))  # not under tmp_path: `nobody` must reach it
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without `runuser` to start PostgreSQL as an unprivileged user")
        as_user = [runuser, "-u", "nobody", "--"]
        home.chmod(0o755)
        shutil.chown(home, "nobody")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = home / "pgdata"
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "optuna", "--auth=trust"], check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(home / "pg.log"), "-w", "start",
                    "-o", f"-p {port} -h 127.0.0.1 -k {home}"], check=True, capture_output=True)
    try:
        yield f"postgresql://optuna@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_postgresql_workers_survive_one_killed_mid_trial(postgresql_url, tiny_model, odd_style_dir, tiny_clip,
                                                         tmp_path, monkeypatch):
    """Two workers on one PostgreSQL study; one is SIGKILLed in its first trial. Its trial is failed by
    heartbeat and retried with the same params, the study reaches 4 complete trials, nothing twice."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = search_args(odd_style_dir, tiny_model, tiny_clip, tmp_path, 4, study="pg", metrics="none",
                       objectives="cost.trainable_params", steps_range="40,40", num_eval_images=1,
                       total_trials=4, finalize="false")
    args += ["--storage", postgresql_url, "--heartbeat-interval", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    workers = [subprocess.Popen([sys.executable, "-m", "research.search", *args], env=env) for _ in range(2)]
    victim = workers[0]
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until the victim is training (its trial has a run), then kill it
            try:
                trials = optuna.load_study(study_name="pg", storage=postgresql_url).trials
            except KeyError:  # the study is not created yet
                trials = []
            mine = [t.number for t in trials if t.state.name == "RUNNING"
                    and t.user_attrs.get("worker", "").endswith(f"-{victim.pid}")]
            if mine and _client(tmp_path).get_experiment_by_name("exp2") and any(r.data.tags.get("trial_number") == str(mine[0]) for r in _children(tmp_path, "pg")[0]):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the first worker never started training a trial")
        victim.send_signal(signal.SIGKILL)
        assert workers[1].wait(timeout=600) == 0
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert search.main(args + ["--n-trials", "0", "--finalize", "true"]) == 0
    trials = optuna.load_study(study_name="pg", storage=postgresql_url).trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    (killed,) = [t for t in trials if t.user_attrs.get("worker", "").endswith(f"-{victim.pid}")
                 and t.state.name != "COMPLETE"]
    assert killed.state.name == "FAIL" and len(complete) >= 4
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.state.name == "COMPLETE" and retry.params == killed.params
    children, _ = _children(tmp_path, "pg")
    numbers = [int(r.data.tags["trial_number"]) for r in children]
    assert len(numbers) == len(set(numbers))  # no trial has two runs
    by_number = {int(r.data.tags["trial_number"]): r for r in children}
    assert by_number[killed.number].info.status == "FAILED"
    assert all(by_number[t.number].info.status == "FINISHED" for t in complete)
