"""Shared fixtures: a tiny random Stable Diffusion model folder and an odd little style folder.

Tests start from the real defaults minus size (tiny model, 32 px, a few steps, CPU), so they run
the same code a user runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("MLFLOW_TRACKING_URI", "")  # each test picks its own store below

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def write_char_tokenizer(folder: Path, max_length: int = 32):
    """A character-level CLIPTokenizer: every letter is a token, no merges."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789,.-'")
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + [f"{c}</w>" for c in chars])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        bos_token=SPECIALS[0], eos_token=SPECIALS[1], pad_token=SPECIALS[1], unk_token=SPECIALS[1])
    tok.save_pretrained(folder)
    return tok


def build_tiny_pipeline(folder: Path, seed: int = 0):
    """SD 1.x architecture at toy size: the same classes, a few thousand parameters each."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_char_tokenizer(folder / "_tok")
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_attention_heads=4, num_hidden_layers=2,
                                                max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "model", safe_serialization=True)
    return folder / "model"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


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
