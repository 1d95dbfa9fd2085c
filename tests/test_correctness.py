"""Defects that once gave wrong results without an error: the prediction type end to end, text-encoder
LoRA files, multi-process runs. Each test runs the real entry point on the tiny random model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tiny_train_args
from research.train import main

REPO = Path(__file__).resolve().parent.parent


def only_run(out: Path) -> Path:
    (run,) = [p for p in (out / "test").iterdir() if p.is_dir()]
    return run


def fresh_pipeline(model: Path, sampler_config: dict | None = None):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **(sampler_config or {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt: str, seed: int) -> np.ndarray:
    out = pipe([prompt], num_inference_steps=2, guidance_scale=7.5, height=32, width=32,
               generator=[torch.Generator().manual_seed(seed)])
    return np.asarray(out.images[0], dtype=np.int16)


# ─── prediction type ─────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def v_run(tiny_model, odd_style_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("v")
    assert main(tiny_train_args(odd_style_dir, tiny_model, out, prediction_type="v_prediction", sampler="dpm++")
                + ["--no-tracking"]) == 0
    return only_run(out)


def test_v_prediction_adapter_is_sampled_as_v_and_the_baseline_as_the_base(v_run, tiny_model):
    with safe_open(v_run / "checkpoints" / "pytorch_lora_weights.safetensors", framework="pt") as f:
        assert f.metadata()["research_prediction_type"] == "v_prediction"
    manifest = json.loads((v_run / "inference" / "manifest.json").read_text())
    job = manifest[0]
    adapter_image = np.asarray(Image.open(v_run / "inference" / job["file"]), dtype=np.int16)
    baseline_image = np.asarray(Image.open(v_run / "inference" / "baseline" / job["file"]), dtype=np.int16)

    v_pipe = fresh_pipeline(tiny_model, {"prediction_type": "v_prediction"})
    v_pipe.load_lora_weights(str(v_run / "checkpoints"), weight_name="pytorch_lora_weights.safetensors")
    as_v = render(v_pipe, job["prompt"], job["seed"])
    eps_pipe = fresh_pipeline(tiny_model)
    eps_pipe.load_lora_weights(str(v_run / "checkpoints"), weight_name="pytorch_lora_weights.safetensors")
    as_eps = render(eps_pipe, job["prompt"], job["seed"])
    assert np.abs(as_v - as_eps).max() > 2  # the check can tell the two apart
    assert np.abs(adapter_image - as_v).max() <= 1  # PNG rounding only
    assert np.abs(baseline_image - render(fresh_pipeline(tiny_model), job["prompt"], job["seed"])).max() <= 1


def test_a_base_model_predicting_something_else_is_refused(tiny_model, odd_style_dir, tmp_path, capsys):
    odd = tmp_path / "sample_model"
    shutil.copytree(tiny_model, odd)
    config = odd / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    assert main(tiny_train_args(odd_style_dir, odd, tmp_path / "out") + ["--no-tracking"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'sample'" in last and "--prediction-type" in last


def test_dreambooth_class_images_come_from_the_base_as_it_predicts(tiny_model, odd_style_dir, tmp_path):
    from research.config import TrainConfig
    from research.methods import Components, get_method
    from research.models import load_pipeline

    cfg = TrainConfig(method="dreambooth", resolution=32, num_class_images=1, num_inference_steps=2,
                      with_prior_preservation=True, prediction_type="v_prediction", sampler="dpm++", seed=3)
    c = Components.from_pipeline(load_pipeline(str(tiny_model)), cfg.prediction_type)
    assert c.noise_scheduler.config.prediction_type == "v_prediction"
    (image,) = get_method(cfg)._class_images(c, tmp_path / "class")
    expected = render(fresh_pipeline(tiny_model), cfg.class_prompt, cfg.seed + 100_000)
    assert np.abs(np.asarray(image, dtype=np.int16) - expected).max() <= 1


# ─── text-encoder LoRA ──────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def te_runs(tiny_model, odd_style_dir, tmp_path_factory) -> list[Path]:
    runs = []
    for seed in (3, 4):
        out = tmp_path_factory.mktemp(f"te{seed}")
        assert main(tiny_train_args(odd_style_dir, tiny_model, out, train_text_encoder="true", text_encoder_lr=1e-2,
                                    seed=seed) + ["--no-tracking"]) == 0
        runs.append(only_run(out))
    return runs


def test_text_encoder_adapter_file_has_one_key_scheme_and_a_complete_kohya_copy(te_runs):
    tensors = load_file(te_runs[0] / "checkpoints" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in tensors) and any(k.startswith("unet.") for k in tensors)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors), sorted(tensors)[:4]
    kohya = load_file(te_runs[0] / "checkpoints" / "lora_kohya.safetensors")
    te = sorted(k for k in kohya if k.startswith("lora_te_"))
    assert te and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te)
    assert all(k.startswith(("lora_te_", "lora_unet_")) for k in kohya)  # sd-scripts' names, nothing unconverted
    for name in {k.rsplit(".", 2)[0] for k in kohya if not k.endswith(".alpha")}:
        assert float(kohya[f"{name}.alpha"]) == 8.0  # the trained alpha on text-encoder modules too


def test_text_encoder_adapter_loads_from_both_files_with_the_same_image(te_runs, tiny_model):
    folder = te_runs[0] / "checkpoints"
    base = render(fresh_pipeline(tiny_model), "a striped card", 0)
    images = []
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        pipe = fresh_pipeline(tiny_model)
        pipe.load_lora_weights(str(folder), weight_name=name)
        images.append(render(pipe, "a striped card", 0))
    assert np.abs(images[0] - base).max() > 2 and np.abs(images[0] - images[1]).max() <= 1

    # the text-encoder half alone changes the image: the encoder LoRA is really loaded
    pipe = fresh_pipeline(tiny_model)
    pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
    assert pipe.text_encoder.peft_config  # the loader put an adapter on the text encoder


def test_text_encoder_adapters_blend(te_runs, tmp_path):
    from research.experiments.blend_files import export_blend, load_adapter
    from research.experiments.blend_math import Adapter, blend_state_dict

    a, b = load_adapter(te_runs[0]), load_adapter(te_runs[1])
    assert any(m.startswith("text_encoder.") for m in a.modules)
    for t in (0.0, 0.3, 1.0):
        mixed_tensors, meta = blend_state_dict(a, b, t)
        mixed = Adapter("mix", tmp_path, mixed_tensors, meta, a.cfg)
        for m in a.modules:
            assert torch.allclose(mixed.delta(m), (1 - t) * a.delta(m) + t * b.delta(m), atol=1e-5), m
    files = export_blend(a, b, 0.5, tmp_path / "export")
    assert all(p.is_file() for p in files)


# ─── multi-process ───────────────────────────────────────────────────────────────────────────
def test_two_processes_write_one_run(tiny_model, odd_style_dir, tmp_path):
    """torchrun with two CPU processes (gloo) through the real entry point."""
    out = tmp_path / "runs"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "research.train", *tiny_train_args(odd_style_dir, tiny_model, out, max_train_steps=4,
                                                     checkpointing_steps=2)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(out)
    assert (run / "checkpoints" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "metrics.json").is_file() and len(list((run / "inference").glob("*.png"))) == 4
    assert not list((run / "checkpoints").glob(".tmp-*"))
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert "world size 2" in (run / "logs.txt").read_text()
    pipe = fresh_pipeline(tiny_model)
    pipe.load_lora_weights(str(run / "checkpoints"), weight_name="pytorch_lora_weights.safetensors")


# ─── smaller ones ─────────────────────────────────────────────────────────────────────────────
def test_each_method_defaults_to_its_recipe_learning_rate_and_a_typed_rate_wins():
    from research.arguments import add_config_arguments, config_from_args
    from research.config import RECIPE_LEARNING_RATES, TrainConfig

    import argparse

    def parsed(*argv):
        parser = argparse.ArgumentParser()
        add_config_arguments(parser)
        return config_from_args(parser.parse_args(list(argv)))

    assert parsed("--method", "dreambooth").learning_rate == RECIPE_LEARNING_RATES["dreambooth"] == 5e-6
    assert parsed("--method", "textual_inversion").learning_rate == 5e-3
    assert parsed().learning_rate == 1e-4
    assert parsed("--method", "dreambooth", "--learning-rate", "2e-6").learning_rate == 2e-6
    assert TrainConfig.from_dict({"method": "dreambooth"}).learning_rate == 5e-6



def test_a_follow_up_flag_overrides_the_run_even_when_it_equals_the_default(tmp_path, monkeypatch):
    """`evaluate --guidance-scale 7.5` on a run sampled at 5 must sample at 7.5 (7.5 is the dataclass
    default, and this once left the run's 5 in place); --num-images and a --config file override too."""
    from research import evaluate
    from research.arguments import apply_overrides
    from research.config import TrainConfig

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    run = TrainConfig.from_dict({"guidance_scale": 5.0, "num_eval_images": 256, "sampler": "ddim"})
    parser = evaluate.build_parser()

    def over(*argv):
        return apply_overrides(run, parser.parse_args(["--run-dir", "x", *argv]), evaluate.EVAL_FLAGS)

    assert (over().guidance_scale, over().num_eval_images, over().sampler) == (5.0, 256, "ddim")
    assert over("--guidance-scale", "7.5").guidance_scale == TrainConfig.guidance_scale == 7.5
    assert over("--num-images", "64").num_eval_images == TrainConfig.num_eval_images == 64
    assert over("--num-eval-images", "64").num_eval_images == 64
    (tmp_path / "eval.json").write_text(json.dumps({"guidance_scale": 7.5, "learning_rate": 1.0}))
    from_file = over("--config", str(tmp_path / "eval.json"))
    assert from_file.guidance_scale == 7.5 and from_file.learning_rate == run.learning_rate  # only eval keys
    assert over("--config", str(tmp_path / "eval.json"), "--guidance-scale", "3").guidance_scale == 3.0

def test_help_lists_flags_in_sections():
    from research.train import build_parser

    text = build_parser().format_help()
    for section in ("data:", "base model:", "method:", "optimisation:", "checkpoints:", "sampling:", "evaluation:",
                    "tracking:"):
        assert f"\n{section}\n" in text, section
    body = text[text.index("\ndata:\n"):]  # past the usage line, which names every flag too
    assert body.index("--style-dir") < body.index("\nmethod:\n") < body.index("--rank ") < body.index("\noptimisation:\n")


def test_validation_samples_in_eval_mode_and_leaves_training_as_it_was(tiny_model, monkeypatch):
    from research.config import TrainConfig
    from research.methods import Components
    from research.models import load_pipeline
    from research.training import hooks
    from research.training.hooks import ValidationHook
    from research.training.loop import StepInfo

    c = Components.from_pipeline(load_pipeline(str(tiny_model)))
    c.unet.train()
    c.text_encoder.train()
    seen = {}

    def fake_generate(c, jobs, cfg, desc, prompt_fn=lambda p: p, scheduler_config=None):
        seen.update(unet=c.unet.training, text_encoder=c.text_encoder.training)
        return [Image.new("RGB", (8, 8))] * len(jobs)

    monkeypatch.setattr(hooks, "sample_components", fake_generate)
    logged = []
    tracker = type("T", (), {"log_image": lambda self, image, name, step=None: logged.append(name)})()
    hook = ValidationHook(TrainConfig(validation_steps=2), tracker, ["a", "b"])
    hook.on_step(StepInfo(2), c)
    assert seen == {"unet": False, "text_encoder": False} and len(logged) == 2
    assert c.unet.training and c.text_encoder.training and not c.vae.training
