"""Experiment IV on the tiny random model: delta interpolation, the exported blend, the blend run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import load_report
from research import blend
from research.experiments import blend_files, blend_math
from research.atomic import write_json
from research.config import TrainConfig
from research.random_models import write_tiny_clip



def one_line_error(stderr: str, fragment: str) -> bool:
    last = stderr.strip().splitlines()[-1]
    return last.startswith("error: ") and fragment in last and "Traceback" not in stderr


def make_lora_run(folder: Path, model: Path, style_dir: Path, *, rank: int, alpha: float, seed: int,
                  targets: str = "to_q,to_k,to_v,to_out.0") -> Path:
    """A LoRA run folder as research.train leaves it, with random (non-zero) up and down weights.

    Saved by the real LoRA method, so keys and rank/alpha metadata are what training writes."""
    from research.methods import Components, config_metadata
    from research.methods.lora import LoRA
    from research.models import load_pipeline

    cfg = TrainConfig(style_dir=str(style_dir), base_model=str(model), rank=rank, lora_alpha=alpha, seed=3,
                      unet_target_modules=targets, resolution=32, num_inference_steps=2, num_eval_images=2,
                      sample_batch_size=2, metrics="none", device="cpu", run_name=folder.name)
    c = Components.from_pipeline(load_pipeline(str(model)))
    method = LoRA(cfg)
    method.setup(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in c.unet.named_parameters():
            if "lora_" in name:  # gaussian init leaves B = 0; a visible delta needs both non-zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    method.save(c, folder / "checkpoints", config_metadata(cfg))
    write_json(folder / "config.json", cfg.to_dict())
    return folder


CONV = "to_q,to_k,to_v,to_out.0,conv1,conv2"


@pytest.fixture(scope="module")
def second_style_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("style_b") / "dotty"
    d.mkdir()
    for i in range(10):  # 2 held out (the default 20%): enough references for style similarity
        rng = np.random.default_rng(100 + i)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"d{i}.png")
    return d


@pytest.fixture(scope="module")
def runs(tiny_model, odd_style_dir, second_style_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_runs")
    return {"a": make_lora_run(root / "inky", tiny_model, odd_style_dir, rank=4, alpha=8, seed=1),
            "b": make_lora_run(root / "dotty", tiny_model, second_style_dir, rank=2, alpha=1, seed=2),
            "q_only": make_lora_run(root / "qonly", tiny_model, odd_style_dir, rank=4, alpha=4, seed=3,
                                    targets="to_q,to_v"),
            # the toy config also adapts the ResNet convs: 4-D kernels go through the same concatenation
            "conv_a": make_lora_run(root / "conv_a", tiny_model, odd_style_dir, rank=4, alpha=8, seed=4, targets=CONV),
            "conv_b": make_lora_run(root / "conv_b", tiny_model, second_style_dir, rank=2, alpha=1, seed=5,
                                    targets=CONV)}


def _render(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe("a striped card", num_inference_steps=2, height=32, width=32, generator=g, output_type="np").images


def _pipe(model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_blended_delta_is_the_interpolation_of_the_deltas(runs):
    a, b = blend_files.load_adapter(runs["a"]), blend_files.load_adapter(runs["b"] / "checkpoints")  # run or checkpoint folder
    assert a.scale("unet") == 2.0 and b.scale("unet") == 0.5
    t = 0.3
    tensors, meta = blend_math.blend_state_dict(a, b, t)
    assert meta["unet.r"] == 6 and meta["unet.lora_alpha"] == 6.0
    mixed = blend_math.Adapter("mix", Path("."), tensors, meta, a.cfg)
    for m in a.modules:
        expected = (1 - t) * a.delta(m) + t * b.delta(m)
        assert torch.allclose(mixed.delta(m), expected, atol=1e-5), m


def test_exported_blend_equals_set_adapters_and_the_ends_are_a_and_b(runs, tiny_model, tmp_path):
    a, b = blend_files.load_adapter(runs["a"]), blend_files.load_adapter(runs["b"])
    t = 0.3
    blend_files.export_blend(a, b, t, tmp_path / "mix")
    pipe = _pipe(tiny_model)
    base = _render(pipe)
    pipe.load_lora_weights(str(runs["a"] / "checkpoints"), weight_name=blend_files.WEIGHT_NAME, adapter_name="a")
    only_a = _render(pipe)
    pipe.set_adapters(["a"], adapter_weights=[0.0])
    pipe.load_lora_weights(str(runs["b"] / "checkpoints"), weight_name=blend_files.WEIGHT_NAME, adapter_name="b")
    pipe.set_adapters(["b"], adapter_weights=[1.0])
    only_b = _render(pipe)
    assert np.abs(only_a - base).max() > 1e-3 and np.abs(only_b - base).max() > 1e-3  # both really act
    pipe.set_adapters(["a", "b"], adapter_weights=[1 - t, t])
    mixed = _render(pipe)
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.0])
    assert np.allclose(_render(pipe), only_a, atol=1e-6)  # t = 0 is adapter A
    pipe.set_adapters(["a", "b"], adapter_weights=[0.0, 1.0])
    assert np.allclose(_render(pipe), only_b, atol=1e-6)  # t = 1 is adapter B

    # the exported file, loaded plainly into a fresh pipeline, gives the set_adapters images
    fresh = _pipe(tiny_model)
    fresh.load_lora_weights(str(tmp_path / "mix"), weight_name=blend_files.WEIGHT_NAME)
    exported = _render(fresh)
    # equal up to float summation order (one rank-6 product vs two products), far below the blend's effect
    assert np.abs(exported - mixed).max() < 1e-3
    assert np.abs(mixed - only_a).max() > 2e-2 and np.abs(mixed - only_b).max() > 2e-2

    kohya = load_file(tmp_path / "mix" / blend_files.KOHYA_NAME)
    alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas == {6.0}  # alpha = rank: the kohya loaders' scale is 1 too


def test_exported_conv_blend_equals_set_adapters(runs, tiny_model, tmp_path):
    a, b = blend_files.load_adapter(runs["conv_a"]), blend_files.load_adapter(runs["conv_b"])
    assert any(a.tensors[m + blend_math.DOWN].dim() == 4 for m in a.modules)  # conv kernels are really adapted
    blend_files.export_blend(a, b, 0.6, tmp_path / "mix")
    pipe = _pipe(tiny_model)
    base = _render(pipe)
    for name in ("conv_a", "conv_b"):
        pipe.load_lora_weights(str(runs[name] / "checkpoints"), weight_name=blend_files.WEIGHT_NAME, adapter_name=name)
    pipe.set_adapters(["conv_a", "conv_b"], adapter_weights=[0.4, 0.6])
    mixed = _render(pipe)
    fresh = _pipe(tiny_model)
    fresh.load_lora_weights(str(tmp_path / "mix"), weight_name=blend_files.WEIGHT_NAME)
    assert np.abs(mixed - base).max() > 2e-2
    assert np.abs(_render(fresh) - mixed).max() < 1e-3


def test_mismatched_targets_are_one_sentence(runs, capsys):
    a, q = blend_files.load_adapter(runs["a"]), blend_files.load_adapter(runs["q_only"])
    with pytest.raises(blend_math.BlendError, match="target different modules"):
        blend_math.blend_state_dict(a, q, 0.5)
    assert blend.main(["--adapter-a", str(runs["a"]), "--adapter-b", str(runs["q_only"]), "--export-weight", "0.5",
                       "--weights", "none", "--no-tracking"]) == 2
    assert one_line_error(capsys.readouterr().err, "--unet-target-modules")
    assert blend.main(["--adapter-a", str(runs["a"]), "--adapter-b", "/nonexistent", "--no-tracking"]) == 2
    assert one_line_error(capsys.readouterr().err, "pass the folder of a finished LoRA run")
    for weight in ("nan", "inf", "half"):  # a NaN weight once wrote an adapter with NaN in half its tensors
        assert blend.main(["--adapter-a", str(runs["a"]), "--adapter-b", str(runs["b"]), "--export-weight", weight,
                           "--weights", "none", "--no-tracking"]) == 2
        assert one_line_error(capsys.readouterr().err, "--export-weight must be a finite number")


@pytest.fixture(scope="module")
def blend_run(runs, tmp_path_factory):
    """The real CLI: three weights, an export, metrics with a tiny CLIP and a random oracle, tracked."""
    from research.toyworld.oracle import Oracle

    out = tmp_path_factory.mktemp("blend")
    clip = write_tiny_clip(out / "clip", image_size=32)
    torch.manual_seed(0)
    labels = {"style": ["inky", "dotty", "plain"], "shape": ["circle"], "colour": ["red"], "background": ["sky"]}
    Oracle(labels, width=8).save_pretrained(out / "oracle")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
        code = blend.main(["--adapter-a", str(runs["a"]), "--adapter-b", str(runs["b"]), "--weights", "0,0.5,1",
                           "--export-weight", "0.5", "--output-dir", str(out / "runs"),
                           "--metrics", "style_similarity,clip_score,oracle_style_accuracy",
                           "--clip-model", str(clip), "--oracle", str(out / "oracle")])
    assert code == 0
    (run_dir,) = (out / "runs" / "exp4").iterdir()
    return out, run_dir


def test_blend_run_writes_images_grids_metrics_and_adapter(blend_run):
    _, run_dir = blend_run
    assert run_dir.name.endswith("inky_x_dotty")
    for t in ("t_0.00", "t_0.50", "t_1.00"):
        assert len(list((run_dir / t).glob("*.png"))) == 2
    # same prompts and seeds for every t
    manifests = {t: json.loads((run_dir / t / "manifest.json").read_text()) for t in ("t_0.00", "t_1.00")}
    assert manifests["t_0.00"] == manifests["t_1.00"]
    thumbs = {p.name for p in (run_dir / "thumbnails").glob("*.png")}
    assert "grid.png" in thumbs and any(n.endswith("_blend.png") for n in thumbs)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["weights"] == [0.0, 0.5, 1.0] and metrics["n_images"] == 2
    for t in ("t_0.00", "t_0.50", "t_1.00"):
        assert {"clip_score", "style_similarity_a", "style_similarity_b", "oracle_style_accuracy_a",
                "oracle_style_prob_a", "oracle_style_prob_b"} <= set(metrics[t]), metrics[t].keys()
        assert 0 <= metrics[t]["oracle_style_prob_a"]["mean"] <= 1
    assert (run_dir / "checkpoints" / blend_files.WEIGHT_NAME).is_file() and (run_dir / "checkpoints" / blend_files.KOHYA_NAME).is_file()


def test_blend_run_is_one_mlflow_run_in_exp4(blend_run):
    import mlflow

    out, run_dir = blend_run
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["exp4"], output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.params["weights"] == "0,0.5,1" and run.data.params["export_weight"] == "0.5"
    assert "t_0.50.style_similarity_a" in run.data.metrics and "style_similarity_b" in run.data.metrics
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "style_similarity_a")) == 3  # one step per t
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "thumbnails", "checkpoints", "t_0.50"} <= top


def test_blend_figure_draws_from_mlflow(blend_run, tmp_path, monkeypatch):
    import mlflow

    out, _ = blend_run
    report = load_report("blend_figure")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    png = tmp_path / "blend.png"
    assert report.main(["--out", str(png)]) == 0
    assert Image.open(png).size[0] > 400
    (run,) = mlflow.search_runs(experiment_names=["exp4"], output_format="list")
    assert "reports/blend.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "reports")}
    assert report.main(["--experiment", "no-such-experiment"]) == 2
