"""Pretrain the toy world from scratch: tiny CLIP, then VAE, then UNet (plain scenes only), then the
oracle's two trunks (`oracle`: style, on clean renders; `judge`: content, with scenes under ink lines too).

    python -m research.toyworld.pretrain --out research/toyworld/weights [--device cuda] [--only clip,vae,unet,oracle,judge] [--recipe cpu|v2]

Every stage draws its data from fixed seeds, so a rerun on the same device repeats the result
(CUDA kernels and thread counts may change the last digits). Each output folder is written to a
temporary folder and renamed into place. Resumable: stopped at any point, the same command goes on
per stage. A finished stage is kept; an unfinished one continues from its training state, saved
every two minutes under `<out>/.state/` (pretrain_state.py), bit for bit on the CPU. `--only` retrains
the stages it names from step 0 and leaves the others in `--out` as they are.

What it trains on (issue 10): the VAE on the four looks plus procedural textures (textures.py), so
a look it never saw still survives a round trip; CLIP on captions with the style phrase anywhere and
filler or made-up words mixed in (captions.py); the UNet on plain scenes only, its captions content
only but with the same extra words, so a prompt that gains a word keeps its content. The UNet trains
in cycles (`Recipe.unet_cycles`, `restart_cycle`), each from the last one's EMA weights.

v3 (stop 20, the default `--recipe`) halves v2's latent downsampling: the VAE codes 64 px as 32×32×4
and the UNet gains a first level at 32×32 (make_vae, make_unet). v2's 16×16×4 latent kept little more
than a blurred copy of fine textures, and a woodcut adapter on it drew its lines faint (its detector fired on 55.9% of
256 images, v3's 92.2%, one training run each; across training seeds v3's woodcut LoRA ranges from 30% to
94%: README "Toy world v3" and "Retuned for v3").

How long it takes (measured for the shipped weights, 2026-11-27):
- H100 (`--device cuda`): VAE 5,000 steps of 128 in 127 s (22 ms a step); UNet ~9 steps/s at batch
  128 (a step of 64 takes 98 ms, of 128 118 ms: launch-bound), cycles 1 and 2 in 240 s, cycle 3
  ~225 s. From v2's runs: CLIP 2,000 steps 83 s, oracle 3,000 steps 40 s.
- 2 CPU cores: VAE ~11 s a step of 128 (~15 h: out of reach on a CPU); UNet ~2.3 s a step of 128
  (cycles 1-3, ~2.8 h), 1.6 steps/s at batch 32 (cycle 4, 1,500 steps in 17 min, OMP_NUM_THREADS=2);
  from v2's runs: CLIP ~1 s/step (~35 min), oracle ~1 s/step (~55 min), judge 2,000 steps of 128 in
  2,667 s (44 min).
- Since stop 23 a CPU with native bf16 (AMX) trains the VAE and the oracle's trunks under bf16 autocast
  (bf16_stages): on 2 cores of such a Xeon a VAE step of 32 took 1.48 s in fp32 and 0.88 s in bf16, an
  oracle step of 128 0.78 s and 0.43 s, with the same quality (README, "Toward a CPU rebuild").
- `--recipe cpu` on 2 cores of that Xeon (each stage with its data rendering and VAE round trips): CLIP
  1,674 s (stop 27, 1,000 steps), VAE (crops first) 3,366 s and 3,667 s (stops 24, 25), UNet 3,114 s
  (stop 27) to 3,822 s (stop 26, a slower machine), the oracle's style trunk 361 s and the judge 490 s
  (stop 27): 2.5-2.8 h in all, ~3.0 h at the slowest pace seen. With min-SNR its LoRAs meet their targets
  at the config's seed (vivid's content at -4.7 under its own oracle, -6.2 under v3's), but Textual
  Inversion's content collapses on its base (stop 28: -28.1 points on comic, v3's base -1.6): README,
  "Min-SNR in the base's pretraining", "Under 3 h on 2 cores", "Not shipped". It does not make the
  shipped weights.
Shipped weights: CLIP from v2's H100 run; the VAE and UNet cycles 1-2 from one H100 lease; cycle 3 run
alone from cycles 1-2's weights on a second lease, whose time ran out at step 2,238 (its step-2,000
checkpoint is exactly a 2,000-step cycle: constant rate after warm-up, and a checkpoint holds the EMA
weights, as a cycle's end does); cycle 4 on 2 CPU cores from cycle 3's weights. A cycle run alone from
the weights of the ones before it equals running them all in one go (tests/test_pretrain_resume.py).
The judge from a CPU run on v2's VAE and the oracle's style trunk from v1 (trained on v1's VAE round
trips): its style head calls v3 round trips of 128 renders of each look 100% right. Same code otherwise.
Check a VAE with `python -m research.toyworld.reconstruction --sd <out>/sd` (PSNR per family).
Judge a rebuilt base model with `python -m research.toyworld.check --sd <out>/sd`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextModel

from research.atomic import replace_folder, write_json
from research.cli import user_errors_exit_2
from research.errors import ConfigError
from research.models import min_snr_weight
from research.toyworld.captions import styled_caption
from research.toyworld.oracle import HEADS, Oracle
from research.toyworld.pretrain_state import StageState, begin, differences, finished, mark_finished, read_state, state_file
from research.toyworld.render import render
from research.toyworld.scenes import ALL_SCENES, BACKGROUNDS, COLOURS, SHAPES, TRAIN_SCENES
from research.toyworld.styles import STYLES
from research.toyworld.textures import TRAIN_FAMILIES, TRAIN_PERIODS, stripe_mask, texture
from research.toyworld.tokenizer import build_tokenizer

STAGES = ("clip", "vae", "unet", "oracle", "judge")  # judge: the oracle's content trunk (oracle.py)
CLIP_MEAN = (0.5, 0.5, 0.5)  # CLIP sees [-1, 1]: toy images span the full range, so no dataset-specific
CLIP_STD = (0.5, 0.5, 0.5)  # statistics are needed and the processor config stays obvious


@dataclass(frozen=True)
class Cycle:
    """One UNet training cycle: warm-up then a constant rate, from the last cycle's EMA weights (restart_cycle)."""

    steps: int
    batch: int
    noise_offset: float = 0.1  # offset noise: without it the UNet cannot move a latent channel's mean (see Recipe)


@dataclass
class Recipe:
    """Every step count and data size; `--scale` shrinks them all together for smoke runs. The defaults
    are v3's, which built the shipped weights; RECIPES["v2"] the previous toy world's."""

    clip_images: int = 24_000  # 6k per style
    clip_steps: int = 2_000
    clip_batch: int = 512  # large batches make the contrastive task hard enough to learn fine words
    clip_lr: float = 1e-3
    vae_images: int = 24_000
    latent_factor: int = 2  # the VAE's downsampling: 2, a 32×32×4 latent for 64 px (v3); v2's 4 (16×16×4) drew woodcut faint
    vae_steps: int = 5_000  # v2's 4× VAE: 10,000; v1's 3,000 looks-only steps left hatching at ~11 dB
    vae_batch: int = 128
    # Crops first (recipe "cpu"): vae_crop_steps on random crops, then vae_steps on whole images, one cosine
    # schedule over both. A step on 64 crops of 32×32 costs a fifth of one on 64 whole images on a CPU, and the
    # whole-image steps after them let GroupNorm, which normalises over the whole image, meet whole-image
    # statistics again (README, "A finer latent on a CPU").
    vae_crop_steps: int = 0
    vae_crop_batch: int = 64
    vae_crop_size: int = 32
    vae_lr: float = 5e-4
    vae_kl_weight: float = 1e-6  # SD's VAE uses a tiny KL term: latents stay near-deterministic but bounded
    vae_texture_fraction: float = 0.5  # the rest are the four looks: textures make the VAE encode looks it never saw
    unet_images: int = 10_000  # plain only: ~75 layouts per training triple
    # Offset noise: without it the UNet cannot move a latent channel's mean, and in v2 a seed whose noise
    # had a positive mean in channel 1 decoded to a dot grid the oracle calls `comic`. v3's latents carry
    # the background colour in their channel means (std 0.73 across plain renders, v2 0.11), and after
    # three cycles at 0.1 the base still read it off the starting noise (`plain` 80%); a fourth at 0.3
    # made it ignore that (100%). Cycles 1-3 ran on an H100 (batch 128 is launch-bound there), the
    # fourth on 2 CPU cores (README, "Toy world v3").
    unet_cycles: tuple[Cycle, ...] = (Cycle(1_700, 128), Cycle(700, 128), Cycle(2_000, 128), Cycle(1_500, 32, 0.3))
    unet_lr: float = 1e-3
    unet_ema: float = 0.999  # sampling quality of tiny diffusion models depends a lot on EMA weights
    # min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' --snr_gamma, kohya's --min_snr_gamma), as the
    # adapters train with: 0 is v3's plain MSE, which built the shipped UNet
    unet_snr_gamma: float = 0.0
    unet_checkpoint_every: int = 250  # ship-ready pipeline written this often (long CPU runs can stop early)
    caption_dropout: float = 0.1  # empty caption this often, so classifier-free guidance works
    caption_variants: int = 8  # captions drawn per (scene, style) from captions.py's grammar, tokenised once
    extra_word_rate: float = 0.3  # share of captions with a filler or made-up word at a random position
    oracle_images: int = 24_000
    oracle_steps: int = 3_000
    oracle_batch: int = 256
    oracle_lr: float = 2e-3
    oracle_recon_fraction: float = 0.5  # half of the oracle's inputs went through the VAE, as generated images do
    judge_steps: int = 2_000  # the content trunk: the oracle's recipe, with scenes under ink lines (ink_over)
    judge_batch: int = 128  # a step of 256 takes 2.6 s on 2 CPU cores; 128 keeps the stage under 45 min there
    judge_ink_fraction: float = 0.3  # share of its scenes under ink: content scored on them, style not

    def __post_init__(self):
        if self.latent_factor not in (2, 4):
            raise ConfigError(f"latent_factor must be 2 (v3) or 4 (v2), not {self.latent_factor}")
        if not (0 < self.vae_crop_size <= 64 and self.vae_crop_size % self.latent_factor == 0):
            raise ConfigError(f"vae_crop_size must be a multiple of latent_factor ({self.latent_factor}) up to 64, not {self.vae_crop_size}")

    def scaled(self, scale: float) -> "Recipe":
        out = replace(self)  # floats (rates, fractions) kept as they are
        for name, value in vars(self).items():
            if isinstance(value, int) and value and not name.endswith(("batch", "variants", "factor", "size")):
                setattr(out, name, max(8, int(value * scale)))
        out.unet_cycles = tuple(replace(c, steps=max(8, int(c.steps * scale))) for c in self.unet_cycles)
        return out


# `--recipe`: v3 built the shipped weights. v2 is the toy world before stop 20: a 16×16×4 latent and a
# three-level UNet, trained in two cycles of batch 32 (5,000 steps without offset noise
# were 84% content and 70% plain; 5,000 with it 97% and 98%; the second cycle cut patchy-collage seeds).
RECIPES = {
    "v3": Recipe(),
    "v2": Recipe(latent_factor=4, vae_steps=10_000, unet_cycles=(Cycle(5_000, 32), Cycle(2_000, 32))),
    # cpu: v3's models, trained in what 2 CPU cores can afford (stops 19, 23-27): CLIP for 1,000 steps (its loss
    # flattens there; the base over it passes the probe, stop 27); the VAE on crops first, then whole images
    # (stop 19's run: 5,640 steps of 64 crops, then 1,280 of 32 whole images); the UNet in one cycle of batch 32
    # with offset noise 0.3 from step 0 (4,800 steps: 52-64 min, as good a base on the check as v3's) and
    # min-SNR 5 (stop 26: without it, LoRAs on that base lost vivid's content and pastel's and woodcut's style);
    # the oracle's style trunk for 600 steps of 128 and the judge for 1,000 (stop 27: on generated images they
    # call what the shipped oracle calls).
    "cpu": Recipe(clip_steps=1_000, vae_images=12_000, vae_crop_steps=5_640, vae_steps=1_280, vae_batch=32,
                  unet_cycles=(Cycle(4_800, 32, 0.3),), unet_snr_gamma=5.0, oracle_steps=600, oracle_batch=128,
                  judge_steps=1_000),
}  # fmt: skip
DEFAULT_RECIPE = "v3"  # what built the shipped weights, so a plain `make toyworld` rebuilds them


# ----------------------------------------------------------------------------- data
def _render_chunk(items: list[tuple[int, str, int]]) -> np.ndarray:
    return np.stack([np.asarray(render(ALL_SCENES[i], style, seed)) for i, style, seed in items])


def render_set(n: int, styles: tuple[str, ...], stage_seed: int, workers: int) -> dict[str, np.ndarray]:
    """n renders of training scenes, styles balanced; labels index SHAPES/COLOURS/BACKGROUNDS/STYLES."""
    rng = np.random.default_rng(stage_seed)
    train_index = [ALL_SCENES.index(s) for s in TRAIN_SCENES]
    scene_idx = np.array(train_index)[rng.integers(len(train_index), size=n)]
    style_names = [styles[i % len(styles)] for i in range(n)]
    # Stage seeds are spaced 10^7 apart, so no two stages (or the tests, which use ≥ 9·10^8) share a layout.
    items = [(int(s), st, stage_seed * 10**7 + i) for i, (s, st) in enumerate(zip(scene_idx, style_names))]
    chunks = [items[i : i + 500] for i in range(0, n, 500)]
    with ProcessPoolExecutor(workers) as pool:
        images = np.concatenate(list(tqdm(pool.map(_render_chunk, chunks), total=len(chunks), desc=f"render {n}", leave=False)))
    scenes = [ALL_SCENES[i] for i in scene_idx]
    return {
        "images": images,  # N×64×64×3 uint8
        "scene": scene_idx,
        "style": np.array([STYLES.index(s) for s in style_names]),
        "shape": np.array([SHAPES.index(s.shape) for s in scenes]),
        "colour": np.array([COLOURS.index(s.colour) for s in scenes]),
        "background": np.array([BACKGROUNDS.index(s.background) for s in scenes]),
    }


def _texture_chunk(items: list[tuple[str, int]]) -> np.ndarray:
    return np.stack([texture(family, np.random.default_rng(seed)) for family, seed in items])


def texture_set(n: int, families: tuple[str, ...], stage_seed: int, workers: int) -> np.ndarray:
    """n procedural textures (N×64×64×3 uint8), families balanced, each from its own seed."""
    items = [(families[i % len(families)], stage_seed * 10**7 + i) for i in range(n)]
    chunks = [items[i : i + 500] for i in range(0, n, 500)]
    with ProcessPoolExecutor(workers) as pool:
        return np.concatenate(list(tqdm(pool.map(_texture_chunk, chunks), total=len(chunks), desc=f"textures {n}", leave=False)))


def to_unit(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def cosine_steps(opt, lr: float, total: int, warmup: int, desc: str, state: StageState):
    """(step, progress bar) for the steps `state` has not run yet, the optimizer's rate set by `cosine_lr` before each."""
    for step, bar in state.steps(total, desc):
        for g in opt.param_groups:
            g["lr"] = lr * cosine_lr(step, total, warmup)
        yield step, bar


def take_step(opt, loss: torch.Tensor, step: int, bar, digits: int = 4) -> None:
    """Backward and update; the progress bar shows the loss every 100 steps (a host sync, so not every step)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step % 100 == 0:
        bar.set_postfix(loss=f"{loss.item():.{digits}f}")


# The stages that run their forward passes under bf16 autocast (weights, optimizer and loss stay fp32).
# On a GPU the VAE and UNet, as the shipped weights were trained. On a CPU only where it pays: the
# conv-heavy VAE and oracle trunks, and only on a CPU with native bf16 (AMX or AVX512-BF16; elsewhere
# bf16 is emulated and slower). Measured on 2 cores of such a Xeon, seconds a training step, fp32 → bf16
# (stop 23): VAE step of 128 12.3 → 4.7, oracle step of 256 3.1 → 0.94; the UNet (a step of 128 2.7 → 3.8)
# and CLIP (a step of 512 2.6 → 4.1) are slower in bf16 there and stay fp32.
GPU_BF16 = ("vae", "unet")
CPU_BF16 = ("vae", "oracle", "judge")


@functools.cache  # asked before every training step; the answer cannot change while the process runs
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check: AMX or AVX512-BF16) rather than emulating it."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_stages(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return GPU_BF16
    return CPU_BF16 if cpu_has_bf16() else ()


def autocast(device: torch.device, stage: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=stage in bf16_stages(device))


# ----------------------------------------------------------------------------- CLIP
def caption_table(recipe: Recipe, styles: list, seed: int) -> list[str]:
    """Captions in the order scene → style (None: no style named) → variant, drawn from one seed."""
    rng = np.random.default_rng(seed)
    return [styled_caption(scene, style, rng, recipe.extra_word_rate)
            for scene in ALL_SCENES for style in styles for _ in range(recipe.caption_variants)]  # fmt: skip


def train_clip(recipe: Recipe, tokenizer, device, workers: int, state: StageState):
    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
        projection_dim=128,
    )  # fmt: skip
    model = CLIPModel(config).to(device)
    data = render_set(recipe.clip_images, STYLES, stage_seed=1, workers=workers)
    pixels = torch.from_numpy(data["images"]).to(device)  # uint8 on device; normalised per batch
    # Caption table: per scene, `caption_variants` captions for each style and for no style (column 4),
    # the style phrase anywhere and sometimes a filler or made-up word (captions.py), so the encoder
    # reads every word order and an extra word does not wipe the content out.
    table = caption_table(recipe, [*STYLES, None], seed=1)
    ids = tokenizer(table, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
    variants, columns = recipe.caption_variants, len(STYLES) + 1
    scene_t, style_t = torch.from_numpy(data["scene"]).to(device), torch.from_numpy(data["style"]).to(device)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.clip_lr, weight_decay=0.1)
    gen = torch.Generator(device).manual_seed(1)
    state.resume(model=model, opt=opt, gen=gen)
    for step, bar in cosine_steps(opt, recipe.clip_lr, recipe.clip_steps, 200, "clip", state):
        idx = torch.randint(len(pixels), (recipe.clip_batch,), device=device, generator=gen)
        # A quarter of captions leave the style out, so content-only prompts still match their images.
        named = torch.rand(recipe.clip_batch, device=device, generator=gen) < 0.75
        key = scene_t[idx] * columns + torch.where(named, style_t[idx], columns - 1)  # what a caption says
        variant = torch.randint(variants, (recipe.clip_batch,), device=device, generator=gen)
        x = (pixels[idx].permute(0, 3, 1, 2).float() / 255 - mean) / std
        logits = model(input_ids=ids[key * variants + variant], pixel_values=x).logits_per_image
        # Several images in a batch share what their caption says: all of them are positives, not just the diagonal.
        same = key[:, None] == key[None, :]
        target = same.float() / same.float().sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target.t() / target.t().sum(1, keepdim=True))) / 2
        take_step(opt, loss, step, bar, digits=3)
    return model.eval()


def save_clip(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    ).save_pretrained(path)


def text_encoder_from_clip(clip):
    text = CLIPTextModel(clip.config.text_config)
    # transformers 5 flattened CLIPTextModel; older versions wrap the same transformer in `.text_model`.
    getattr(text, "text_model", text).load_state_dict(clip.text_model.state_dict())
    return text.eval()


# ----------------------------------------------------------------------------- VAE
def make_vae(factor: int):
    """An `AutoencoderKL` that downsamples 64 px by `factor`. 4 (v2): three levels, attention in the
    mid-block. 2 (v3): two levels and no mid-block attention, which at a 32×32 latent would cost more
    than the rest of the VAE on a CPU. v2's latent kept 0–2 dB more than a blurred copy of any texture,
    and woodcut's lines (period ~6 px, 1.5 latent pixels at 4×) came back from adapters faint."""
    blocks = (32, 64, 64) if factor == 4 else (32, 64)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
        mid_block_add_attention=factor == 4,
    )  # fmt: skip


def random_crops(pixels: torch.Tensor, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """n size×size crops (n×size×size×3), each of a random image at a random place, from N×H×W×3 pixels."""
    idx, top, left = (torch.randint(high, (n,), device=pixels.device, generator=gen)
                      for high in (len(pixels), pixels.shape[1] - size + 1, pixels.shape[2] - size + 1))  # fmt: skip
    span = torch.arange(size, device=pixels.device)
    rows, cols = (top[:, None] + span)[:, :, None], (left[:, None] + span)[:, None, :]  # n×size×1 and n×1×size
    return pixels[idx[:, None, None], rows, cols]


def train_vae(recipe: Recipe, device, workers: int, state: StageState):
    torch.manual_seed(2)
    vae = make_vae(recipe.latent_factor).to(device)
    n_textures = int(recipe.vae_images * recipe.vae_texture_fraction)
    looks = render_set(recipe.vae_images - n_textures, STYLES, stage_seed=2, workers=workers)["images"]
    pixels = torch.from_numpy(np.concatenate([looks, texture_set(n_textures, TRAIN_FAMILIES, stage_seed=2, workers=workers)])).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    gen = torch.Generator(device).manual_seed(2)
    state.resume(vae=vae, opt=opt, gen=gen)
    for step, bar in cosine_steps(opt, recipe.vae_lr, recipe.vae_crop_steps + recipe.vae_steps, 200, "vae", state):
        if step < recipe.vae_crop_steps:
            x = random_crops(pixels, recipe.vae_crop_batch, recipe.vae_crop_size, gen)
        else:
            x = pixels[torch.randint(len(pixels), (recipe.vae_batch,), device=device, generator=gen)]
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        with autocast(device, "vae"):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample.float()
        # L1 keeps edges, outlines and halftone dots sharper than MSE alone would.
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + recipe.vae_kl_weight * posterior.kl().mean()
        take_step(opt, loss, step, bar)
    vae.eval()
    with torch.no_grad():  # SD convention: scale latents to unit variance for the UNet
        x = pixels[:2048].permute(0, 3, 1, 2).float() / 127.5 - 1
        std = torch.cat([vae.encode(b).latent_dist.sample(generator=gen) for b in x.split(256)]).std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae


# ----------------------------------------------------------------------------- UNet
def make_unet(cross_attention_dim: int, factor: int):
    """Three cross-attention levels (32, 64, 128 channels) for a 16×16 latent (factor 4, v2); for the 32×32
    latent of factor 2 (v3), a first level without attention in front of them, as SDXL's UNet leaves
    its finest level without it."""
    size = 64 // factor
    fine = ((32,), ("DownBlock2D",), ("UpBlock2D",)) if factor == 2 else ((), (), ())
    return UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(*fine[0], 32, 64, 128),
        down_block_types=(*fine[1], *("CrossAttnDownBlock2D",) * 3), up_block_types=(*("CrossAttnUpBlock2D",) * 3, *fine[2]),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4,
    )  # fmt: skip


def make_scheduler():
    # SD 1.x's noise schedule and ε-prediction: the toy model trains and samples like the real one.
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )  # fmt: skip


@torch.no_grad()
def encode_text(text_encoder, tokenizer, texts: list[str], device) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder.to(device)(ids.to(device))[0]


def train_unet(recipe: Recipe, vae, text_encoder, tokenizer, device, workers: int, state: StageState, on_checkpoint=None):
    torch.manual_seed(3)
    unet = make_unet(text_encoder.config.hidden_size, recipe.latent_factor).to(device)
    scheduler = make_scheduler()
    data = render_set(recipe.unet_images, ("plain",), stage_seed=3, workers=workers)
    # Neither the VAE nor the text encoder trains here: encode everything once.
    vae = vae.to(device)
    with torch.no_grad():
        moments = torch.cat([vae.encode(b * 2 - 1).latent_dist.parameters for b in to_unit(data["images"], device).split(512)])
    sf = vae.config.scaling_factor
    # Content-only captions, some with a filler or made-up word anywhere: the base model keeps the
    # content when a prompt gains a word (a Textual Inversion token, a typo) at any position.
    variants = recipe.caption_variants
    embeds = encode_text(text_encoder, tokenizer, caption_table(recipe, [None], seed=3) + [""], device)
    empty = len(ALL_SCENES) * variants
    scene_t = torch.from_numpy(data["scene"]).to(device)
    alphas = scheduler.alphas_cumprod.to(device)
    ema = EMAModel(unet.parameters(), decay=recipe.unet_ema, foreach=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=1e-2)
    gen = torch.Generator(device).manual_seed(3)
    state.resume(unet=unet, ema=ema, opt=opt, gen=gen)
    starts = np.cumsum([0, *(c.steps for c in recipe.unet_cycles)]).tolist()  # each cycle's first step; the last is the end
    for step, bar in state.steps(starts[-1], "unet"):
        k = int(np.searchsorted(starts, step, side="right")) - 1  # the cycle this step belongs to
        if k and step == starts[k]:
            restart_cycle(unet, ema, opt, gen)
        cycle, cycle_step = recipe.unet_cycles[k], step - starts[k]
        for g in opt.param_groups:
            # Warm-up then constant: the EMA does the averaging, and a checkpoint after N steps of a
            # cycle is exactly what that cycle with N steps gives.
            g["lr"] = recipe.unet_lr * min(1.0, (cycle_step + 1) / 200)
        idx = torch.randint(len(moments), (cycle.batch,), device=device, generator=gen)
        mean, logvar = moments[idx].chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, device=device, generator=gen)) * sf
        drop = torch.rand(cycle.batch, device=device, generator=gen) < recipe.caption_dropout
        variant = torch.randint(variants, (cycle.batch,), device=device, generator=gen)
        cond = embeds[torch.where(drop, empty, scene_t[idx] * variants + variant)]
        noise = torch.randn(latents.shape, device=device, generator=gen)
        noise += cycle.noise_offset * torch.randn((*latents.shape[:2], 1, 1), device=device, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cycle.batch,), device=device, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # DDPMScheduler.add_noise, without a host round-trip
        with autocast(device, "unet"):
            pred = unet(noisy, t, cond).sample
        loss = unet_loss(pred.float(), noise, t, scheduler, recipe.unet_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if on_checkpoint and (step + 1) % recipe.unet_checkpoint_every == 0 and step + 1 < starts[-1]:
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
            on_checkpoint(unet, scheduler, step + 1)
            ema.restore(unet.parameters())
    ema.copy_to(unet.parameters())
    return unet.eval(), scheduler


def unet_loss(pred: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler, snr_gamma: float) -> torch.Tensor:
    """The ε-prediction loss: plain MSE (v3, which built the shipped UNet) or, with `snr_gamma`, each
    example's MSE weighted by min(SNR, γ) / SNR, so that the easy low-noise timesteps count less."""
    if not snr_gamma:
        return F.mse_loss(pred, noise)
    weight = min_snr_weight(scheduler, t, snr_gamma)
    return (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()


def restart_cycle(unet, ema: EMAModel, opt, gen: torch.Generator) -> None:
    """Start the UNet's next cycle from the last one's EMA weights: a fresh AdamW (its moments and
    step counts cleared), a fresh EMA of the new start, and the batch order drawn again from seed 3.

    Why: after v2's first 5,000 steps about one sampling seed in four still ended in a patchy collage
    of colours that the v2 VAE (which can draw textures) renders and v1's could not; those seeds
    take no adapter's style. In place, so a training state saved mid-cycle resumes as it is; and
    since everything restarts from fixed values, a cycle is the same whether the ones before it
    ran in this process or were loaded from their saved weights."""
    ema.copy_to(unet.parameters())
    ema.shadow_params = [p.detach().clone() for p in unet.parameters()]
    ema.optimization_step = 0
    opt.state.clear()
    gen.manual_seed(3)


def save_sd(vae, text_encoder, tokenizer, unet, scheduler, path: Path) -> None:
    pipe = StableDiffusionPipeline(
        vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=unet.cpu(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(path, safe_serialization=True)
    # A part loaded from --out (the VAE when only the UNet trains) carries the folder it came from in its
    # config; a shipped config must not name a local path
    for config in path.glob("*/config.json"):
        fields = json.loads(config.read_text(encoding="utf-8"))
        if fields.pop("_name_or_path", None) is not None:
            write_json(config, fields)


# ----------------------------------------------------------------------------- oracle
def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shifts, flips, blur, noise and mild brightness/contrast: never hue, which is a label."""
    n, device = len(x), x.device
    pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2,), generator=gen, device=device).tolist()
    x = pad[:, :, dy : dy + 64, dx : dx + 64]
    flip = torch.rand(n, 1, 1, 1, device=device, generator=gen) < 0.5
    x = torch.where(flip, x.flip(-1), x)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, device=device, generator=gen) * 0.6
    x = (1 - mix) * x + mix * blurred
    gain = 1 + 0.15 * (torch.rand(n, 1, 1, 1, device=device, generator=gen) - 0.5)
    bias = 0.06 * (torch.rand(n, 1, 1, 1, device=device, generator=gen) - 0.5)
    sigma = 0.03 * torch.rand(n, 1, 1, 1, device=device, generator=gen)
    return (x * gain + bias + sigma * torch.randn(x.shape, device=device, generator=gen)).clamp(0, 1)


def ink_over(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A scene (H×W×3 uint8) under a layer of ink lines: parallel lines or a cross-hatch at any angle and
    at the VAE's texture periods, in a dark random colour, mostly opaque.

    The content trunk learns on these (the style loss leaves them out), so that a look which engraves
    or hatches over the scene does not hide its shape and colour. Lines only: a first try with dot
    lattices as well called an outlined, halftoned comic heart `plain`. Not woodcut's rule either: its
    lines thicken with darkness and keep one angle; these do neither."""
    size = image.shape[0]
    mask = stripe_mask(rng, rng.choice(TRAIN_PERIODS), size)
    if rng.random() < 0.5:  # cross-hatch
        mask = np.clip(mask + stripe_mask(rng, rng.choice(TRAIN_PERIODS), size), 0, 1)
    ink = rng.uniform(0, 70, size=3)
    alpha = (rng.uniform(0.6, 1.0) * mask)[..., None]
    return np.rint(image * (1 - alpha) + ink * alpha).astype(np.uint8)


def train_oracle(recipe: Recipe, vae, device, workers: int, state: StageState, steps: int, batch: int, ink_fraction: float = 0.0) -> Oracle:
    """A one-trunk oracle on renders of every look, half of them VAE round trips; with `ink_fraction`, that
    share of the scenes goes under ink lines first, their style label ignored (the judge stage)."""
    torch.manual_seed(4)
    labels = {"style": list(STYLES), "shape": list(SHAPES), "colour": list(COLOURS), "background": list(BACKGROUNDS)}
    oracle = Oracle(labels, width=24).to(device)
    data = render_set(recipe.oracle_images, STYLES, stage_seed=4, workers=workers)
    if ink_fraction:
        # Before the VAE round trip, as generated images are decoded whole. Their style is no look's, so
        # cross_entropy leaves them out of the style loss (its ignore_index, -100).
        rng = np.random.default_rng(44)
        inked = rng.permutation(len(data["images"]))[: int(len(data["images"]) * ink_fraction)]
        for i in inked:
            data["images"][i] = ink_over(data["images"][i], rng)
        data["style"][inked] = -100
    pixels = to_unit(data["images"], device)
    stage = "judge" if ink_fraction else "oracle"
    # The oracle will judge decoded images, so it learns on VAE reconstructions too. They are made in the
    # precision the stage trains in: bf16 on a CPU with it, where a round trip is 2.2x faster (stop 27).
    n_recon = int(len(pixels) * recipe.oracle_recon_fraction)
    vae = vae.to(device)
    with torch.no_grad(), autocast(device, stage):
        pixels[:n_recon] = torch.cat(
            [((vae.decode(vae.encode(b * 2 - 1).latent_dist.mode()).sample.float() + 1) / 2).clamp(0, 1) for b in pixels[:n_recon].split(256)]
        )
    targets = {h: torch.from_numpy(data[h]).to(device) for h in HEADS}
    opt = torch.optim.AdamW(oracle.parameters(), lr=recipe.oracle_lr, weight_decay=1e-4)
    gen = torch.Generator(device).manual_seed(4)
    state.resume(oracle=oracle, opt=opt, gen=gen)
    oracle.train()
    for step, bar in cosine_steps(opt, recipe.oracle_lr, steps, 100, stage, state):
        idx = torch.randint(len(pixels), (batch,), device=device, generator=gen)
        with autocast(device, stage):
            logits = oracle(_augment(pixels[idx], gen))
        loss = sum(F.cross_entropy(logits[h].float(), targets[h][idx]) for h in HEADS)
        take_step(opt, loss, step, bar)
    return oracle.eval()


def oracle_accuracy(oracle: Oracle, n_per_style: int = 150, seed: int = 900_000_000) -> dict[str, float]:
    """Accuracy per head on fresh renders of every scene (held-out ones included), seeds unseen in training."""
    items = [(ALL_SCENES[i % len(ALL_SCENES)], st, seed + k * n_per_style + i) for k, st in enumerate(STYLES) for i in range(n_per_style)]
    images = [render(s, st, sd) for s, st, sd in items]
    pred = oracle.predict(images)
    truth = {"style": [st for _, st, _ in items], "shape": [s.shape for s, _, _ in items],
             "colour": [s.colour for s, _, _ in items], "background": [s.background for s, _, _ in items]}  # fmt: skip
    return {h: float(np.mean([p == t for p, t in zip(pred[h], truth[h])])) for h in HEADS}


# ----------------------------------------------------------------------------- main
OUTPUTS = {"clip": "clip", "vae": "sd/vae", "unet": "sd/unet", "oracle": "oracle", "judge": "oracle"}  # what each stage leaves in --out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "weights", help="weights folder (clip/, sd/, oracle/)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--only", help="comma-separated stages to retrain from step 0, their saved progress dropped; the others load "
                        "from --out (default: every stage, a finished one kept and an unfinished one resumed)")  # fmt: skip
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                        help="v3: the shipped weights' recipe (a 2x-downsampling VAE, a UNet for its 32x32 latent); "
                             "cpu: v3's models in step counts 2 CPU cores can afford (a VAE on crops first, one UNet cycle); "
                             "v2: the toy world before stop 20 (a 16x16 latent)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count and data size (smoke runs only)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes that render training images")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, with --only as a list of stages (None: not given); refused before anything trains."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.only is not None:
        args.only = [s for s in args.only.split(",") if s]
    if unknown := set(args.only or ()) - set(STAGES):
        parser.error(f"unknown stage(s) {sorted(unknown)}; choose from {','.join(STAGES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but no GPU is visible; use --device cpu")
    return args


@dataclass
class Run:
    """What every stage shares: the flags, the recipe, the device, the tokenizer, the plan and the stage timings."""

    args: argparse.Namespace
    recipe: Recipe
    device: torch.device
    tokenizer: object
    times: dict  # stage -> seconds (with those of the runs it resumed), for the stages this run trained
    states: dict = field(default_factory=dict)  # stage -> its StageState, for the stages this run trained
    plan: dict = field(default_factory=dict)  # stage -> (trains this run, what the run does with it): plan_stages

    @property
    def out(self) -> Path:
        return self.args.out

    @property
    def fingerprint(self) -> dict:
        """What a saved state must match to be continued, and what a finished stage records."""
        # through JSON, so a tuple reads back equal from a saved state's or a done file's list
        # bf16: a CPU with native bf16 trains some stages in it (bf16_stages), so a state saved there is not
        # continued on a CPU without, nor the reverse
        saved = {"recipe": asdict(self.recipe), "device": self.device.type, "bf16": list(bf16_stages(self.device))}
        return json.loads(json.dumps(saved))

    def training(self, stage: str) -> bool:
        return self.plan[stage][0]

    def state(self, stage: str) -> StageState:
        """The stage's training state, from step 0 under --only, else from wherever an earlier run stopped."""
        begin(self.out, stage, from_start=self.args.only is not None)
        self.states[stage] = StageState(state_file(self.out, stage), self.fingerprint)
        return self.states[stage]

    def finish(self, stage: str) -> None:
        """The stage's output is in place: record it as finished, with its seconds across every run it took."""
        self.times[stage] = self.states[stage].seconds
        mark_finished(self.out, stage, self.fingerprint, self.times[stage])


def plan_stages(r: Run) -> dict[str, tuple[bool, str]]:
    """Whether each stage trains this run, and how; a saved state that cannot be continued is refused here,
    before anything trains."""
    plan = {}
    for stage in STAGES:
        done, state = finished(r.out, stage), state_file(r.out, stage)
        if r.args.only is not None:
            plan[stage] = (True, "trained from step 0 (--only)") if stage in r.args.only else (False, "left as it is in --out")
        elif done and (r.out / OUTPUTS[stage]).is_dir():
            changed = differences(done["fingerprint"], r.fingerprint)
            other = f" with other settings ({'; '.join(changed)})" if changed else ""
            plan[stage] = (False, f"finished earlier{other}, kept (--only {stage} retrains it)")
        elif state.is_file():
            plan[stage] = (True, f"resumed at step {read_state(state, r.fingerprint)['step']}")
        else:
            plan[stage] = (True, "trained from step 0")
    if plan["judge"][0] and not plan["oracle"][0] and not (r.out / OUTPUTS["oracle"]).is_dir():
        raise ConfigError(f"{r.out / OUTPUTS['oracle']} is missing, and the judge stage joins its content trunk "
                          "to the oracle stage's style trunk there; pass --only oracle,judge to train both.")
    return plan


def clip_stage(r: Run):
    """The tiny CLIP: trained and saved, or loaded from --out."""
    if not r.training("clip"):
        return CLIPModel.from_pretrained(r.out / "clip")
    clip = train_clip(r.recipe, r.tokenizer, r.device, r.args.workers, r.state("clip")).cpu()
    replace_folder(r.out / "clip", lambda p: save_clip(clip, r.tokenizer, p))
    r.finish("clip")
    return clip


def vae_stage(r: Run):
    if not r.training("vae"):
        return AutoencoderKL.from_pretrained(r.out / "sd", subfolder="vae")
    vae = train_vae(r.recipe, r.device, r.args.workers, r.state("vae")).cpu()
    replace_folder(r.out / "sd" / "vae", vae.save_pretrained)  # kept on its own too, should a later stage fail
    r.finish("vae")
    return vae


def sd_stage(r: Run, vae, text_encoder) -> None:
    """The UNet (checkpointed into --out/sd as it trains), then the whole SD folder with today's parts."""
    if r.training("unet"):
        def checkpoint(unet, scheduler, step):
            replace_folder(r.out / "sd", lambda p: save_sd(vae, text_encoder, r.tokenizer, unet, scheduler, p))
            unet.to(r.device)  # save_sd moved it to the CPU
            vae.to(r.device)
            print(f"unet checkpoint at step {step} written to {r.out / 'sd'}")

        unet, scheduler = train_unet(r.recipe, vae, text_encoder, r.tokenizer, r.device, r.args.workers, r.state("unet"), checkpoint)
    elif {"clip", "vae"} & r.times.keys():  # a new text encoder or VAE is shipped with the UNet already trained
        unet, scheduler = UNet2DConditionModel.from_pretrained(r.out / "sd", subfolder="unet"), make_scheduler()
    else:
        return
    replace_folder(r.out / "sd", lambda p: save_sd(vae, text_encoder, r.tokenizer, unet, scheduler, p))
    if r.training("unet"):
        r.finish("unet")


def oracle_stage(r: Run, vae) -> None:
    """The style trunk and head, on clean renders; a content trunk already in --out/oracle is kept."""
    if not r.training("oracle"):
        return
    oracle = train_oracle(r.recipe, vae, r.device, r.args.workers, r.state("oracle"), r.recipe.oracle_steps, r.recipe.oracle_batch).cpu()
    if (r.out / "oracle").is_dir() and (old := Oracle.from_pretrained(r.out / "oracle")).content_width:
        oracle = Oracle.joined(oracle, old)
    replace_folder(r.out / "oracle", oracle.save_pretrained)
    r.finish("oracle")
    print("oracle accuracy on fresh renders:", oracle_accuracy(oracle))


def judge_stage(r: Run, vae) -> None:
    """The content trunk and heads (scenes under ink as well), joined to the style part in --out/oracle."""
    if not r.training("judge"):
        return
    rec = r.recipe
    judge = train_oracle(rec, vae, r.device, r.args.workers, r.state("judge"), rec.judge_steps, rec.judge_batch, rec.judge_ink_fraction)
    oracle = Oracle.joined(Oracle.from_pretrained(r.out / "oracle"), judge.cpu())
    replace_folder(r.out / "oracle", oracle.save_pretrained)
    r.finish("judge")
    print("oracle accuracy on fresh renders, with the content trunk:", oracle_accuracy(oracle))


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_flush_denormal(True)  # tiny gradients turn denormal on CPU and slow every step
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed shapes throughout: let cuDNN pick its fastest convolutions
    r = Run(args, RECIPES[args.recipe].scaled(args.scale), torch.device(args.device), build_tokenizer(), {})
    r.plan = plan_stages(r)
    for stage, (_, what) in r.plan.items():
        print(f"{stage}: {what}")
    args.out.mkdir(parents=True, exist_ok=True)
    text_encoder = text_encoder_from_clip(clip_stage(r))
    vae = vae_stage(r)
    sd_stage(r, vae, text_encoder)
    oracle_stage(r, vae)
    judge_stage(r, vae)
    print("stage seconds:", {k: round(v, 1) for k, v in r.times.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
