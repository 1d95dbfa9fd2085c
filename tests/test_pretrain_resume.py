"""Toy world pretraining resumes: a stage stopped part-way and run again ends bit for bit where an
uninterrupted run ends; a finished stage is kept on a rerun; --only retrains; a state from other
settings is refused before anything trains."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from research.errors import ConfigError, ResumeError
from research.toyworld import SD_DIR, pretrain
from research.toyworld.oracle import Oracle
from research.toyworld.pretrain import STAGES, Recipe, train_clip, train_oracle, train_unet, train_vae
from research.toyworld.pretrain_state import StageState, done_file, state_file
from research.toyworld.tokenizer import build_tokenizer

CPU = torch.device("cpu")


def tiny_recipe(name: str = "v3") -> Recipe:
    """A real recipe at its smallest scale (8 steps, a few dozen images), with batches a test can afford."""
    recipe = pretrain.RECIPES[name].scaled(0.001)
    cycles = tuple(dataclasses.replace(c, batch=4) for c in recipe.unet_cycles)
    return dataclasses.replace(recipe, clip_batch=8, vae_batch=2, vae_crop_batch=2, unet_cycles=cycles, oracle_batch=8, judge_batch=8)


def shipped_vae():
    return AutoencoderKL.from_pretrained(SD_DIR, subfolder="vae")


TRAINERS = {  # stage -> train(recipe, state) -> the trained model; the UNet and oracle train on the shipped parts
    "clip": lambda r, s: train_clip(r, build_tokenizer(), CPU, 1, s),
    "vae": lambda r, s: train_vae(r, CPU, 1, s),
    "unet": lambda r, s: train_unet(r, shipped_vae(), CLIPTextModel.from_pretrained(SD_DIR, subfolder="text_encoder"),
                                    CLIPTokenizer.from_pretrained(SD_DIR, subfolder="tokenizer"), CPU, 1, s)[0],
    "oracle": lambda r, s: train_oracle(r, shipped_vae(), CPU, 1, s, r.oracle_steps, r.oracle_batch),
    "judge": lambda r, s: train_oracle(r, shipped_vae(), CPU, 1, s, r.judge_steps, r.judge_batch, r.judge_ink_fraction),
}  # fmt: skip


class Stopped(Exception):
    """Stands in for a kill: raised right after a save, as if the process died there."""


def stop_after_saving(monkeypatch, step: int) -> None:
    save = StageState.save

    def save_then_stop(self):
        save(self)
        if self.step == step:
            raise Stopped

    monkeypatch.setattr(StageState, "save", save_then_stop)


def record_steps(monkeypatch) -> list[int]:
    """The steps the loops run from now on (a resume that started over would give the same weights, so count)."""
    ran, steps = [], StageState.steps

    def counted(self, total, desc):
        for step, bar in steps(self, total, desc):
            ran.append(step)
            yield step, bar

    monkeypatch.setattr(StageState, "steps", counted)
    return ran


def total_steps(recipe: Recipe, stage: str) -> int:
    if stage == "unet":
        return sum(c.steps for c in recipe.unet_cycles)
    return getattr(recipe, f"{stage}_steps") + (recipe.vae_crop_steps if stage == "vae" else 0)


def same_weights(a: dict, b: dict) -> list[str]:
    """The names of the tensors that differ (a missing name counts as differing)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


# The UNet is also stopped in its second cycle (each has 8 steps at this scale): after the restart, and under
# the cpu recipe's min-SNR loss. The cpu recipe's VAE (8 steps on crops, then 8 on whole images at this
# scale) is stopped in each phase.
@pytest.mark.parametrize(("stage", "stop", "name"), [(s, 3, "v3") for s in STAGES] + [("unet", 11, "v3"), ("unet", 3, "cpu"), ("vae", 3, "cpu"), ("vae", 11, "cpu")])
def test_a_stopped_stage_resumes_bit_for_bit(stage, stop, name, tmp_path, monkeypatch):
    recipe, train = tiny_recipe(name), TRAINERS[stage]
    whole = train(recipe, StageState()).state_dict()  # uninterrupted, never saved
    path = tmp_path / f"{stage}.pt"
    with monkeypatch.context() as m:
        stop_after_saving(m, stop)
        with pytest.raises(Stopped):
            train(recipe, StageState(path, every_s=0))  # saved after every step, killed after step `stop`
    ran = record_steps(monkeypatch)
    resumed = train(recipe, StageState(path, every_s=0)).state_dict()
    assert ran == list(range(stop, total_steps(recipe, stage)))
    assert same_weights(whole, resumed) == []


def test_the_unets_last_cycle_is_a_fresh_start_from_the_cycles_before_it(monkeypatch):
    """What lets a rebuild (or the shipped UNet) run its last cycle alone from saved weights of the cycles before it."""
    recipe = tiny_recipe()
    assert len(recipe.unet_cycles) > 1
    every = TRAINERS["unet"](recipe, StageState()).state_dict()
    before = TRAINERS["unet"](dataclasses.replace(recipe, unet_cycles=recipe.unet_cycles[:-1]), StageState())
    assert same_weights(every, before.state_dict()) != []  # the last cycle trains
    monkeypatch.setattr(pretrain, "make_unet", lambda cross_attention_dim, factor: before.train())
    alone = dataclasses.replace(recipe, unet_cycles=recipe.unet_cycles[-1:])
    assert same_weights(every, TRAINERS["unet"](alone, StageState()).state_dict()) == []


@pytest.fixture
def tiny_main(monkeypatch, tmp_path):
    """pretrain.main on the tiny recipe into tmp_path, without the 600-render oracle check."""
    tiny = tiny_recipe()
    monkeypatch.setattr(Recipe, "scaled", lambda self, scale: tiny)
    monkeypatch.setattr(pretrain, "oracle_accuracy", lambda oracle: {})
    return lambda *flags: pretrain.main(["--out", str(tmp_path), "--device", "cpu", "--workers", "1", *flags])


def written(out) -> dict:
    """Each weights file and the identity of its last write (atomic saves make a new file every time)."""
    return {p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.safetensors")}


def test_a_finished_stage_is_kept_and_only_retrains_it(tiny_main, tmp_path, capsys):
    assert tiny_main() == 0
    assert all(done_file(tmp_path, s).is_file() and not state_file(tmp_path, s).exists() for s in STAGES)
    first = written(tmp_path)
    assert {"clip/model.safetensors", "sd/unet/diffusion_pytorch_model.safetensors", "oracle/model.safetensors"} <= first.keys()
    capsys.readouterr()
    assert tiny_main() == 0
    assert written(tmp_path) == first
    assert "vae: finished earlier, kept" in capsys.readouterr().out
    judge = Oracle.from_pretrained(tmp_path / "oracle")
    assert tiny_main("--only", "oracle") == 0
    again = written(tmp_path)
    changed = {name for name in first if again[name] != first[name]}
    assert changed == {"oracle/model.safetensors"}
    # The oracle stage rewrote its style trunk (bit for bit the same: the CPU repeats a run) and kept the
    # content trunk the judge stage trained.
    oracle = Oracle.from_pretrained(tmp_path / "oracle")
    assert oracle.content_width and same_weights(oracle.state_dict(), judge.state_dict()) == []
    # Retraining the UNet alone ships the VAE it loaded from --out; its config must not name that folder
    assert tiny_main("--only", "unet") == 0
    assert not [c for c in tmp_path.rglob("config.json") if "_name_or_path" in json.loads(c.read_text())]


def test_a_killed_run_resumes_where_it_stopped_unless_the_settings_changed(tiny_main, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("research.toyworld.pretrain_state.SAVE_EVERY_S", 0)
    with monkeypatch.context() as m:
        stop_after_saving(m, 5)
        with pytest.raises(Stopped):
            tiny_main()  # killed in the first stage, CLIP, after its step 5 was saved
    capsys.readouterr()
    tiny = tiny_recipe()
    monkeypatch.setattr(Recipe, "scaled", lambda self, scale: dataclasses.replace(tiny, clip_lr=tiny.clip_lr / 2))
    assert tiny_main() == 2
    assert "clip_lr 0.001 -> 0.0005" in capsys.readouterr().err
    assert not (tmp_path / "clip").exists()  # refused before anything trained
    monkeypatch.setattr(Recipe, "scaled", lambda self, scale: tiny)
    ran = record_steps(monkeypatch)
    assert tiny_main() == 0
    assert "clip: resumed at step 5" in capsys.readouterr().out
    clip_rest = list(range(5, tiny.clip_steps))
    assert ran[: len(clip_rest) + tiny.vae_steps] == clip_rest + list(range(tiny.vae_steps))  # then the VAE from step 0
    assert all(done_file(tmp_path, s).is_file() for s in STAGES)


def cpu_run(out, *flags) -> pretrain.Run:
    """What `pretrain` on the CPU would run with these flags and the tiny recipe, before anything trains."""
    args = pretrain.parse_args(["--out", str(out), "--device", "cpu", *flags])
    return pretrain.Run(args, tiny_recipe(), CPU, None, {})


def test_only_starts_a_stage_over_and_a_damaged_state_is_refused(tmp_path):
    run = functools.partial(cpu_run, tmp_path)
    state = StageState(state_file(tmp_path, "clip"), run().fingerprint)
    state.step = 5
    state.save()
    assert pretrain.plan_stages(run())["clip"] == (True, "resumed at step 5")
    only = run("--only", "clip")
    assert pretrain.plan_stages(only)["clip"] == (True, "trained from step 0 (--only)")
    assert only.state("clip").step == 0 and not state_file(tmp_path, "clip").exists()
    with pytest.raises(ConfigError, match="--only oracle,judge"):
        pretrain.plan_stages(run("--only", "judge"))  # nothing in --out to join the content trunk to
    state_file(tmp_path, "unet").write_bytes(b"not a state")
    with pytest.raises(ResumeError, match="--only unet"):
        pretrain.plan_stages(run())


@pytest.mark.parametrize("factor", [2, 4])
def test_each_recipes_models_fit_its_latent(factor):
    """v2 (factor 4) codes 64 px as 16×16×4, v3 (factor 2) as 32×32×4, and each recipe's UNet denoises its latent."""
    vae, unet = pretrain.make_vae(factor).eval(), pretrain.make_unet(32, factor).eval()
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
        assert latent.shape == (1, 4, 64 // factor, 64 // factor)
        assert unet(latent, 999, torch.zeros(1, 5, 32)).sample.shape == latent.shape
    assert unet.config.sample_size == 64 // factor
    assert {name: recipe.latent_factor for name, recipe in pretrain.RECIPES.items()} == {"v2": 4, "v3": 2, "cpu": 2}


def test_the_shipped_weights_are_the_default_recipes_architecture():
    """The default recipe's models load the shipped weights tensor for tensor (a rebuild makes what ships)."""
    factor = pretrain.RECIPES[pretrain.build_parser().get_default("recipe")].latent_factor
    pretrain.make_vae(factor).load_state_dict(shipped_vae().state_dict(), strict=True)
    shipped = UNet2DConditionModel.from_pretrained(SD_DIR, subfolder="unet")
    pretrain.make_unet(shipped.config.cross_attention_dim, factor).load_state_dict(shipped.state_dict(), strict=True)


def test_a_recipe_refuses_a_latent_factor_no_model_is_built_for():
    with pytest.raises(ConfigError, match="latent_factor must be 2"):
        Recipe(latent_factor=8)
    with pytest.raises(ConfigError, match=r"vae_crop_size must be a multiple of latent_factor \(2\)"):
        Recipe(vae_crop_size=31)


def test_the_cpu_recipes_vae_sees_crops_first_then_whole_images(monkeypatch):
    recipe = tiny_recipe("cpu")
    assert (recipe.vae_crop_steps, recipe.vae_steps, recipe.vae_crop_size) == (8, 8, 32)
    sizes = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x: sizes.append(tuple(x.shape)) or encode(self, x))
    train_vae(recipe, CPU, 1, StageState())
    # then the scaling factor is measured on whole images, in batches of 256
    assert sizes[:16] == [(2, 3, 32, 32)] * 8 + [(2, 3, 64, 64)] * 8 and {s[2:] for s in sizes[16:]} == {(64, 64)}


def test_random_crops_are_windows_of_the_images_anywhere_in_them():
    n, height, width, size = 3, 10, 12, 4
    pixels = torch.arange(n * height * width).view(n, height, width, 1)  # each pixel holds its own index
    crops = pretrain.random_crops(pixels, 400, size, torch.Generator().manual_seed(0))
    assert crops.shape == (400, size, size, 1)
    corners = set()
    for crop in crops:
        i, rest = divmod(int(crop[0, 0, 0]), height * width)
        top, left = divmod(rest, width)
        assert torch.equal(crop, pixels[i, top : top + size, left : left + size])
        corners.add((i, top, left))
    images, tops, lefts = (set(c) for c in zip(*corners))  # every image, and every place a window fits, drawn
    assert (images, tops, lefts) == (set(range(n)), set(range(height - size + 1)), set(range(width - size + 1)))


def test_a_stages_seconds_add_up_across_the_runs_it_took(tmp_path, monkeypatch):
    # the clock's readings in turn: a run starts, resumes nothing, saves after 30 s; a second run starts
    # later, resumes that save and has run 20 s when asked
    clock = iter([100.0, 100.0, 130.0, 130.0, 500.0, 500.0, 520.0]).__next__
    monkeypatch.setattr("research.toyworld.pretrain_state.time.monotonic", clock)
    first = StageState(tmp_path / "vae.pt")
    first.resume()
    first.save()
    again = StageState(tmp_path / "vae.pt")
    again.resume()
    assert again.seconds == 50.0


def test_bf16_runs_where_it_pays_and_a_saved_state_remembers_it(tmp_path, monkeypatch):
    """GPU: the VAE and UNet under bf16 autocast. A CPU with native bf16: the VAE and the oracle's trunks,
    not the UNet or CLIP (slower there). A CPU without: nothing. A state saved under one is not
    continued under the other."""
    assert pretrain.bf16_stages(torch.device("cuda")) == ("vae", "unet")
    x, conv = torch.randn(1, 3, 8, 8), torch.nn.Conv2d(3, 4, 3)

    def precision(stage):
        with pretrain.autocast(CPU, stage):
            return conv(x).dtype

    monkeypatch.setattr(pretrain, "cpu_has_bf16", lambda: True)
    assert {s: precision(s) for s in STAGES} == {"clip": torch.float32, "vae": torch.bfloat16, "unet": torch.float32,
                                                 "oracle": torch.bfloat16, "judge": torch.bfloat16}  # fmt: skip
    state = StageState(state_file(tmp_path, "vae"), cpu_run(tmp_path).fingerprint)
    state.step = 3
    state.save()
    monkeypatch.setattr(pretrain, "cpu_has_bf16", lambda: False)
    assert {precision(s) for s in STAGES} == {torch.float32}
    with pytest.raises(ResumeError, match=r"bf16 \['vae', 'oracle', 'judge'\] -> \[\]"):
        pretrain.plan_stages(cpu_run(tmp_path))


def test_min_snr_weighting_discounts_only_the_low_noise_timesteps():
    """Recipe.unet_snr_gamma: each example's MSE counts min(SNR, γ) / SNR; 0 keeps v3's plain MSE."""
    scheduler = pretrain.make_scheduler()
    t = torch.tensor([0, 500, 999])  # SNR ~1175, ~0.38, ~0.005 under SD's schedule
    noise = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1).expand(3, 4, 2, 2)
    pred = torch.zeros_like(noise)  # so each example's MSE is 1, 4, 9
    alpha = scheduler.alphas_cumprod[t]
    snr = alpha / (1 - alpha)
    assert snr[0] > 5 > snr[1] > snr[2]
    assert pretrain.unet_loss(pred, noise, t, scheduler, 0.0) == F.mse_loss(pred, noise)
    expected = (1 * 5 / snr[0] + 4 + 9) / 3
    assert torch.allclose(pretrain.unet_loss(pred, noise, t, scheduler, 5.0), expected)
