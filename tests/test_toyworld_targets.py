"""Issue 10's targets for the shipped toy world that no training run's metrics.json holds (slow,
`make test-slow`): the VAE's round trip at 64 images per family, the base model on the held-out
prompts with an extra word anywhere, and Textual Inversion's content at the toy config's budget.

The style targets of pastel, vivid, comic and woodcut are in test_learning.py and test_unseen_look.py.
A target not met fails here; the README says which and by how much.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from research.toyworld import SD_DIR

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SD_DIR / "model_index.json").is_file(), reason="toy weights not built")]

# dB, 64 images per family: the four looks, three texture families held out of VAE training, gradients.
PSNR_TARGETS_DB = {"plain": 27.0, "pastel": 27.0, "vivid": 27.0, "comic": 27.0,
                   "hatching_new_periods": 25.0, "stipple": 25.0, "mosaic": 25.0, "gradient": 32.0}  # fmt: skip


def test_vae_round_trip_meets_its_targets_on_64_images_per_family():
    from diffusers import AutoencoderKL

    from research.toyworld.reconstruction import psnr_by_family

    vae = AutoencoderKL.from_pretrained(SD_DIR, subfolder="vae").eval()
    measured = psnr_by_family(vae, n=64, families=tuple(PSNR_TARGETS_DB))
    below = {f: round(measured[f]["mean"], 1) for f, target in PSNR_TARGETS_DB.items() if measured[f]["mean"] < target}
    assert not below, f"below target (dB): {below}; targets {PSNR_TARGETS_DB}"


def test_base_model_keeps_content_with_a_word_anywhere():
    """Content ≥ 90%, `plain` ≥ 95%, and within 5 points of that with an unknown or filler word at the
    start, in the middle or at the end of every prompt (same prompts and seeds, 64 images each)."""
    from research.toyworld.check import judge_base_model

    result = judge_base_model(SD_DIR, num_images=64, with_probe=True)
    content = result["content"]["mean"]
    assert result["content"]["n"] == 64 and content >= 0.90 and result["plain"]["mean"] >= 0.95, result
    assert len(result["probe"]) == 6
    low = {name: p["content"]["mean"] for name, p in result["probe"].items() if p["content"]["mean"] < content - 0.05}
    assert not low, f"content {content} without the word; with it: {low}"


def test_textual_inversion_keeps_content_at_the_toy_budget(tmp_path):
    """Experiment III's Textual Inversion arm on comic through `python -m research.compare`: its token no
    longer wipes the content out (stop 12: −28 points), here within 10 points of the base model."""
    from research.toyworld.generate import IMAGES_PER_STYLE, generate_style_folder

    folder = generate_style_folder(tmp_path / "data", "comic", IMAGES_PER_STYLE)
    proc = subprocess.run([sys.executable, "-m", "research.compare", "--config", "research/configs/toy.json",
                           "--style-dir", str(folder), "--methods", "textual_inversion", "--no-tracking",
                           "--output-dir", str(tmp_path / "runs"), "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (metrics,) = (tmp_path / "runs").glob("*/*_textual_inversion/metrics.json")
    m = json.loads(metrics.read_text())
    adapter, base = m["adapter"]["oracle_content_accuracy"], m["baseline"]["oracle_content_accuracy"]
    assert m["n_images"] >= 64 and adapter["mean"] >= base["mean"] - 0.10, (adapter, base)
