"""Style folders: odd image modes, captions, the seeded split, prompts, preprocessing."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import _pattern
from research.data import (DEFAULT_PROMPTS, GENERIC_PROMPTS, DataError, load_rgb, load_style_folder, preprocess,
                           read_validation_prompts)


def test_odd_modes_load_as_rgb(odd_style_dir):
    for name in ["rgba.png", "grey.png", "palette.png", "sixteen.png", "photo.jpg", "web.webp", "bitmap.BMP"]:
        image = load_rgb(odd_style_dir / name)
        assert image.mode == "RGB" and image.size == (48, 48), name


def test_sixteen_bit_is_rescaled_not_clipped(odd_style_dir):
    raw = Image.open(odd_style_dir / "sixteen.png")
    assert raw.mode.startswith("I")
    rgb = np.asarray(load_rgb(odd_style_dir / "sixteen.png"))
    assert np.array_equal(rgb[..., 0], _pattern(23)[..., 0])  # v*257/65535*255 rounds back to v


def test_alpha_is_composited_on_white(tmp_path):
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_rgb(tmp_path / "clear.png").getpixel((5, 5)) == (255, 255, 255)


def test_folder_skips_bad_files_with_named_warnings(odd_style_dir, caplog):
    with caplog.at_level(logging.WARNING):
        folder = load_style_folder(odd_style_dir, resolution=64, holdout_fraction=0.25, seed=1)
    names = {e.path.name for e in folder.train + folder.heldout}
    assert "corrupt.png" not in names and "tiny.png" not in names and "notes.md" not in names
    assert len(names) == 15
    assert "corrupt.png" in caplog.text and "tiny.png" in caplog.text


def test_captions_template_and_trigger(odd_style_dir):
    folder = load_style_folder(odd_style_dir, resolution=32, holdout_fraction=0.0, trigger_word="inkz",
                               caption_template="art in {style} style")
    captions = {e.path.name: e.caption for e in folder.train}
    assert captions["img00.png"] == "inkz, a striped card number 0"  # from its .txt
    assert captions["img01.png"] == "inkz, art in inky style"  # no .txt: the template
    assert folder.heldout == []


def test_split_is_seeded_and_disjoint(odd_style_dir):
    a = load_style_folder(odd_style_dir, resolution=32, holdout_fraction=0.3, seed=5)
    b = load_style_folder(odd_style_dir, resolution=32, holdout_fraction=0.3, seed=5)
    c = load_style_folder(odd_style_dir, resolution=32, holdout_fraction=0.3, seed=6)
    held = [e.path for e in a.heldout]
    assert held == [e.path for e in b.heldout]
    assert held != [e.path for e in c.heldout]
    assert not set(held) & {e.path for e in a.train}
    assert len(held) == round(15 * 0.3)


def test_validation_prompts_file_and_defaults(odd_style_dir, tmp_path):
    assert read_validation_prompts(odd_style_dir, "inky") == ["a striped card", "a red card"]
    assert read_validation_prompts(tmp_path, "ghibli") == DEFAULT_PROMPTS["ghibli"]
    assert read_validation_prompts(tmp_path, "whatever") == GENERIC_PROMPTS
    shared = tmp_path / "prompts.txt"
    shared.write_text("one\ntwo\n")
    assert read_validation_prompts(odd_style_dir, "inky", str(shared)) == ["one", "two"]
    with pytest.raises(DataError, match="--validation-prompts-file"):
        read_validation_prompts(odd_style_dir, "inky", str(tmp_path / "missing.txt"))


def test_missing_and_empty_folders_are_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_style_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="No usable image in"):
        load_style_folder(tmp_path / "empty")


def test_preprocess_resizes_crops_flips_to_minus_one_one():
    image = Image.new("RGB", (80, 40), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 40, 40))  # left half black
    x = preprocess(image, 32, center_crop=True)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    flipped = preprocess(image, 32, center_crop=True, flip=True)
    assert torch.allclose(flipped, x.flip(-1))
    left = preprocess(image, 32, center_crop=False, rng=random.Random(0))
    assert left.shape == (3, 32, 32)
