"""Style folders: odd image modes, captions, the seeded split, prompts, preprocessing."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import _pattern, png_header
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


def test_unusable_files_among_good_ones_are_skipped_by_name(odd_style_dir, tmp_path, caplog):
    """A FIFO (never opened: it would block), a 20000x20000 header (not decoded) and a folder are named
    and skipped; the good images still load."""
    import os
    import shutil

    d = shutil.copytree(odd_style_dir, tmp_path / "style")
    os.mkfifo(d / "pipe.png")
    (d / "huge.png").write_bytes(png_header(20000, 20000))  # over Pillow's bomb limit: it would raise
    (d / "big.png").write_bytes(png_header(9000, 9000))  # under Pillow's limit, over ours
    (d / "folder.jpg").mkdir()
    with caplog.at_level(logging.WARNING):
        folder = load_style_folder(d, resolution=32, holdout_fraction=0.0)
    assert len(folder.train) == len(load_style_folder(odd_style_dir, resolution=32, holdout_fraction=0.0).train)
    assert "pipe.png: not a regular file" in caplog.text and "folder.jpg: not a regular file" in caplog.text
    assert "huge.png: larger than" in caplog.text and "big.png: 9000x9000 is larger than" in caplog.text


def test_captions_are_utf8_with_a_named_fallback(tmp_path, caplog):
    for name in ["a", "b", "c"]:
        Image.fromarray(_pattern(1)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_bytes("caf\u00e9 au lait".encode("utf-8-sig"))
    (tmp_path / "b.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (tmp_path / "c.txt").write_bytes(b"\x00\x01binary\x02")
    with caplog.at_level(logging.WARNING):
        folder = load_style_folder(tmp_path, resolution=32, holdout_fraction=0.0, style_name="s")
    captions = {e.path.stem: e.caption for e in folder.train}
    assert captions == {"a": "caf\u00e9 au lait", "b": "caf\u00e9 cr\u00e8me", "c": "an illustration in s style"}
    assert "b.txt is not UTF-8" in caplog.text and "Latin-1" in caplog.text
    assert "c.txt holds control bytes" in caplog.text and "a.txt" not in caplog.text


def test_latin1_prompts_are_read_with_a_warning(tmp_path, caplog):
    (tmp_path / "validation_prompts.txt").write_bytes("un caf\u00e9\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        assert read_validation_prompts(tmp_path, "x") == ["un caf\u00e9"]
    assert "not UTF-8" in caplog.text
