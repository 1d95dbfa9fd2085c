"""`python -m research.bench` on the tiny model: every field is produced and published; no time is asserted.
And the training loop's random draws: made on the device, seeded per process, the same on a redraw."""

from __future__ import annotations

import json

import pytest
import torch

from research.config import TOY_CONFIG
from research.training.draws import Draws, mix_seeds

PARTS = ["limit", "train", "sampling", "evaluation", "growth"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One small bench: a recipe like the toy one with 2 sampling steps and two cheap metrics."""
    import mlflow

    from research.bench import main

    tmp = tmp_path_factory.mktemp("bench")
    recipe = dict(json.loads(TOY_CONFIG.read_text()), num_inference_steps=2, sample_batch_size=2,
                  metrics="clip_score,kid", oracle="", train_batch_size=4)
    (tmp / "recipe.json").write_text(json.dumps(recipe))
    out = tmp / "out"
    code = main(["--model", "tiny", "--config", str(tmp / "recipe.json"), "--resolution", "32", "--dataset-size", "8",
                 "--steps", "3", "--rounds", "2", "--memory-repeats", "1", "--sample-images", "2",
                 "--eval-images", "4", "--eval-repeats", "1", "--growth-steps", "3", "--growth-dataset-sizes", "8",
                 "--growth-resolutions", "32", "--growth-ranks", "2", "--device", "cpu", "--threads", "1",
                 "--out-dir", str(out)])
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    return code, out, json.loads((out / "results.json").read_text()), runs


def _is_summary(s: dict, n: int) -> bool:
    if n == 1:  # one value has no spread to measure: no interval, said so
        return s["n"] == 1 and s.get("unreliable") is True
    return s["n"] == n and s["ci95"][0] <= s["mean"] <= s["ci95"][1]


def test_bench_reports_every_field(bench_run):
    code, out, report, _ = bench_run
    assert code == 0
    assert set(PARTS) <= set(report)
    assert report["machine"]["threads"] == 1 and len(report["machine"]["load_average"]) == 3
    for arm in ["ours", "reference"]:
        train = report["train"][arm]
        for key in ["samples_per_second", "time_to_first_step_s", "mfu", "useful_mfu"]:
            assert _is_summary(train[key], 2) and train[key]["mean"] > 0, (arm, key)
        assert _is_summary(train["peak_memory_mb"], 1)
        assert train["peak_memory_mb"]["mean"] >= train["peak_memory_mb"]["process_start_mb"] > 0
    assert _is_summary(report["train"]["speedup"], 2)
    assert _is_summary(report["limit"]["matmul_flops_per_second"], 10)
    assert _is_summary(report["sampling"], 1) and _is_summary(report["evaluation"], 1)
    assert report["evaluation"]["metrics"] == ["clip_score", "kid"]
    assert set(report["growth"]) == {"dataset_size", "resolution", "rank"}
    assert set(report["growth"]["dataset_size"]) == {"8"}
    for points in report["growth"].values():
        for arms in points.values():
            assert _is_summary(arms["ours"]["seconds_per_step"], 2) and _is_summary(arms["reference"]["seconds_per_step"], 2)


def test_the_reference_counts_the_encoders_it_runs_every_step(bench_run):
    """FlopCounterMode sees the reference's per-step VAE and text encoder on top of the same UNet step."""
    train = bench_run[2]["train"]
    assert train["reference"]["flops_per_sample"] > train["ours"]["flops_per_sample"] > 0
    # the same useful work, judged at each loop's speed
    ours_ratio = train["ours"]["useful_mfu"]["mean"] / train["ours"]["samples_per_second"]["mean"]
    ref_ratio = train["reference"]["useful_mfu"]["mean"] / train["reference"]["samples_per_second"]["mean"]
    assert ours_ratio == pytest.approx(ref_ratio)


def test_bench_writes_tables_figure_and_one_mlflow_run(bench_run):
    _, out, report, runs = bench_run
    text = (out / "results.md").read_text()
    assert "GPU: not measured this time" in text and "| dataset_size | 8 |" in text
    assert (out / "growth.png").stat().st_size > 0
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["train.speedup"] == pytest.approx(report["train"]["speedup"]["mean"])
    assert metrics["train.ours.samples_per_second.ci95_lo"] <= metrics["train.ours.samples_per_second"]
    assert "growth.resolution.32.reference.seconds_per_step" in metrics


def test_bench_refuses_bad_flags_with_one_line(capsys):
    from research.bench import main

    assert main(["--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--steps" in err


# ─── the training loop's draws (research.train.Draws) ───────────────────────────────────────
SHAPE = (4, 4, 8, 8)


def _noise(draws: Draws, micro_step: int) -> torch.Tensor:
    return draws.noise(SHAPE, draws.generator(Draws.DATA, micro_step))


def test_process_zero_draws_what_a_single_process_always_drew():
    draws = Draws(seed=3, process_index=0, device=torch.device("cpu"))
    expected = torch.randn(SHAPE, generator=torch.Generator().manual_seed(mix_seeds(3, 5, Draws.DATA)))
    assert torch.equal(_noise(draws, 5), expected)


def test_other_processes_draw_their_own_noise_and_redraw_it_exactly():
    cpu = torch.device("cpu")
    rank0, rank1 = Draws(3, 0, cpu), Draws(3, 1, cpu)
    assert not torch.allclose(_noise(rank0, 5), _noise(rank1, 5))
    assert torch.equal(_noise(rank1, 5), _noise(Draws(3, 1, cpu), 5))  # a resumed process redraws step 5 exactly
    assert not torch.allclose(_noise(rank1, 5), _noise(rank1, 6))
    t0 = rank0.integers(1000, 64, rank0.generator(Draws.DATA, 5))
    t1 = rank1.integers(1000, 64, rank1.generator(Draws.DATA, 5))
    assert not torch.equal(t0, t1)
