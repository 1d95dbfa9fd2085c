"""A look no toy component was trained on (issue 10, part 4): the generator writes a style folder in it,
the evaluation judges it with its hand-written detector, and (slow) a LoRA at the toy defaults learns it.

The woodcut look and its detector are `research/toyworld/unseen.py`; the oracle only knows the four
looks pretraining uses, so for woodcut the metrics report `detector_style_accuracy` in place of
`oracle_style_accuracy`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_train_args, train_style
from PIL import Image

from research.metrics import DETECTOR_METRIC, compute_metrics
from research.toyworld import SD_DIR
from research.toyworld.generate import IMAGES_PER_STYLE, generate_style_folder
from research.toyworld.generate import main as generate_main
from research.toyworld.oracle import HEADS, Oracle
from research.toyworld.render import render
from research.toyworld.scenes import BACKGROUNDS, COLOURS, HELDOUT_SCENES, SHAPES, TRAIN_SCENES, caption, parse_caption
from research.toyworld.styles import STYLES
from research.toyworld.unseen import is_woodcut, render_unseen
from research.train import main as train_main


@pytest.fixture(scope="module")
def untrained_oracle_dir(tmp_path_factory):
    """An oracle with the shipped classes but random weights: the tests check plumbing, not its verdicts."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("oracle")
    Oracle(dict(zip(HEADS, (STYLES, SHAPES, COLOURS, BACKGROUNDS))), width=8).save_pretrained(folder)
    return folder


def folder_files(folder):
    images = sorted(folder.glob("*.png"))
    return [Image.open(p).convert("RGB") for p in images], [p.with_suffix(".txt").read_text().strip() for p in images]


def test_generator_writes_a_woodcut_folder_with_the_style_folders_captions(tmp_path):
    generate_main(["--out", str(tmp_path), "--styles", "woodcut,pastel", "--images-per-style", "6"])
    wood_images, wood_captions = folder_files(tmp_path / "woodcut")
    pastel_images, pastel_captions = folder_files(tmp_path / "pastel")
    assert len(wood_images) == 6 and all(is_woodcut(im) for im in wood_images)
    assert not any(is_woodcut(im) for im in pastel_images)
    # the same caption convention as every style folder: the content caption of a training scene, no style word
    for text in wood_captions + pastel_captions:
        scene = parse_caption(text)
        assert scene in TRAIN_SCENES and text == caption(scene), text
    assert (tmp_path / "woodcut" / "validation_prompts.txt").read_text() == \
        (tmp_path / "pastel" / "validation_prompts.txt").read_text()


def test_generator_names_the_unseen_look_among_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate_main(["--out", str(tmp_path), "--styles", "engraving"])
    assert "woodcut" in capsys.readouterr().err
    with pytest.raises(ValueError, match="woodcut"):
        generate_style_folder(tmp_path, "engraving", 1)


def test_detector_judges_the_style_of_a_look_the_oracle_does_not_know(untrained_oracle_dir):
    scenes = HELDOUT_SCENES[:3]
    prompts = [caption(s) for s in scenes for _ in range(4)]  # 3 prompts × 4 seeds
    seeds = [900_000_000 + k for _ in scenes for k in range(4)]
    # adapter: the first three seeds of each prompt in woodcut, the last in plain; baseline: all plain
    adapter = [render_unseen(parse_caption(p), "woodcut", s) if s % 4 != 3 else render(parse_caption(p), "plain", s)
               for p, s in zip(prompts, seeds)]
    baseline = [render(parse_caption(p), "plain", s) for p, s in zip(prompts, seeds)]
    result = compute_metrics(adapter, baseline, prompts, [], seeds=seeds,
                             metrics=["oracle_style_accuracy", "oracle_content_accuracy"],
                             oracle=Oracle.from_pretrained(untrained_oracle_dir), target_style="woodcut",
                             progress=False)
    assert "oracle_style_accuracy" not in result["adapter"]  # the oracle has no woodcut class
    a, b, d = (result[k][DETECTOR_METRIC] for k in ("adapter", "baseline", "delta"))
    assert a["mean"] == pytest.approx(np.mean([is_woodcut(im) for im in adapter])) == pytest.approx(0.75)
    assert b["mean"] == 0 and a["n"] == b["n"] == 12 and a["backbone"] == "detector:woodcut"
    assert d["mean"] == pytest.approx(0.75) and d["better"] == "higher"
    for m in (a, b, d):
        assert m["ci95"][0] <= m["mean"] <= m["ci95"][1]
    assert "oracle_content_accuracy" in result["adapter"]  # content is still the oracle's to judge


def test_a_run_on_a_woodcut_folder_reports_the_detector(tiny_model, untrained_oracle_dir, tmp_path, tracking_store):
    """The real entry point on a tiny random model: the folder the slow test trains on, the metric it reads."""
    folder = generate_style_folder(tmp_path / "data", "woodcut", 8)
    out = tmp_path / "runs"
    assert train_main(tiny_train_args(folder, tiny_model, out, oracle=untrained_oracle_dir,
                                      metrics="oracle_style_accuracy,oracle_content_accuracy")) == 0
    (run,) = [p for p in (out / "test").iterdir() if p.is_dir()]
    m = json.loads((run / "metrics.json").read_text())
    for arm in ("adapter", "baseline", "delta"):
        v = m[arm][DETECTOR_METRIC]
        assert v["ci95"][0] <= v["mean"] <= v["ci95"][1], (arm, v)
        assert "oracle_style_accuracy" not in m[arm]
    assert m["adapter"][DETECTOR_METRIC]["n"] == m["n_images"] == 4


@pytest.mark.slow
@pytest.mark.skipif(not (SD_DIR / "model_index.json").is_file(), reason="toy weights not built")
def test_lora_learns_a_look_no_toy_component_knows(tmp_path):
    """Issue 10's target for the unseen look at the toy defaults, from the real entry point's metrics.json."""
    folder = generate_style_folder(tmp_path / "data", "woodcut", IMAGES_PER_STYLE)  # what `make data-woodcut` writes
    m = json.loads((train_style(folder, tmp_path) / "metrics.json").read_text())
    adapter, base = m["adapter"], m["baseline"]
    assert m["n_images"] >= 64
    assert adapter[DETECTOR_METRIC]["mean"] >= 0.80, adapter[DETECTOR_METRIC]
    assert base[DETECTOR_METRIC]["mean"] <= 0.10, base[DETECTOR_METRIC]
    content, base_content = adapter["oracle_content_accuracy"]["mean"], base["oracle_content_accuracy"]["mean"]
    assert content >= base_content - 0.10, (content, base_content)
