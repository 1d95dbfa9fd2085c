"""Metrics against independent references (closed forms, hand-made embeddings, the libraries' own paths)."""
from __future__ import annotations

import urllib.error
from collections import namedtuple

import numpy as np
import pytest
import torch
from cleanfid.fid import frechet_distance, kernel_distance

from research.benchmarking.evaluation_speed import synthetic_images
from research.random_models import write_tiny_clip
from research.metrics import METRICS, compute_metrics
from research.metrics.alignment import clip_score, style_similarity
from research.metrics.backbones import MissingWeightsError, load_clip, load_inception, load_lpips
from research.metrics.distribution import (_fid_by_svd, fid, fid_statistic, inception_score,
                                           inception_score_statistic, kid, kid_statistic)
from research.metrics.diversity import lpips_distance, lpips_diversity
from research.metrics.oracle import oracle_content_accuracy, oracle_style_accuracy
from research.metrics.stats import Design, interval, mean_statistic, replicate, summarize

Scene = namedtuple("Scene", "shape colour background")
ORACLE_CLASSES = {"style": ["pastel", "vivid", "comic"], "shape": ["cube", "ball"], "colour": ["red", "blue"],
                  "background": ["grass", "sky"]}


def gaussian_with_exact_moments(rng, n, mean, var):
    """Rows whose sample mean and (ddof=1) covariance are exactly `mean` and diag(var)."""
    z = rng.standard_normal((n, len(mean)))
    q, _ = np.linalg.qr(z - z.mean(0))  # orthonormal columns, each orthogonal to the all-ones vector
    return q * np.sqrt(n - 1) * np.sqrt(var) + mean


# ----------------------------------------------------------------------------- FID

def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((300, 8))
    assert abs(fid(x, x)) < 1e-6


def test_fid_equals_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    v1, v2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    a, b = gaussian_with_exact_moments(rng, 400, mu1, v1), gaussian_with_exact_moments(rng, 300, mu2, v2)
    closed = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert fid(a, b) == pytest.approx(closed, rel=1e-6)


def test_fid_of_small_sets_matches_clean_fid_on_full_covariances():
    # fewer images than dimensions: our reduced basis must give what clean-fid gives on the full 64-d covariances
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((40, 64)), rng.standard_normal((40, 64)) + 0.3
    full = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid(a, b) == pytest.approx(full, rel=1e-4)
    assert _fid_by_svd(a, b) == pytest.approx(full, rel=1e-4)  # the jackknife's shortcut
    statistic = fid_statistic(a, b)
    assert statistic(np.arange(40), np.arange(40)) == pytest.approx(full, rel=1e-4)
    assert statistic(np.arange(30), np.arange(5, 40)) == pytest.approx(fid(a[:30], b[5:]), rel=1e-4)


# ----------------------------------------------------------------------------- KID

def unbiased_mmd2_cubic(x, y):
    """Independent reference: unbiased MMD² with k(x, y) = (x·y/d + 1)³ on the full sets."""
    d, n, m = x.shape[1], len(x), len(y)
    k = lambda p, q: (p @ q.T / d + 1) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


def test_kid_matches_unbiased_mmd_and_clean_fid():
    rng = np.random.default_rng(3)
    a, shifted = rng.standard_normal((150, 16)), rng.standard_normal((120, 16)) + 1.0
    assert kid(a, shifted) == pytest.approx(unbiased_mmd2_cubic(a, shifted), rel=1e-9)
    # equal sizes: clean-fid's subsets are the whole sets, so its KID is the same number
    b = shifted[:100]
    assert kid(a[:100], b) == pytest.approx(kernel_distance(a[:100], b, num_subsets=1, max_subset_size=100), rel=1e-9)
    keep_a, keep_b = np.arange(0, 150, 2), np.arange(10, 120)
    assert kid_statistic(a, shifted)(keep_a, keep_b) == pytest.approx(kid(a[keep_a], shifted[keep_b]), rel=1e-9)


def test_kid_separates_shifted_sets_and_works_on_five_images():
    rng = np.random.default_rng(4)
    a, b, shifted = rng.standard_normal((64, 8)), rng.standard_normal((64, 8)), rng.standard_normal((64, 8)) + 1.0
    design = Design.of(np.repeat(np.arange(16), 4), np.tile(np.arange(4), 16), 64)
    same = interval(replicate(kid_statistic(a, b), design, uses_references=True))
    apart = interval(replicate(kid_statistic(a, shifted), design, uses_references=True))
    assert apart["ci95"][0] > 0 and same["ci95"][0] <= 0 <= same["ci95"][1]
    tiny = interval(replicate(kid_statistic(a[:5], b[:7]), Design.of(range(5), None, 7), uses_references=True))
    assert tiny["n"] == 5 and tiny["n_reference"] == 7 and tiny["ci95"][0] <= tiny["mean"] <= tiny["ci95"][1]


# ----------------------------------------------------------------------------- IS

def test_inception_score_closed_forms():
    k = 4
    confident_and_spread = np.eye(k)[np.arange(200) % k]  # each image certain, classes uniform: IS = k
    assert inception_score(confident_and_spread, splits=1)[0] == pytest.approx(k, rel=1e-6)
    assert inception_score(np.tile(np.eye(k)[0], (50, 1)), splits=1)[0] == pytest.approx(1.0, abs=1e-6)
    assert inception_score(np.full((50, k), 1 / k), splits=1)[0] == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- CLIP score, style similarity

def test_clip_score_on_hand_made_embeddings():
    images = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    texts = np.array([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(clip_score(images, texts), [100.0, 0.0, 0.0, 100 / np.sqrt(2), 100.0], atol=1e-9)


def test_style_similarity_is_mean_cosine_to_references():
    refs = np.array([[1.0, 0.0], [0.0, 5.0]])
    np.testing.assert_allclose(style_similarity(np.array([[2.0, 0.0], [1.0, 1.0]]), refs),
                               [0.5, 1 / np.sqrt(2)], atol=1e-9)


# ----------------------------------------------------------------------------- LPIPS

@pytest.fixture(scope="module")
def random_lpips():
    model, label = load_lpips("random", seed=0)
    assert label.startswith("alex-random")
    return model


def test_lpips_of_an_image_with_itself_is_zero(random_lpips):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    np.testing.assert_allclose(lpips_distance(random_lpips, x, x), 0.0, atol=1e-7)


def test_lpips_rescales_inputs_to_minus_one_one(random_lpips):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)  # in [0, 1]
    with torch.no_grad():
        reference = random_lpips(x, y, normalize=True).flatten().numpy()  # lpips' own [0,1] → [-1,1] path
        wrong = random_lpips(x, y).flatten().numpy()  # the seed's bug: [0, 1] fed as if [-1, 1]
    ours = lpips_distance(random_lpips, x, y, value_range=(0, 1))
    np.testing.assert_allclose(ours, reference, rtol=1e-5)
    np.testing.assert_allclose(lpips_distance(random_lpips, x * 255, y * 255, value_range=(0, 255)), reference, rtol=1e-4)
    assert not np.allclose(ours, wrong, rtol=1e-2)
    with pytest.raises(ValueError, match="outside"):
        lpips_distance(random_lpips, x * 255, y * 255, value_range=(0, 1))


def test_lpips_diversity_is_zero_for_repeated_images(random_lpips):
    same = torch.rand(3, 3, 64, 64) * 2 - 1
    different = torch.rand(3, 3, 64, 64) * 2 - 1
    values = lpips_diversity({"a": same[:1].repeat(3, 1, 1, 1), "b": different, "single": same[:1]}, random_lpips)
    assert values.shape == (2,) and values[0] == pytest.approx(0, abs=1e-7) and values[1] > 0.01


def test_lpips_loads_a_local_alexnet_trunk(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import alexnet

    torch.manual_seed(5)
    state = alexnet(weights=None).state_dict()
    save_file(state, str(tmp_path / "alexnet.safetensors"))
    model, label = load_lpips(str(tmp_path / "alexnet.safetensors"))
    assert torch.equal(model.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").bias, state["features.10.bias"]) and "alexnet.safetensors" in label


# ----------------------------------------------------------------------------- intervals (stats.py)

PROMPTS, SEEDS = np.repeat(np.arange(16), 4), np.tile(np.arange(4), 16)  # the toy evaluation: 16 prompts × 4 seeds


def test_mean_interval_without_clusters_is_the_t_interval():
    from scipy import stats as st

    x = np.random.default_rng(5).exponential(1.0, size=30)
    got = summarize(x)
    half = st.t.ppf(0.975, 29) * x.std(ddof=1) / np.sqrt(30)
    np.testing.assert_allclose(got["ci95"], [x.mean() - half, x.mean() + half], rtol=1e-9)
    assert got["n"] == 30 and got["interval"] == "jackknife:prompt"


def crossed_arms(rng, d: int = 1):
    """Both arms share prompt and seed effects (same prompts, same starting noise); the adapter is shifted."""
    u, v = rng.standard_normal((16, d)) * 0.5, rng.standard_normal((4, d)) * 0.3
    base = u[PROMPTS] + v[SEEDS]
    shift = np.r_[0.4, 0.2, np.zeros(d - 2)] if d > 2 else 0.4
    adapter = base + 0.8 * rng.standard_normal((64, d)) + shift
    baseline = base + 0.8 * rng.standard_normal((64, d))
    return adapter, baseline, rng.standard_normal((48, d)) + 0.5


def coverage(make_statistic, uses_references: bool, reps: int, seed: int, truth: float | None = None,
             truth_reps: int = 2000, d: int = 1) -> float:
    """Share of paired-difference intervals (adapter − baseline) that cover the true difference.

    truth None: the true difference of the statistic at this set size, by Monte Carlo over the same
    data-generating process (FID and IS are biased at small n; their estimand is the value at this n).
    """
    rng = np.random.default_rng(seed)
    full = np.arange(64), np.arange(48)
    if truth is None:
        draws = [crossed_arms(rng, d) for _ in range(truth_reps)]
        truth = np.mean([make_statistic(a, r)(*full) - make_statistic(b, r)(*full) for a, b, r in draws])
    design = Design.of(PROMPTS, SEEDS, 48)
    hits = 0
    for _ in range(reps):
        a, b, r = crossed_arms(rng, d)
        diff = replicate(make_statistic(a, r), design, uses_references) - replicate(make_statistic(b, r), design, uses_references)
        lo, hi = interval(diff)["ci95"]
        hits += lo <= truth <= hi
    return hits / reps


def test_paired_mean_difference_covers_the_truth_at_about_the_nominal_rate():
    rate = coverage(lambda x, r: mean_statistic(x[:, 0]), False, reps=400, seed=6, truth=0.4)
    assert 0.91 <= rate <= 0.985


@pytest.mark.parametrize("name, make", [("fid", fid_statistic), ("kid", kid_statistic)])
def test_paired_set_metric_difference_covers_the_truth_at_about_the_nominal_rate(name, make):
    # no exemptions: FID's small-set bias is part of its estimand, so its interval must cover too
    rate = coverage(make, True, reps=150, seed=7, truth_reps=600, d=4)
    assert 0.89 <= rate <= 0.995, name


def test_paired_inception_score_difference_covers_the_truth():
    def probs(x, r):  # a 5-class softmax of the features: IS of a made-up classifier
        logits = np.concatenate([x, -x, 0 * x[:, :1]], axis=1) * 2
        p = np.exp(logits - logits.max(1, keepdims=True))
        return inception_score_statistic(p / p.sum(1, keepdims=True))
    rate = coverage(probs, False, reps=150, seed=8, truth_reps=600, d=2)
    assert 0.89 <= rate <= 0.995


def test_every_interval_contains_its_estimate_even_when_the_metric_is_biased():
    rng = np.random.default_rng(9)
    design = Design.of(PROMPTS, SEEDS, 48)
    for _ in range(20):
        a, b, r = crossed_arms(rng, d=4)
        for make in (fid_statistic, kid_statistic):
            for rep in (replicate(make(a, r), design, True), replicate(make(a, r), design, True) - replicate(make(b, r), design, True)):
                got = interval(rep, bounds=(0.0, np.inf) if make is fid_statistic and rep.full >= 0 else (-np.inf, np.inf))
                assert got["ci95"][0] <= got["mean"] <= got["ci95"][1]


def test_an_interval_without_spread_to_measure_is_marked():
    got = summarize([0.5])
    assert np.isnan(got["ci95"]).all() and got["unreliable"] is True


# ----------------------------------------------------------------------------- oracle metrics

def test_oracle_accuracies_on_hand_made_probabilities():
    probs = {"style": np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]]),
             "shape": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]),
             "colour": np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])}
    np.testing.assert_array_equal(oracle_style_accuracy(probs, "vivid", ORACLE_CLASSES), [1, 0, 0])
    np.testing.assert_array_equal(oracle_style_accuracy(probs, 2), [0, 0, 1])
    scenes = [Scene("cube", "red", "sky"), Scene("ball", "blue", "sky"), None]  # 2nd: shape right, colour wrong
    np.testing.assert_array_equal(oracle_content_accuracy(probs, scenes, ORACLE_CLASSES), [1, 0])


# ----------------------------------------------------------------------------- missing weights

def test_missing_clip_names_the_option(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in (str(tmp_path / "no-such-clip"), "openai/clip-vit-base-patch32"):
        with pytest.raises(MissingWeightsError, match="--clip-model") as err:
            load_clip(name)
        assert "--metrics" in str(err.value) and str(err.value).count(". ") == 0


def test_missing_inception_names_the_option(monkeypatch, tmp_path):
    import cleanfid.inception_torchscript as ts

    def offline(fpath):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(ts, "check_download_inception", offline)
    with pytest.raises(MissingWeightsError, match="--inception-weights"):
        load_inception(None)
    with pytest.raises(MissingWeightsError, match="--inception-weights"):
        load_inception(str(tmp_path / "inception.pt"))


def test_missing_lpips_trunk_names_the_option(monkeypatch, tmp_path):
    import torchvision.models._api as tv_api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(MissingWeightsError, match="--lpips-weights"):
        load_lpips(None)
    with pytest.raises(MissingWeightsError, match="--lpips-weights"):
        load_lpips(str(tmp_path / "alexnet.pth"))


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return str(write_tiny_clip(tmp_path_factory.mktemp("clip"), width=32))


def test_compute_metrics_end_to_end(tiny_clip, tmp_path):
    from research.toyworld.oracle import HEADS, Oracle
    from research.toyworld.scenes import BACKGROUNDS, COLOURS, SHAPES
    from research.toyworld.styles import STYLES

    torch.manual_seed(0)  # an untrained oracle: the test checks plumbing, not accuracy
    labels = dict(zip(HEADS, (STYLES, SHAPES, COLOURS, BACKGROUNDS)))
    Oracle(labels, width=8).save_pretrained(tmp_path / "oracle")
    prompts = ["a red circle on a green hill, pastel style" if i < 8 else "a cat photo" for i in range(12)]
    timings = {}
    seeds = [i % 4 for i in range(12)]  # 3 prompts (2 scenes, 1 outside the grammar) × 4 seeds
    prompts = [f"a red circle on a green hill, pastel style{' ' * (i // 4)}" if i < 8 else "a cat photo" for i in range(12)]
    adapter, baseline = synthetic_images(12, 1), synthetic_images(12, 2)
    result = compute_metrics(adapter, baseline, prompts, synthetic_images(6, 3), seeds=seeds,
                             clip_model=tiny_clip, lpips_weights="random", oracle=Oracle.from_pretrained(tmp_path / "oracle"),
                             target_style="pastel", feature_extractor="clip", progress=False, timings=timings)
    assert set(result) == {"adapter", "baseline", "delta"}
    for arm in ("adapter", "baseline"):
        assert set(result[arm]) == set(METRICS)
        for name, m in result[arm].items():
            assert len(m["ci95"]) == 2 and isinstance(m["mean"], float), name
            assert m["ci95"][0] <= m["mean"] <= m["ci95"][1], name  # every interval contains its estimate
        a = result[arm]
        assert a["clip_score"]["n"] == a["style_similarity"]["n"] == a["fid"]["n"] == 12
        assert a["fid"]["unreliable"] is True and a["fid"]["backbone"].startswith("clip:")
        assert a["lpips_diversity"]["n"] == 12 and a["oracle_content_accuracy"]["n_scored"] == 8  # "a cat photo": no scene
        assert a["inception_score"]["backbone"].startswith("oracle")
        assert a["kid"]["interval"] == "jackknife:prompt+seed+reference"
    for name, d in result["delta"].items():
        assert d["mean"] == pytest.approx(result["adapter"][name]["mean"] - result["baseline"][name]["mean"]), name
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1] and d["better"] in ("higher", "lower"), name
    assert result["delta"]["fid"]["better"] == "lower"
    for name in ("oracle_style_accuracy", "oracle_content_accuracy"):  # a difference of fractions lies in [-1, 1]
        assert -1 <= result["delta"][name]["ci95"][0] and result["delta"][name]["ci95"][1] <= 1, name
    # the same images as both arms: every paired difference is exactly zero, with a zero-width interval
    same = compute_metrics(adapter, adapter, prompts, synthetic_images(6, 3), seeds=seeds, clip_model=tiny_clip,
                           lpips_weights="random", metrics=["clip_score", "kid", "lpips_diversity"],
                           feature_extractor="clip", progress=False)
    for name, d in same["delta"].items():
        assert d["mean"] == 0 and d["ci95"] == [0, 0], name
    assert "features" in timings and "kid" in timings
    with pytest.raises(ValueError, match="no class named 'ghibli'"):
        compute_metrics(synthetic_images(2, 1), None, prompts[:2], [], metrics=["oracle_style_accuracy"],
                        clip_model=tiny_clip, oracle=Oracle.from_pretrained(tmp_path / "oracle"), target_style="ghibli")


def test_compute_metrics_rejects_unknown_names(tiny_clip):
    images = synthetic_images(2, 0)
    with pytest.raises(ValueError, match="valid names are clip_score"):
        compute_metrics(images, images, ["a", "b"], images, metrics=["fid", "sharpness"], clip_model=tiny_clip)


class _FakeInceptionTrunk(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 2048, 1)

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 1))


class _FakeInception(torch.nn.Module):
    """Same TorchScript interface as clean-fid's inception-2015-12-05.pt (layers, features, softmax head)."""

    def __init__(self):
        super().__init__()
        self.layers, self.head = _FakeInceptionTrunk(), torch.nn.Linear(2048, 1008)

    def forward(self, x, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        f = self.layers((x - 128) / 128).flatten(1)
        return f if return_features else torch.softmax(self.head(f), -1)


def test_compute_metrics_with_a_local_inception_file(tmp_path, tiny_clip):
    torch.manual_seed(0)
    torch.jit.script(_FakeInception()).save(str(tmp_path / "my-inception.pt"))  # any name: loader links it in
    prompts = ["a red cube"] * 6
    result = compute_metrics(synthetic_images(6, 1), None, prompts, synthetic_images(5, 3),
                             metrics=("fid", "kid", "inception_score"), clip_model=tiny_clip,
                             inception_weights=str(tmp_path / "my-inception.pt"), progress=False)
    assert set(result) == {"adapter"}
    adapter = result["adapter"]
    assert adapter["fid"]["backbone"] == "inception-clean" and adapter["fid"]["unreliable"] is True
    assert adapter["kid"]["n_reference"] == 5 and adapter["inception_score"]["backbone"] == "inception"
    assert 1.0 <= adapter["inception_score"]["mean"] <= 1008


def test_single_arm_mean_interval_accounts_for_shared_seeds():
    # one arm, strong seed effect (same starting noise across prompts): prompts alone would under-cover
    rng = np.random.default_rng(10)
    design, hits, reps = Design.of(PROMPTS, SEEDS), 0, 400
    for _ in range(reps):
        x = 0.3 * rng.standard_normal(16)[PROMPTS] + 0.6 * rng.standard_normal(4)[SEEDS] + 0.5 * rng.standard_normal(64)
        lo, hi = interval(replicate(mean_statistic(x), design))["ci95"]
        hits += lo <= 0.0 <= hi
    assert 0.91 <= hits / reps <= 0.99


def test_the_run_table_prints_a_metric_that_had_no_interval():
    """Eight evaluation images over sixteen prompts give LPIPS diversity no within-prompt pair: its mean and
    bounds are None once made JSON-safe, and the table must say so rather than crash after training."""
    from research.evaluation import format_table
    empty = {"mean": None, "ci95": [None, None], "n": 0}
    measured = {"mean": 0.5, "ci95": [0.4, 0.6], "n": 8}
    table = format_table({"adapter": {"lpips_diversity": empty, "kid": measured},
                          "baseline": {"lpips_diversity": empty, "kid": measured},
                          "delta": {"lpips_diversity": {**empty, "better": "higher"},
                                    "kid": {"mean": -0.2, "ci95": [-0.3, -0.1], "n": 8, "better": "lower"}}})
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert rows["lpips_diversity"].count("-") >= 2 and "*" not in rows["lpips_diversity"]
    assert "↓*" in rows["kid"]
