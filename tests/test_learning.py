"""Slow learning checks on the toy world (`make test-slow`): does training really move the style
and keep the content, and do the standard metrics agree with the oracle's truth?

Each style trains through the real entry point with the embedded default config, exactly what
`make quickstart` runs, and the assertions read the run's metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import train_style

from research.toyworld import ORACLE_DIR, SD_DIR

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SD_DIR / "model_index.json").is_file(), reason="toy weights not built")]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    from research.toyworld.generate import IMAGES_PER_STYLE, generate_style_folder

    out = tmp_path_factory.mktemp("toy")
    for style in ["pastel", "vivid", "comic"]:
        generate_style_folder(out, style, IMAGES_PER_STYLE)  # what `make data` writes
    return out


STYLES = ["pastel", "vivid", "comic"]


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):
    """One training run per style, shared by the checks below (each trains at most once)."""
    cache: dict[str, Path] = {}

    def get(style: str) -> Path:
        if style not in cache:
            cache[style] = train_style(toy_data / style, tmp_path_factory.mktemp(style))
        return cache[style]

    return get


@pytest.mark.parametrize("style", STYLES)
def test_metrics_agree_with_the_oracle(style, trained):
    """The standard metrics move the way the truth moved: toward the style's held-out references."""
    m = json.loads((trained(style) / "metrics.json").read_text())
    adapter, base = m["adapter"], m["baseline"]
    assert m["n_images"] >= 64
    assert adapter["oracle_style_accuracy"]["mean"] > base["oracle_style_accuracy"]["mean"] + 0.3
    assert adapter["style_similarity"]["mean"] > base["style_similarity"]["mean"]
    assert adapter["fid"]["mean"] < base["fid"]["mean"]
    assert adapter["kid"]["mean"] < base["kid"]["mean"]


@pytest.mark.parametrize("style", STYLES)
def test_study_targets_style_moved_content_kept(style, trained):
    """The toy world's targets: a plain, prompt-following base; a LoRA that takes the style and keeps content."""
    from research.sampling import load_set
    from research.toyworld.oracle import Oracle

    run = trained(style)
    m = json.loads((run / "metrics.json").read_text())
    adapter, base = m["adapter"], m["baseline"]
    assert base["oracle_content_accuracy"]["mean"] >= 0.90
    baseline_images, _ = load_set(run / "inference" / "baseline")
    predicted = Oracle.from_pretrained(ORACLE_DIR).predict(baseline_images)["style"]
    assert sum(p == "plain" for p in predicted) / len(predicted) >= 0.95
    assert adapter["oracle_style_accuracy"]["mean"] >= 0.90
    assert adapter["oracle_content_accuracy"]["mean"] >= base["oracle_content_accuracy"]["mean"] - 0.05
