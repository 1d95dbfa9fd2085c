"""The study report on synthetic MLflow runs made here, in a temporary store: figures, notices, findings."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_report

PROMPTS = ["a house by a lake", "a cat on a wall"]
SEEDS = [1126, 1127]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, made once: creating its tables takes seconds, copying it does not."""
    import mlflow

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def store(empty_store, tmp_path, monkeypatch):
    """An MlflowClient on the test's own SQLite store, and a run maker."""
    import mlflow

    uri = f"sqlite:///{shutil.copyfile(empty_store, tmp_path / 'mlflow.db')}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    scratch = tmp_path / "scratch"

    def experiment(name: str) -> str:
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found else client.create_experiment(
            name, artifact_location=(tmp_path / "artifacts" / name).as_uri())

    def make_run(exp: str, name: str, *, tags=None, params=None, metrics=None, files=None, status="FINISHED"):
        run = client.create_run(experiment(exp), run_name=name, tags=tags or {})
        rid = run.info.run_id
        for k, v in (params or {}).items():
            client.log_param(rid, k, str(v))
        for k, v in (metrics or {}).items():
            client.log_metric(rid, k, v)
        for rel, content in (files or {}).items():
            path = scratch / rid / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Image.Image):
                content.save(path)
            else:
                path.write_text(json.dumps(content))
            parent = str(Path(rel).parent)
            client.log_artifact(rid, str(path), artifact_path=None if parent == "." else parent)
        client.set_terminated(rid, status)
        return rid

    return client, make_run


def tile(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def samples(offset: int) -> dict:
    """inference/ and inference/baseline/ as research.sample writes them: same prompts and seeds."""
    files = {}
    for sub, shift in (("inference", offset), ("inference/baseline", 0)):
        entries = []
        for i, prompt in enumerate(PROMPTS):
            for seed in SEEDS:
                name = f"p{i:02d}_s{seed:06d}.png"
                entries.append({"file": name, "prompt_index": i, "prompt": prompt, "seed": seed})
                files[f"{sub}/{name}"] = tile(seed + shift)
        files[f"{sub}/manifest.json"] = entries
    return files


def quality(delta: float, half_width: float = 0.5, metric: str = "style_similarity") -> tuple[dict, dict]:
    """MLflow metrics and the metrics.json delta section of one run (the metrics contract of issue 8)."""
    lo, hi = delta - half_width, delta + half_width
    metrics = {f"delta.{metric}": delta, f"delta.{metric}.ci95_lo": lo, f"delta.{metric}.ci95_hi": hi,
               f"adapter.{metric}": 1 + delta, f"baseline.{metric}": 1.0, "n_images": 8}
    return metrics, {"delta": {metric: {"mean": delta, "ci95": [lo, hi], "n": 4, "better": "higher"}}}


def add_styles(make_run, deltas: dict[str, float]) -> list[str]:
    parent = make_run("exp1", "styles", tags={"experiment_kind": "styles"})
    ids = []
    for k, (style, delta) in enumerate(deltas.items()):
        metrics, detail = quality(delta)
        ids.append(make_run("exp1", f"{style}_lora", metrics=metrics,
                            tags={"style": style, "method": "lora", "mlflow.parentRunId": parent},
                            params={"rank": 8, "learning_rate": 6e-4, "max_train_steps": 100, "base_model": "embedded"},
                            files={"metrics.json": detail, **samples(10 * (k + 1))}))
    return [parent] + ids


def add_search(make_run) -> list[str]:
    ids = []
    grid = [(4, 100, 1e-4), (8, 200, 1e-4), (4, 200, 5e-4), (8, 100, 5e-4), (16, 300, 5e-4), (16, 100, 1e-4)]
    for number, (rank, steps, lr) in enumerate(grid):
        value = 0.1 * number + rank / 100
        state = {4: ("KILLED", "PRUNED"), 5: ("FAILED", "FAIL")}.get(number, ("FINISHED", "COMPLETE"))
        metrics = {"adapter.style_similarity": value, "objective": value,
                   "adapter.style_similarity.ci95_lo": value - 0.05, "adapter.style_similarity.ci95_hi": value + 0.05}
        ids.append(make_run("exp2", f"s_t{number:03d}", status=state[0],
                            tags={"study_name": "s", "trial_number": str(number), "trial_state": state[1],
                                  "objective": "adapter.style_similarity", "direction": "maximize"},
                            params={"rank": rank, "max_train_steps": steps, "learning_rate": lr},
                            metrics=metrics if state[1] == "COMPLETE" else {}))
    return ids


def add_compare(make_run) -> list[str]:
    ids = []
    for k, (method, delta) in enumerate([("lora", 0.8), ("textual_inversion", -0.1)]):
        metrics, detail = quality(delta)
        metrics.update({"cost.train_seconds": 10.0 * (k + 1), "cost.peak_memory_mb": 900 + k,
                        "cost.trainable_params": 1e5 / (k + 1), "cost.artifact_bytes": 4e5 / (k + 1)})
        ids.append(make_run("exp3", f"pastel_{method}", tags={"comparison": "c1", "method": method, "style": "pastel"},
                            params={"method": method, "max_train_steps": 100}, metrics=metrics,
                            files={"metrics.json": detail, **samples(50 + k)}))
    return ids


def add_blend(make_run) -> list[str]:
    def point(mean):
        return {"mean": mean, "ci95": [mean - 0.05, mean + 0.05], "n": 8}

    metrics = {"weights": [0, 0.5, 1], "a": {"label": "pastel_lora", "style": "pastel"},
               "b": {"label": "comic_lora", "style": "comic"},
               **{f"t_{t:.2f}": {"style_similarity_a": point(0.9 - 0.6 * t), "style_similarity_b": point(0.3 + 0.6 * t),
                                 "clip_score": point(25.0)} for t in (0, 0.5, 1)}}
    return [make_run("exp4", "pastel_lora_x_comic_lora",
                     tags={"method": "lora_blend", "style_a": "pastel", "style_b": "comic"},
                     files={"metrics.json": metrics, "thumbnails/grid.png": tile(7)})]


def render(tmp_path, *extra) -> tuple[str, Path]:
    report = load_report("report")
    out = tmp_path / "out"
    assert report.main(["--out-dir", str(out), *extra]) == 0
    return (out / "index.html").read_text(), out


FIGURES = ["exp1_style_grid", "exp1_deltas", "exp2_history", "exp2_history_rank_steps", "exp2_history_importances",
           "exp3_quality", "exp3_cost", "exp3_samples", "exp4_strips", "exp4_curves"]


def test_report_draws_every_figure_names_its_runs_and_is_logged(store, tmp_path):
    client, make_run = store
    ids = add_styles(make_run, {"pastel": 0.4, "comic": -0.3}) + add_search(make_run) + add_compare(make_run) \
        + add_blend(make_run)
    page, out = render(tmp_path)
    for name in FIGURES:
        png = out / "figures" / f"{name}.png"
        assert Image.open(png).size[0] > 300, name
        assert f'href="figures/{name}.png"' in page, name
    assert page.count("data:image/png;base64,") == len(FIGURES)  # every image embedded: opens offline
    assert "notice" not in re.sub(r"\.notice\{[^}]*\}", "", page)  # every experiment has runs: no notice
    for run_id in ids:
        assert run_id in page, run_id
    assert "trial 3 with rank = 8" in page  # best complete trial: the pruned and failed ones score higher
    view = json.loads(client.get_experiment_by_name("exp1").tags["mlflow.sharedViewState.key-columns"])
    assert {"tags.`style`", "params.`rank`", "params.`learning_rate`", "metrics.`delta.style_similarity`"} \
        <= set(view["selectedColumns"])  # the runs table the report links shows the key columns
    assert "runs?viewStateShareKey=key-columns&amp;workflowType=machine_learning" in page
    (run,) = client.search_runs([client.get_experiment_by_name("report").experiment_id])
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"index.html", "figures"} <= logged and run.data.tags["experiment_kind"] == "report"


def test_missing_experiments_get_a_notice_naming_their_command(store, tmp_path):
    _, make_run = store
    add_styles(make_run, {"pastel": 0.4})
    page, out = render(tmp_path, "--no-tracking")
    for command in ["make search", "make compare", "make blend"]:
        assert re.search(rf'class="notice">Experiment I+V? has no runs[^<]*`{command}', page), command
    assert "make styles" not in page
    assert sorted(p.stem for p in (out / "figures").iterdir()) == ["exp1_deltas", "exp1_style_grid"]


@pytest.mark.parametrize("delta, half_width, expected", [
    (0.4, 0.2, "style similarity (cosine) rose by 0.4 (95% CI 0.2 to 0.6, n = 4); the interval excludes zero, "
               "a better value"),
    (-0.4, 0.2, "style similarity (cosine) fell by 0.4 (95% CI -0.6 to -0.2, n = 4); the interval excludes zero, "
                "a worse value"),
    (0.1, 0.3, "style similarity (cosine) rose by 0.1 (95% CI -0.2 to 0.4, n = 4); the interval includes zero"),
    # every paired image agreed (a style accuracy of 0 -> 1 on all of them): a zero-width interval is still one
    (1.0, 0.0, "style similarity (cosine) rose by 1 (95% CI 1 to 1, n = 4); the interval excludes zero, a better value"),
])
def test_findings_follow_the_numbers(store, tmp_path, delta, half_width, expected):
    _, make_run = store
    metrics, detail = quality(delta, half_width)
    make_run("exp1", "pastel_lora", tags={"style": "pastel", "method": "lora"}, metrics=metrics,
             files={"metrics.json": detail})
    page, _ = render(tmp_path, "--no-tracking")
    findings = page[page.index('<div class="findings">'):]
    assert f"For pastel, {expected}" in findings


def test_search_findings_quote_the_re_scored_number_not_the_one_selected_on():
    load_report("report")  # puts reports/ on the path its sections import from
    sections = load_report("sections")
    obj = "adapter.style_similarity"
    rows = [{"trial": t, "state": "COMPLETE", "rank": r, obj: v, obj + ".lo": v - 0.02, obj + ".hi": v + 0.02}
            for t, r, v in [(0, 4, 0.08), (1, 8, 0.127), (2, 16, 0.11)]]
    parent = {f"reporting.{obj}": 0.1225, f"reporting.{obj}.ci95_lo": 0.0955, f"reporting.{obj}.ci95_hi": 0.1495,
              f"reporting.{obj}.n": 64.0, f"selection.{obj}.n": 64.0}  # MLflow hands counts back as floats
    text = " ".join(sections.search_findings(rows, [obj], ["maximize"], {}, ["rank"], parent))
    assert "trial 1 with rank = 8" in text
    assert "reporting references with fresh seeds it gives 0.122 (95% CI 0.0955 to 0.149, n = 64)" in text
    assert "0.127 (95% CI 0.107 to 0.147, n = 64) on the selection references" in text
    unscored = " ".join(sections.search_findings(rows, [obj], ["maximize"], {}, ["rank"], {}))
    assert "has not been re-scored" in unscored and "optimistic" in unscored


def test_a_difference_logged_without_an_interval_establishes_no_sign():
    findings = load_report("findings")
    text = findings.difference("pastel", "clip_score", 2.0, 2.0, 2.0, 64, "higher", has_interval=False)
    assert text.endswith("no interval was logged, so its sign is not established.")
    assert "excludes zero" in findings.difference("pastel", "clip_score", 2.0, 2.0, 2.0, 64, "higher")


def test_multi_objective_search_draws_its_pareto_front(tmp_path):
    figure = load_report("search_figure")
    rows = [{"trial": i, "state": "COMPLETE", "run_id": str(i), "rank": r, "max_train_steps": s, "learning_rate": 1e-4,
             "a": a, "a.lo": a, "a.hi": a, "b": b, "b.lo": b, "b.hi": b}
            for i, (r, s, a, b) in enumerate([(4, 100, 1, 3), (8, 200, 2, 2), (16, 300, 3, 1), (8, 100, 1, 1)])]
    study = figure.in_memory_study(rows, ["a", "b"], ["maximize", "maximize"])
    assert sorted(t.values for t in study.best_trials) == [[1, 3], [2, 2], [3, 1]]  # (1, 1) is dominated
    paths = figure.draw_all(rows, ["a", "b"], ["maximize", "maximize"], "t", tmp_path / "s.png")
    assert {"history", "pareto", "importances", "surface"} == set(paths) and paths["pareto"].stat().st_size > 1000


@pytest.mark.slow
def test_report_renders_in_headless_chromium_without_a_broken_image(store, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless check needs Debian's `chromium` (apt-get install chromium)")
    _, make_run = store
    add_styles(make_run, {"pastel": 0.4, "comic": -0.3})
    add_compare(make_run)
    add_blend(make_run)
    _, out = render(tmp_path, "--no-tracking")
    # count images that did not decode, after load; the DOM dump carries the answer in the title
    probe = out / "probe.html"
    probe.write_text((out / "index.html").read_text().replace(
        "</body>", "<script>window.onload=()=>{const b=[...document.images].filter(i=>!i.complete||"
                   "i.naturalWidth===0).length;document.title='broken='+b+' of '+document.images.length}</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(broken=\d+ of \d+)</title>", dom.stdout)
    assert title and title.group(1).startswith("broken=0 of ") and not title.group(1).endswith(" of 0"), dom.stderr[-500:]
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, "--window-size=1200,2000", f"--screenshot={shot}", (out / "index.html").as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # not a blank page


@pytest.mark.slow
def test_mlflow_ui_shows_a_run_in_the_model_training_view(tmp_path):
    """`make ui`'s link opens a run page of a Tracker run with its params and the model-training tabs."""
    import os
    import socket
    import sys
    import time
    import urllib.request

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless check needs Debian's `chromium` (apt-get install chromium)")
    from research.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    tracker = Tracker(tmp_path, "exp1", "pastel_lora", {"style": "pastel", "method": "lora"})
    tracker.log_params({"rank": 8, "learning_rate": 6e-4})
    tracker.log_metrics({"delta.style_similarity": 0.3})
    tracker.finish()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow_bin), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port",
                               str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        experiment = tracker.mlflow.get_experiment_by_name("exp1").experiment_id
        url = (f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs/{tracker.run_id}"
               "?workflowType=machine_learning")
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000",
                              "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "Model metrics" in dom and "pastel_lora" in dom and "learning_rate" in dom
    assert "Model registry" in dom and "Judges" not in dom  # the model-training sidebar, not the GenAI one
