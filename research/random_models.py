"""Randomly initialised Stable Diffusion 1.x pipelines, for tests and benchmarks.

``tiny``: the SD architecture at toy size (seconds on a CPU). ``sd15``: the real SD 1.5 shapes
(860M-parameter UNet, 83M VAE, 123M CLIP text encoder) with random weights — the cost of a real
training step, measurable without downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789,.-'")


def write_char_tokenizer(folder: Path, max_length: int = 32):
    """A character-level CLIPTokenizer: every letter is a token, no merges."""
    from transformers import CLIPTokenizer  # deferred: each builder imports only what its model needs

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS + [f"{c}</w>" for c in CHARS])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        bos_token=SPECIALS[0], eos_token=SPECIALS[1], pad_token=SPECIALS[1], unk_token=SPECIALS[1])
    tok.save_pretrained(folder)
    return tok


SIZES = {
    "tiny": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2),
        max_length=32,
        unet=dict(sample_size=16, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, norm_num_groups=8),
        vae=dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32),
    ),
    "sd15": dict(  # the shapes of stable-diffusion-v1-5's config files
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  hidden_act="quick_gelu"),
        max_length=77,
        unet=dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                  cross_attention_dim=768, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        vae=dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512),
    ),
}


def build_random_pipeline(folder: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a randomly initialised SD 1.x diffusers folder to `folder`/model and return its path."""
    # deferred: each builder imports only what its model needs
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = SIZES[size]
    torch.manual_seed(seed)
    tokenizer = write_char_tokenizer(Path(folder) / "_tokenizer", spec["max_length"])
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=spec["max_length"],
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1, **spec["text"]))
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **spec["vae"])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = Path(folder) / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def write_tiny_clip(folder: str | Path, seed: int = 0, width: int = 32, image_size: int = 64) -> Path:
    """A random tiny CLIPModel folder with a char-level CLIPTokenizer and an image processor at `image_size`."""
    # deferred: each builder imports only what its model needs
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    tokenizer = write_char_tokenizer(folder, max_length=77)
    vocab = tokenizer.get_vocab()
    layers = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1, **layers),
                        vision_config=dict(image_size=image_size, patch_size=8, **layers), projection_dim=width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder
