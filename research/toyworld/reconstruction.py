"""How well the toy VAE reconstructs each kind of image: PSNR of encode → decode, per family.

    python -m research.toyworld.reconstruction [--sd research/toyworld/weights/sd] [--n 64]

Families: the four looks (renders of every scene, seeds no pretraining stage uses), the procedural
families held out of VAE training (`textures.HELDOUT_FAMILIES`), smooth gradients (a training
family, at unseen seeds, without blur or sharpen), and the woodcut look that no component was
trained on (`unseen.py`). A VAE that only encodes its training looks shows it here at once.

Each family is also scored for a non-learned code of the latent's shape, the reference: average every
f×f block (f, the VAE's downsampling factor; 3 numbers per latent position where the VAE keeps 4) and
upsample bicubically. The paired margin, VAE − reference on the same images, says what the VAE learned
about a family beyond "keep a blurred copy": several dB on the looks it trained on, little on a family
whose detail it cannot code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from research.metrics.stats import summarize
from research.models import vae_downsampling_factor
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


def reference_round_trip(images: np.ndarray, factor: int) -> np.ndarray:
    """The non-learned code of the latent's shape: block means (area downsampling), then bicubic upsampling."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    coarse = F.avg_pool2d(x, factor)
    out = F.interpolate(coarse, scale_factor=factor, mode="bicubic", align_corners=False)
    return out.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB per image (images N×H×W×3 uint8)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def margin_by_family(vae, n: int = 64, families: tuple[str, ...] = FAMILIES) -> dict[str, dict]:
    """{family: {vae, reference, margin}}: mean PSNR of the VAE and of the reference code, and their paired
    difference per image (VAE − reference), each with its 95% interval over the n images."""
    factor = vae_downsampling_factor(vae)
    out = {}
    for family in families:
        images = family_images(family, n)
        learned, reference = psnr(images, round_trip(vae, images)), psnr(images, reference_round_trip(images, factor))
        out[family] = {"vae": summarize(learned), "reference": summarize(reference), "margin": summarize(learned - reference)}
    return out


def psnr_by_family(vae, n: int = 64, families: tuple[str, ...] = FAMILIES) -> dict[str, dict]:
    """{family: {mean, ci95, n}}: the VAE's mean PSNR over n images with its 95% interval (each image independent)."""
    return {family: scores["vae"] for family, scores in margin_by_family(vae, n, families).items()}


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
    factor = vae_downsampling_factor(vae)

    def cell(s: dict) -> str:
        return f"{s['mean']:.1f} [{s['ci95'][0]:.1f}, {s['ci95'][1]:.1f}]".ljust(20)

    print(f"PSNR in dB, {args.n} images per family; reference: {factor}×{factor} block means, upsampled bicubically")
    print(f"{'family':>22}  {'VAE':<20}  {'reference':<20}  {'VAE − reference':<20}")
    for family, value in margin_by_family(vae, args.n).items():
        print(f"{family:>22}  {cell(value['vae'])}  {cell(value['reference'])}  {cell(value['margin'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
