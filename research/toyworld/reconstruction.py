"""How well the toy VAE reconstructs each kind of image: PSNR of encode → decode, per family.

    python -m research.toyworld.reconstruction [--sd research/toyworld/weights/sd] [--n 64]

Families: the four looks (renders of every scene, seeds no pretraining stage uses), the procedural
families held out of VAE training (`textures.HELDOUT_FAMILIES`), smooth gradients (a training
family, at unseen seeds, without blur or sharpen), and the woodcut look that no component was
trained on (`unseen.py`). A VAE that only encodes its training looks shows it here at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from research.metrics.stats import summarize
from research.toyworld.render import render
from research.toyworld.scenes import ALL_SCENES
from research.toyworld.styles import STYLES
from research.toyworld.textures import HELDOUT_FAMILIES, texture
from research.toyworld.unseen import render_unseen

EVAL_SEED = 950_000_000  # above every pretraining stage's seeds (stage · 10^7 + i) and the oracle check's
FAMILIES = (*STYLES, *HELDOUT_FAMILIES, "gradient", "woodcut")


def family_images(family: str, n: int, seed: int = EVAL_SEED) -> np.ndarray:
    """n images (n×64×64×3 uint8) of one family, the same for every call."""
    if family in STYLES:
        return np.stack([np.asarray(render(ALL_SCENES[i % len(ALL_SCENES)], family, seed + i)) for i in range(n)])
    if family == "woodcut":
        return np.stack([np.asarray(render_unseen(ALL_SCENES[i % len(ALL_SCENES)], "woodcut", seed + i)) for i in range(n)])
    return np.stack([texture(family, np.random.default_rng(seed + i), filtered=False) for i in range(n)])


@torch.no_grad()
def round_trip(vae, images: np.ndarray) -> np.ndarray:
    """VAE encode (posterior mode) → decode, as uint8 images: what a generated image can hold at best."""
    device = next(vae.parameters()).device
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = torch.cat([vae.decode(vae.encode(b).latent_dist.mode()).sample for b in x.split(64)])
    return ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB per image (images N×H×W×3 uint8)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def psnr_by_family(vae, n: int = 64, families: tuple[str, ...] = FAMILIES) -> dict[str, dict]:
    """{family: {mean, ci95, n}}: mean PSNR over n images with its 95% interval (each image independent)."""
    out = {}
    for family in families:
        images = family_images(family, n)
        out[family] = summarize(psnr(images, round_trip(vae, images)))
    return out


def main(argv: list[str] | None = None) -> int:
    from diffusers import AutoencoderKL  # deferred: `--help` answers without loading diffusers

    from research.toyworld import SD_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd", type=Path, default=SD_DIR, help="toy SD folder whose vae/ to measure")
    parser.add_argument("--n", type=int, default=64, help="images per family")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("--n must be at least 2")
    vae = AutoencoderKL.from_pretrained(args.sd, subfolder="vae").eval()
    for family, value in psnr_by_family(vae, args.n).items():
        print(f"{family:>22}: {value['mean']:5.1f} dB  [{value['ci95'][0]:.1f}, {value['ci95'][1]:.1f}]  n={value['n']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
