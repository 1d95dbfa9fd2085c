"""Shared fixtures: a tiny random Stable Diffusion model folder and an odd little style folder.

Tests start from the real defaults minus size (tiny model, 32 px, a few steps, CPU), so they run
the same code a user runs.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
import zlib
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from research.random_models import build_random_pipeline, write_char_tokenizer  # noqa: F401 (shared with tests)

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"  # never the repo store


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_random_pipeline(tmp_path_factory.mktemp("tiny_sd"), "tiny")


def _pattern(i: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(i)
    base = rng.integers(0, 255, size=(1, 1, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((xx + yy * (i % 3)) // 6 % 2)[..., None] * 80
    return np.clip(base + stripes, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def odd_style_dir(tmp_path_factory) -> Path:
    """Eight good RGB images plus every odd case a user folder has."""
    d = tmp_path_factory.mktemp("style") / "inky"
    d.mkdir()
    for i in range(8):
        Image.fromarray(_pattern(i)).save(d / f"img{i:02d}.png")
        if i % 2 == 0:
            (d / f"img{i:02d}.txt").write_text(f"a striped card number {i}")
    rgba = np.dstack([_pattern(20), np.full((48, 48), 128, np.uint8)])
    Image.fromarray(rgba).save(d / "rgba.png")
    Image.fromarray(_pattern(21)[..., 0]).save(d / "grey.png")
    Image.fromarray(_pattern(22)).convert("P").save(d / "palette.png")
    Image.fromarray(_pattern(23)[..., 0].astype(np.uint16) * 257).save(d / "sixteen.png")
    Image.fromarray(_pattern(24)).save(d / "photo.jpg")
    Image.fromarray(_pattern(26)).save(d / "web.webp")
    Image.fromarray(_pattern(27)).save(d / "bitmap.BMP")  # extensions match in any case
    Image.fromarray(_pattern(25, size=10)).save(d / "tiny.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (d / "notes.md").write_text("not an image, ignored")
    (d / "validation_prompts.txt").write_text("a striped card\n# a comment\na red card\n")
    return d


@pytest.fixture()
def tracking_store(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def tiny_train_args(style_dir: Path, model: Path, out: Path, **overrides) -> list[str]:
    """The real CLI minus size: 32 px, 4 steps, CPU, clip-score only with a tiny CLIP left out."""
    values = dict(style_dir=style_dir, base_model=model, output_dir=out, resolution=32, max_train_steps=4,
                  train_batch_size=2, rank=4, lora_alpha=8, learning_rate=1e-3, lr_warmup_steps=0,
                  num_inference_steps=2, num_eval_images=4, sample_batch_size=4, log_every=2,
                  checkpointing_steps=2, metrics="none", device="cpu", experiment="test", seed=3)
    values.update(overrides)
    args = []
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def train_style(style_dir: Path, out: Path) -> Path:
    """A LoRA on `style_dir` through the real entry point at the toy defaults (what `make quickstart` runs);
    the run folder. Minutes on a CPU: for the slow learning checks."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{out / 'mlflow.db'}")
    proc = subprocess.run([sys.executable, "-m", "research.train", "--config", "research/configs/toy.json",
                           "--style-dir", str(style_dir), "--output-dir", str(out / "runs"), "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list((out / "runs" / "quickstart").iterdir())
    return run


def load_report(name: str):
    """A report script (reports/<name>.py) imported as a module; reports/ is scripts, not a package."""
    path = REPO / "reports" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height: Pillow reads the size from IHDR without decoding anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
