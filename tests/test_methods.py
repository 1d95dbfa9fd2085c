"""Textual Inversion, DreamBooth and the Experiment III comparison, on the tiny random SD model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_train_args
from research import compare as compare_cli
from research.arguments import config_from_args
from research.experiments import method_comparison as compare_module
from research.random_models import write_tiny_clip
from research.train import build_parser
from research.training.loop import train


def make_cfg(style_dir, model, out, **overrides):
    return config_from_args(build_parser().parse_args(tiny_train_args(style_dir, model, out, **overrides)))


def pipeline(model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt="<style>, a striped card"):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=g, output_type="np").images


TI = dict(method="textual_inversion", num_vectors=2, learning_rate=5e-2, adam_weight_decay=0.5, max_train_steps=3,
          lr_scheduler="constant", checkpointing_steps=0)


# ─── Textual Inversion ───────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def ti_run(tiny_model, odd_style_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ti")
    cfg = make_cfg(odd_style_dir, tiny_model, run_dir, **TI)
    return cfg, run_dir, train(cfg, run_dir)


def test_ti_trains_only_the_new_rows(ti_run, tiny_model):
    cfg, run_dir, result = ti_run
    original = pipeline(tiny_model).text_encoder.get_input_embeddings().weight.detach()
    embedding = result.components.text_encoder.get_input_embeddings()
    # strong weight decay and a large lr ran for 3 steps: every original row must still be bit-identical
    assert torch.equal(embedding.base.weight.detach(), original)
    ids = result.components.tokenizer("painting", add_special_tokens=False).input_ids
    start = original[ids].mean(0)  # "painting" is 8 characters here: the mean of its pieces
    learned = load_file(run_dir / "checkpoints" / "learned_embeds.safetensors")
    assert list(learned) == ["<style>"] and learned["<style>"].shape == (2, original.shape[1])
    for row in learned["<style>"]:
        assert not torch.allclose(row, start)  # both new rows moved away from their initial vector
    assert result.cost["trainable_params"] == 2 * original.shape[1]
    assert cfg.num_vectors == 2 and not result.method.caches_text_embeddings


def test_ti_file_loads_with_load_textual_inversion_and_changes_output(ti_run, tiny_model):
    cfg, run_dir, result = ti_run
    path = run_dir / "checkpoints" / "learned_embeds.safetensors"
    learned = load_file(path)["<style>"]
    trained = pipeline(tiny_model)
    trained.load_textual_inversion(str(path), token="<style>")
    ids = trained.tokenizer.convert_tokens_to_ids(["<style>", "<style>_1"])
    assert torch.equal(trained.text_encoder.get_input_embeddings().weight[ids].detach(), learned)
    assert result.method.caption("a striped card") == "a striped card, in the style of <style>"
    # the same tokens holding their untrained vectors render differently from the learned ones
    untrained_file = run_dir / "untrained.safetensors"
    tokens = result.components.tokenizer("painting", add_special_tokens=False).input_ids
    start = trained.text_encoder.get_input_embeddings().weight[tokens].detach().mean(0)
    save_file({"<style>": start.repeat(2, 1).contiguous()}, untrained_file)
    untrained = pipeline(tiny_model)
    untrained.load_textual_inversion(str(untrained_file), token="<style>")
    assert abs(render(trained) - render(untrained)).max() > 1e-4


def test_ti_resume_gives_identical_bits(tiny_model, odd_style_dir, tmp_path):
    cfg = dict(TI, max_train_steps=4, checkpointing_steps=2)
    straight = tmp_path / "straight"
    train(make_cfg(odd_style_dir, tiny_model, straight, **cfg), straight)

    class Killed(Exception):
        pass

    class KillAtCheckpoint:
        def on_step(self, info, components):
            pass

        def on_checkpoint(self, step, path):
            raise Killed(step)

        def on_end(self, result):
            pass

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Killed):
        train(make_cfg(odd_style_dir, tiny_model, interrupted, **cfg), interrupted, hooks=[KillAtCheckpoint()])
    assert not (interrupted / "checkpoints" / "learned_embeds.safetensors").exists()
    train(make_cfg(odd_style_dir, tiny_model, interrupted, run_dir=interrupted, resume_from_checkpoint="latest", **cfg),
          interrupted)
    expected = load_file(straight / "checkpoints" / "learned_embeds.safetensors")["<style>"]
    resumed = load_file(interrupted / "checkpoints" / "learned_embeds.safetensors")["<style>"]
    assert torch.equal(resumed, expected)


def test_ti_placeholder_that_is_already_a_token_is_one_sentence(tiny_model, odd_style_dir, tmp_path):
    from research.config import ConfigError

    with pytest.raises(ConfigError, match="already a token.*choose a new word"):
        train(make_cfg(odd_style_dir, tiny_model, tmp_path, **dict(TI, placeholder_token="a")), tmp_path)


def test_the_registry_implements_exactly_the_methods_the_config_accepts():
    """The config lists --method's values without importing the registry; the registry refuses other names."""
    from research.config import METHOD_NAMES, TrainConfig
    from research.errors import ConfigError
    from research.methods import METHODS, get_method

    assert tuple(METHODS) == METHOD_NAMES
    assert all(cls.name == name for name, cls in METHODS.items())
    cfg = TrainConfig()
    cfg.method = "hypernetwork"  # past the config's own check
    with pytest.raises(ConfigError, match="--method must be one of lora, textual_inversion, dreambooth"):
        get_method(cfg)


def test_the_metrics_compute_exactly_the_names_the_config_accepts():
    """The config checks --metrics without importing the metrics package; the two lists stay one."""
    from research.config import METRIC_NAMES
    from research.metrics import METRICS

    assert METRICS == METRIC_NAMES


# ─── DreamBooth ──────────────────────────────────────────────────────────────────────────────
DB = dict(method="dreambooth", max_train_steps=2, learning_rate=1e-3, checkpointing_steps=0, lr_scheduler="constant")


@pytest.fixture(scope="module")
def db_run(tiny_model, odd_style_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("db")
    cfg = make_cfg(odd_style_dir, tiny_model, run_dir, **DB)
    return cfg, run_dir, train(cfg, run_dir)


def test_dreambooth_changes_the_unet_and_loads_back(db_run, tiny_model):
    cfg, run_dir, result = db_run
    base = pipeline(tiny_model)
    trained_unet = result.components.unet
    assert all(p.dtype == torch.float32 for p in trained_unet.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in result.components.text_encoder.parameters())
    base_state = base.unet.state_dict()
    changed = [k for k, v in trained_unet.state_dict().items() if not torch.equal(v, base_state[k])]
    assert len(changed) > len(base_state) // 2  # the whole UNet trains, not a few layers
    assert result.cost["trainable_params"] == sum(p.numel() for p in base.unet.parameters())

    unet_dir = run_dir / "checkpoints" / "unet"
    config = json.loads((unet_dir / "config.json").read_text())
    assert config["_research_config"]["method"] == "dreambooth"
    before = render(base, "a striped card")
    result.method.load_into(base, run_dir / "checkpoints")
    loaded = base.unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained_unet.state_dict().items())
    assert abs(render(base, "a striped card") - before).max() > 1e-4
    pointer = json.loads((run_dir / "checkpoints" / "unet_location.json").read_text())
    assert Path(pointer["path"]) == unet_dir.resolve()
    assert pointer["files"]["diffusion_pytorch_model.safetensors"]["bytes"] == (
        unet_dir / "diffusion_pytorch_model.safetensors").stat().st_size


def test_dreambooth_prior_preservation_generates_and_uses_class_images(db_run, tiny_model, odd_style_dir, tmp_path):
    _, _, plain = db_run
    cfg = make_cfg(odd_style_dir, tiny_model, tmp_path, **DB, with_prior_preservation=True, num_class_images=3,
                   class_prompt="a red card", prior_loss_weight=1.0)
    prior = train(cfg, tmp_path)
    manifest = json.loads((tmp_path / "class_images" / "manifest.json").read_text())
    assert [e["prompt"] for e in manifest] == ["a red card"] * 3
    assert len(list((tmp_path / "class_images").glob("*.png"))) == 3
    # same seed, same instance draws: only the prior term can make the UNets differ
    plain_state = plain.components.unet.state_dict()
    assert any(not torch.equal(v, plain_state[k]) for k, v in prior.components.unet.state_dict().items())


# ─── Experiment III ──────────────────────────────────────────────────────────────────────────
def test_compare_trains_all_methods_on_one_budget(tiny_model, odd_style_dir, tmp_path, tracking_store, capsys):
    import mlflow
    from PIL import Image

    clip = write_tiny_clip(tmp_path / "clip", image_size=32)
    args = tiny_train_args(odd_style_dir, tiny_model, tmp_path / "runs", max_train_steps=2, checkpointing_steps=0,
                           metrics="clip_score", clip_model=clip, experiment="exp3")
    # one process: the fresh-process default costs ~15 s of imports per method on 2 cores
    assert compare_cli.main(args + ["--num-vectors", "2", "--fresh-processes", "false"]) == 0
    out = capsys.readouterr().out
    (folder,) = (tmp_path / "runs" / "exp3").glob("*_compare")
    result = json.loads((folder / "comparison.json").read_text())
    assert set(result["methods"]) == {"lora", "textual_inversion", "dreambooth"}
    for name, r in result["methods"].items():
        assert r["status"] == "finished", r
        assert r["budget"] == result["budget"] and r["budget"]["max_train_steps"] == 2
        assert r["quality"]["adapter"]["clip_score"]["n"] == 4
        assert r["cost"]["trainable_params"] > 0 and r["cost"]["artifact_bytes"] > 0 and name in out
    # the tiny toy's lr 1e-3 is 10x LoRA's SD 1.5 rate; DreamBooth keeps its ratio to it, Textual
    # Inversion its SD 1.5 rate (its vectors live at the text encoder's scale, not the UNet's)
    assert {m: r["learning_rate"] for m, r in result["methods"].items()} == pytest.approx(
        {"lora": 1e-3, "textual_inversion": 5e-3, "dreambooth": 5e-5})
    cost = {m: r["cost"] for m, r in result["methods"].items()}
    assert cost["textual_inversion"]["trainable_params"] < cost["lora"]["trainable_params"] < cost["dreambooth"]["trainable_params"]
    assert Image.open(folder / "comparison.png").size[0] > 800

    mlflow.set_tracking_uri(tracking_store)
    runs = mlflow.search_runs(experiment_names=["exp3"], output_format="list",
                              filter_string=f"tags.comparison = '{folder.name}'")
    assert sorted(r.data.tags["method"] for r in runs) == ["dreambooth", "lora", "textual_inversion"]
    client = mlflow.MlflowClient()
    db = next(r for r in runs if r.data.tags["method"] == "dreambooth")
    ckpt = {a.path for a in client.list_artifacts(db.info.run_id, "checkpoints")}
    assert ckpt == {"checkpoints/unet_location.json"}  # the UNet is stored once, in the run folder
    assert "comparison/comparison.json" in {a.path for a in client.list_artifacts(db.info.run_id, "comparison")}


def test_a_failed_method_is_reported_and_the_others_run(tiny_model, odd_style_dir, tmp_path):
    # a placeholder that is already a token makes Textual Inversion fail for real, LoRA still trains
    cfg = make_cfg(odd_style_dir, tiny_model, tmp_path, max_train_steps=2, checkpointing_steps=0,
                   placeholder_token="a", experiment="exp3")
    methods = ["textual_inversion", "lora"]
    folder = compare_module.compare(cfg, methods, compare_module.learning_rates(cfg, methods, ""), track=False,
                                    runner=compare_module.run_in_this_process)
    result = json.loads((folder / "comparison.json").read_text())
    assert result["methods"]["textual_inversion"]["status"] == "failed"
    assert "already a token" in result["methods"]["textual_inversion"]["error"]
    assert result["methods"]["lora"]["status"] == "finished"
    assert (folder / "comparison.png").is_file()
    assert "FAILED" in compare_module.format_table(result)


def test_compare_rejects_unknown_methods_in_one_line(odd_style_dir, tiny_model, tmp_path, capsys):
    assert compare_cli.main(tiny_train_args(odd_style_dir, tiny_model, tmp_path) + ["--methods", "lora,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --methods must list") and "dreambooth" in err


def test_compare_reuses_a_finished_run_of_the_same_recipe_and_trains_when_it_differs(
        tiny_model, odd_style_dir, tmp_path, tracking_store):
    """`make study` takes Experiment I's LoRA of a style as Experiment III's LoRA arm: same recipe, so the
    arm is that run (metrics, cost, a copy of its MLflow run in exp3); a different recipe is trained."""
    import mlflow

    from research.train import main as train_main

    args = tiny_train_args(odd_style_dir, tiny_model, tmp_path / "runs", max_train_steps=2, checkpointing_steps=0)
    assert train_main(args + ["--experiment", "exp1"]) == 0
    (source,) = (tmp_path / "runs" / "exp1").iterdir()
    compare_args = args + ["--experiment", "exp3", "--methods", "lora", "--fresh-processes", "false"]
    assert compare_cli.main(compare_args + ["--reuse", f"lora={source}"]) == 0
    (folder,) = (tmp_path / "runs" / "exp3").glob("*_compare")
    arm = json.loads((folder / "comparison.json").read_text())["methods"]["lora"]
    assert arm["reused"] and arm["run_dir"] == str(source)
    assert arm["cost"] == {k: json.loads((source / "metrics.json").read_text())["cost"][k]
                           for k in compare_module.COST_KEYS}
    assert not [d for d in (tmp_path / "runs" / "exp3").iterdir() if d.name.endswith("_lora")]  # nothing trained
    mlflow.set_tracking_uri(tracking_store)
    (original,) = mlflow.search_runs(experiment_names=["exp1"], output_format="list")
    (copy,) = mlflow.search_runs(experiment_names=["exp3"], output_format="list",
                                 filter_string=f"tags.comparison = '{folder.name}'")
    assert copy.data.tags["reused_run_id"] == original.info.run_id and copy.info.status == "FINISHED"
    assert copy.data.params == original.data.params and copy.data.metrics == original.data.metrics
    paths = {a.path for a in mlflow.MlflowClient().list_artifacts(copy.info.run_id)}
    assert {"metrics.json", "config.json", "inference"} <= paths

    before = set((tmp_path / "runs" / "exp3").iterdir())
    assert compare_cli.main(compare_args + ["--rank", "2", "--reuse", f"lora={source}"]) == 0  # another recipe
    # the new folder, by what appeared: one started in the same second is named <ts>_compare-1
    (newest,) = [d for d in set((tmp_path / "runs" / "exp3").iterdir()) - before if "_compare" in d.name]
    arm = json.loads((newest / "comparison.json").read_text())["methods"]["lora"]
    assert "reused" not in arm and arm["status"] == "finished" and arm["run_dir"] != str(source)


def test_reuse_names_a_compared_method_and_an_existing_folder(odd_style_dir, tiny_model, tmp_path, capsys):
    base = tiny_train_args(odd_style_dir, tiny_model, tmp_path) + ["--methods", "lora"]
    assert compare_cli.main(base + ["--reuse", f"dreambooth={tmp_path}"]) == 2
    assert "--reuse takes method=run_dir pairs" in capsys.readouterr().err
    assert compare_cli.main(base + ["--reuse", f"lora={tmp_path / 'gone'}"]) == 2
    assert "no such run folder" in capsys.readouterr().err
