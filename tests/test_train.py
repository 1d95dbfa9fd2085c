"""The real training entry point on a tiny random SD model: files, reload, resume, tracking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import load_report, tiny_train_args
from research.random_models import write_tiny_clip
from research.training.hooks import MLflowHook
from research.train import main

REPO = Path(__file__).resolve().parent.parent


def one_line_error(stderr: str, fragment: str) -> bool:
    """The person sees one `error:` sentence containing the fix, and no traceback."""
    last = stderr.strip().splitlines()[-1]
    return last.startswith("error: ") and fragment in last and "Traceback" not in stderr


def only_run(out: Path) -> Path:
    runs = [p for p in (out / "test").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


EVAL_METRICS = "clip_score,style_similarity,fid,kid,lpips_diversity"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", image_size=32)


@pytest.fixture(scope="module")
def finished_run(tiny_model, odd_style_dir, tiny_clip, tmp_path_factory) -> Path:
    """One tracked, evaluated run through the real CLI in a subprocess, shared by the checks below."""
    out = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{out / 'mlflow.db'}", HF_HUB_OFFLINE="1")
    args = tiny_train_args(odd_style_dir, tiny_model, out, metrics=EVAL_METRICS, clip_model=tiny_clip,
                           feature_extractor="clip", lpips_weights="random")
    proc = subprocess.run([sys.executable, "-m", "research.train", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run(out)


def test_run_folder_layout(finished_run, odd_style_dir):
    for sub in ["checkpoints", "inference", "inference/baseline", "thumbnails"]:
        assert (finished_run / sub).is_dir(), sub
    cfg = json.loads((finished_run / "config.json").read_text())
    assert cfg["rank"] == 4 and cfg["style_dir"] == str(odd_style_dir)
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["n_images"] == 4
    assert set(metrics) >= {"n_images", "adapter", "baseline", "delta", "cost"}
    for arm in ["adapter", "baseline", "delta"]:
        assert set(metrics[arm]) == set(EVAL_METRICS.split(",")), arm
        for value in metrics[arm].values():
            assert {"mean", "ci95", "n"} <= set(value)
            assert value["ci95"][0] <= value["mean"] <= value["ci95"][1] or value.get("unreliable"), (arm, value)
        assert metrics[arm]["clip_score"]["n"] == 4
    for name, d in metrics["delta"].items():  # paired: the difference of the two arms' full-set values
        assert d["mean"] == pytest.approx(metrics["adapter"][name]["mean"] - metrics["baseline"][name]["mean"])
    assert metrics["adapter"]["style_similarity"]["mean"] != metrics["baseline"]["style_similarity"]["mean"]
    cost = metrics["cost"]
    assert cost["trainable_params"] > 0 and cost["artifact_bytes"] > 0 and cost["steps_per_second"] > 0
    assert len(list((finished_run / "inference").glob("*.png"))) == 4
    assert len(list((finished_run / "inference" / "baseline").glob("*.png"))) == 4
    assert sorted(p.name for p in (finished_run / "thumbnails").glob("*.png")) == ["p00_strip.png", "p01_strip.png"]
    log = (finished_run / "logs.txt").read_text()
    assert "step 4/4 loss" in log
    assert "sampling 4 images per arm" in log and "adapter - baseline" in log  # logs.txt covers evaluation too
    # the odd files were named and skipped, the odd ones used: 8 good + rgba, grey, palette, 16-bit, jpg, webp, bmp
    assert "corrupt.png" in log and "tiny.png" in log
    assert "12 training images, 3 held out" in log


def tiny_pipeline_and_render(tiny_model):
    """The tiny base model as a pipeline, and a function that renders one seeded image with it."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def render():
        g = torch.Generator().manual_seed(0)
        return pipe("a striped card", num_inference_steps=2, height=32, width=32, generator=g,
                    output_type="np").images

    return pipe, render


def test_lora_file_loads_with_diffusers_and_changes_output(finished_run, tiny_model):
    pipe, render = tiny_pipeline_and_render(tiny_model)
    base = render()
    pipe.load_lora_weights(str(finished_run / "checkpoints"), weight_name="pytorch_lora_weights.safetensors",
                           adapter_name="style")
    with_lora = render()
    assert abs(with_lora - base).max() > 1e-4  # the adapter is really applied
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    assert abs(render() - base).max() < 1e-5  # scale 0 is the base model


def test_a_fused_lora_samples_what_the_loaded_one_does_without_its_layers(finished_run, tiny_model):
    """Evaluation folds the adapter into the base weights before sampling: same images, plain UNet."""
    from research.config import TrainConfig
    from research.methods import get_method

    method = get_method(TrainConfig.from_json_file(finished_run / "config.json"))
    pipe, render = tiny_pipeline_and_render(tiny_model)
    base = render()
    method.load_into(pipe, finished_run / "checkpoints")
    loaded = render()
    method.fuse(pipe)
    fused = render()
    assert abs(loaded - base).max() > 1e-4 and abs(fused - loaded).max() < 1e-4
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())


def test_lora_alpha_and_config_travel_with_the_weights(finished_run):
    path = finished_run / "checkpoints" / "pytorch_lora_weights.safetensors"
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    lora_meta = json.loads(meta["lora_adapter_metadata"])
    assert lora_meta["unet.r"] == 4 and lora_meta["unet.lora_alpha"] == 8
    assert json.loads(meta["research_config"])["rank"] == 4
    assert meta["research_prediction_type"] == "epsilon"  # the tiny base's own: the config left it empty


def test_kohya_copy_has_the_expected_keys_and_alpha(finished_run):
    diffusers_sd = load_file(finished_run / "checkpoints" / "pytorch_lora_weights.safetensors")
    kohya = load_file(finished_run / "checkpoints" / "lora_kohya.safetensors")
    modules = {k.split(".lora")[0] for k in diffusers_sd}
    assert len(modules) * 3 == len(kohya)  # lora_down, lora_up and alpha for every adapted module
    for module in modules:
        name = "lora_unet_" + module.removeprefix("unet.").replace(".", "_")
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        assert torch.equal(down, diffusers_sd[f"{module}.lora_A.weight"])
        assert torch.equal(up, diffusers_sd[f"{module}.lora_B.weight"])
        assert float(kohya[f"{name}.alpha"]) == 8.0  # the trained alpha, not the rank


def test_mlflow_run_has_params_metrics_and_artifacts(finished_run):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{finished_run.parent.parent / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["rank"] == "4" and run.data.params["method"] == "lora"
    assert run.data.tags["style"] == "inky" and run.data.tags["method"] == "lora"
    assert "train.loss" in run.data.metrics and run.data.metrics["cost.trainable_params"] > 0
    assert {"adapter.clip_score", "baseline.clip_score", "adapter.fid", "baseline.kid", "delta.kid",
            "delta.kid.ci95_lo", "delta.kid.ci95_hi", "adapter.clip_score.ci95_lo"} <= set(run.data.metrics)
    m = run.data.metrics
    assert m["delta.kid.ci95_lo"] <= m["delta.kid"] <= m["delta.kid.ci95_hi"]
    client = mlflow.MlflowClient()
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "metrics.json", "logs.txt", "checkpoints", "inference", "thumbnails"} <= top
    ckpt = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/pytorch_lora_weights.safetensors" in ckpt
    assert not any("state-" in p for p in ckpt)  # resumable states stay in the run folder only


def test_failed_run_is_marked_failed_with_its_log(tiny_model, odd_style_dir, tmp_path, tracking_store, monkeypatch):
    import mlflow

    def boom(self, info, components):
        if info.step == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(MLflowHook, "on_step", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(tiny_train_args(odd_style_dir, tiny_model, tmp_path / "runs"))
    mlflow.set_tracking_uri(tracking_store)
    (run,) = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert run.info.status == "FAILED"
    assert "logs.txt" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}


def test_nan_loss_stops_with_a_clear_error(tiny_model, odd_style_dir, tmp_path, capsys):
    code = main(tiny_train_args(odd_style_dir, tiny_model, tmp_path, learning_rate=1e20, max_train_steps=8,
                                lr_scheduler="constant", max_grad_norm=0, snr_gamma=0) + ["--no-tracking"])
    err = capsys.readouterr().err
    assert code == 2 and one_line_error(err, "lower --learning-rate")


@pytest.mark.parametrize("flag, value, fragment", [
    ("--style-dir", "/nonexistent/folder", "does not exist"),
    ("--base-model", "/nonexistent/model", "not a diffusers model folder"),
    ("--rank", "0", "--rank must be"),
    ("--resolution", "30", "multiple of 8"),
])
def test_bad_input_gets_one_line(tiny_model, odd_style_dir, tmp_path, capsys, flag, value, fragment):
    args = tiny_train_args(odd_style_dir, tiny_model, tmp_path) + ["--no-tracking", flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert one_line_error(err, fragment)


def test_missing_hub_model_offline_is_one_sentence(odd_style_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = tiny_train_args(odd_style_dir, "some-org/not-downloaded-model", tmp_path) + ["--no-tracking"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert one_line_error(err, "some-org/not-downloaded-model") and "--base-model" in err


def test_evaluate_cli_regenerates_and_rescores(finished_run, tiny_clip, tmp_path):
    import shutil

    from research import evaluate

    run = shutil.copytree(finished_run, tmp_path / finished_run.name)  # the shared run stays as trained
    before = json.loads((run / "metrics.json").read_text())
    assert evaluate.main(["--run-dir", str(run), "--num-images", "6", "--metrics", "clip_score"]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["n_images"] == 6 and set(after["adapter"]) == {"clip_score"}
    assert after["adapter"]["clip_score"]["n"] == 6
    assert after["cost"] == before["cost"]  # training cost is kept
    assert len(list((run / "inference").glob("*.png"))) == 6
    # fewer images than the set before: the folders hold the new set only, not its 6 images' leftovers
    # ... on seeds the run's own numbers never used (--eval-seed-offset), both arms on the same ones
    assert evaluate.main(["--run-dir", str(run), "--num-images", "2", "--metrics", "clip_score",
                          "--eval-seed-offset", "1000"]) == 0
    manifest = json.loads((run / "inference" / "manifest.json").read_text())
    assert len(manifest) == 2
    trained = json.loads((run / "config.json").read_text())
    assert {e["seed"] for e in manifest} == {trained["seed"] + 1000}
    assert json.loads((run / "inference" / "baseline" / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in (run / "inference").glob("*.png")) == sorted(e["file"] for e in manifest)
    assert len(list((run / "inference" / "baseline").glob("*.png"))) == 2
    assert len(list((run / "thumbnails").glob("*.png"))) == len({e["prompt_index"] for e in manifest})
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def _snapshot(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}


def test_follow_up_commands_refuse_damaged_runs_before_touching_them(finished_run, tmp_path, capsys):
    import shutil

    from research import evaluate, sample

    run = shutil.copytree(finished_run, tmp_path / finished_run.name)
    images = _snapshot(run / "inference")
    (run / "metrics.json").write_text('{"adapter": ')  # cut short
    assert evaluate.main(["--run-dir", str(run), "--metrics", "clip_score"]) == 2
    assert one_line_error(capsys.readouterr().err, "metrics.json is damaged")
    adapter = run / "checkpoints" / "pytorch_lora_weights.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-100])  # a copy cut short
    assert sample.main(["--run-dir", str(run)]) == 2
    assert one_line_error(capsys.readouterr().err, "is damaged")
    assert _snapshot(run / "inference") == images  # nothing re-sampled, nothing overwritten


def test_sample_reuses_the_runs_own_prompts_and_refuses_to_guess(finished_run, tmp_path, capsys):
    import shutil

    from research import sample

    run = shutil.copytree(finished_run, tmp_path / finished_run.name)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "style_dir": str(tmp_path / "moved_away")}))
    before = json.loads((run / "inference" / "manifest.json").read_text())
    assert sample.main(["--run-dir", str(run), "--num-eval-images", "4"]) == 0
    after = json.loads((run / "inference" / "manifest.json").read_text())
    assert [e["prompt"] for e in after] == [e["prompt"] for e in before]  # the prompts it was evaluated on
    (run / "inference" / "manifest.json").unlink()
    assert sample.main(["--run-dir", str(run)]) == 2
    assert one_line_error(capsys.readouterr().err, "--validation-prompts-file")


def test_validation_images_are_logged_with_their_step(tiny_model, odd_style_dir, tmp_path, tracking_store):
    import mlflow

    args = tiny_train_args(odd_style_dir, tiny_model, tmp_path / "runs", validation_steps=2, checkpointing_steps=0)
    assert main(args) == 0
    mlflow.set_tracking_uri(tracking_store)
    (run,) = mlflow.search_runs(experiment_names=["test"], output_format="list")
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "validation")}
    # two validation prompts, logged at steps 2 and 4
    assert files == {f"validation/p{p:02d}_s000003_step{s:06d}.png" for p in (0, 1) for s in (2, 4)}


def test_metrics_figure_reads_mlflow_and_draws(finished_run, tmp_path, monkeypatch):
    import mlflow
    from PIL import Image

    report = load_report("metrics_figure")
    uri = f"sqlite:///{finished_run.parent.parent / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rows = report.load_rows("test")
    assert {r["arm"] for r in rows} == {"adapter", "baseline"}
    assert {r["metric"] for r in rows} >= {"style_similarity", "fid"}
    out = tmp_path / "fig.png"
    assert report.main(["--experiment", "test", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 400
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert "reports/fig.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "reports")}
    assert report.main(["--experiment", "no-such-experiment"]) == 2


def test_interval_bars_reach_from_the_point_to_each_end(tmp_path, caplog):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from research.figures import point_and_interval

    fig, ax = plt.subplots()
    point_and_interval(ax, [0, 1], [1.0, 5.0], [0.5, 2.0], [3.0, 5.0], "black")
    (bars,) = [c for c in ax.containers]
    segments = bars.lines[2][0].get_segments()
    assert [tuple(seg[:, 1]) for seg in segments] == [(0.5, 3.0), (2.0, 5.0)]
    # a record from before intervals were centred on their estimates: the point, no bar, and a warning
    fig, ax = plt.subplots()
    point_and_interval(ax, [0], [99.0], [112.0], [146.0], "black")
    (bars,) = [c for c in ax.containers]
    assert [tuple(seg[:, 1]) for seg in bars.lines[2][0].get_segments()] == [(99.0, 99.0)]
    assert "do not contain their estimate" in caplog.text


def test_random_crop_and_text_encoder_lora_paths(tiny_model, odd_style_dir, tmp_path):
    """Without caching (random crops) and with LoRA on the text encoder, the same loop trains and saves."""
    args = tiny_train_args(odd_style_dir, tiny_model, tmp_path, center_crop="false", train_text_encoder="true",
                           checkpointing_steps=0)
    assert main(args + ["--no-tracking"]) == 0
    saved = load_file(only_run(tmp_path) / "checkpoints" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in saved) and any(k.startswith("unet.") for k in saved)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_caption_dropout_trains_on_the_empty_prompt(tiny_model, odd_style_dir, tmp_path, monkeypatch, dropout):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        if self.training:  # training steps only, not the evaluation samples
            seen.append(encoder_hidden_states.detach().clone())
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    assert main(tiny_train_args(odd_style_dir, tiny_model, tmp_path, caption_dropout=dropout) + ["--no-tracking"]) == 0
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        empty = CLIPTextModel.from_pretrained(tiny_model / "text_encoder")(ids)[0][0]
    rows = torch.cat(seen)
    assert len(rows) == 4 * 2  # 4 steps of batch 2
    n_empty = sum(torch.allclose(row, empty, atol=1e-5) for row in rows)
    if dropout:
        assert 0 < n_empty < len(rows)
    else:
        assert n_empty == 0


def test_base_model_images_are_made_once_and_read_back_pixel_for_pixel(tiny_model, tmp_path, monkeypatch):
    """Every run of a study samples the same base model on the same prompts and seeds: the second run reads
    the first one's images (identical pixels); other sampler settings, or a damaged entry, sample anew."""
    from types import SimpleNamespace

    import numpy as np

    from research import sampling
    from research.models import load_pipeline, make_sampler

    cfg = SimpleNamespace(base_model=str(tiny_model), output_dir=str(tmp_path), sampler="dpm++",
                          num_inference_steps=2, guidance_scale=5.0, resolution=32, sample_batch_size=4)
    pipe = make_sampler(load_pipeline(str(tiny_model)), "dpm++")
    pipe.set_progress_bar_config(disable=True)
    jobs = sampling.plan_jobs(["a red card", "a blue card"], 4, seed=7)
    common = dict(num_inference_steps=2, guidance_scale=5.0, resolution=32, batch_size=4)
    made, real = [], sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: made.append(k) or real(*a, **k))

    first = sampling.baseline_images(pipe, jobs, cfg, **common)
    second = sampling.baseline_images(pipe, jobs, cfg, **common)
    assert len(made) == 1
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second, strict=True))

    cfg.guidance_scale = 3.0
    sampling.baseline_images(pipe, jobs, cfg, **{**common, "guidance_scale": 3.0})
    assert len(made) == 2  # another setting, another entry

    cfg.guidance_scale = 5.0
    entry = tmp_path / sampling.BASELINE_CACHE / sampling.baseline_key(cfg, jobs, pipe)
    (entry / jobs[0].file_name).write_bytes(b"not a png")
    again = sampling.baseline_images(pipe, jobs, cfg, **common)
    assert len(made) == 3 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    assert sampling.load_set(entry)[1] == jobs  # the damaged entry was replaced whole
