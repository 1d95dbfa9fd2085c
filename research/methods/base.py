"""The small interface every training method implements, and the pieces the methods share.

The training loop never asks which method it runs. A method decides which parameters train
(``setup``), how their state is saved and restored (``trainable_state`` / ``load_trainable_state``
for resumable checkpoints, ``save`` for the shipped artifact) and how that artifact is put into a
fresh pipeline for sampling (``load_into``). The methods floor sits on the blocks (data, models,
sampling) and below the training loop; ``ExtraBatches`` and the batched VAE encoding live here
because both the loop and DreamBooth's prior preservation use them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from PIL import Image

from research.data import preprocess

ENCODE_BATCH = 8  # images per VAE call when latents are cached


@dataclass
class Components:
    """The pieces of a Stable Diffusion pipeline that training touches."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler for training: the base's config, with the prediction type trained
    base_scheduler_config: Any = None  # the base model's own scheduler config (what the base predicts)

    @classmethod
    def from_pipeline(cls, pipe, prediction_type: str = "") -> "Components":
        overrides = {"prediction_type": prediction_type} if prediction_type else {}
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                   DDPMScheduler.from_config(pipe.scheduler.config, **overrides), pipe.scheduler.config)


@dataclass
class ExtraBatches:
    """Extra examples a method mixes into every batch with their own loss weight (DreamBooth's prior
    preservation). A method that has them returns this from ``Method.extra_batches(components,
    run_dir)``; each micro-batch then draws as many extra examples as it has instance examples,
    and loss = instance loss + weight * extra loss."""

    latents: torch.Tensor  # [M, C, h, w] cached latents, on the training device
    hidden: torch.Tensor  # [M or 1, L, D] text embeddings (1 = the same prompt for all)
    weight: float


@torch.no_grad()
def vae_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents of a batch of [-1, 1] pixel tensors through the frozen VAE (in its device and dtype)."""
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample() * vae.config.scaling_factor


def encode_images(vae, images: list[Image.Image], resolution: int, *, flip: bool = False) -> torch.Tensor:
    """fp32 latents [N, C, h, w] of PIL images (center crop, optionally flipped), a few images per VAE call."""
    return torch.cat([vae_latents(vae, torch.stack([preprocess(im, resolution, flip=flip)
                                                    for im in images[i:i + ENCODE_BATCH]]))
                      for i in range(0, len(images), ENCODE_BATCH)]).float()


class Method:
    name = "base"
    #: True when nothing that shapes a caption's embedding trains, so the loop computes them once
    #: (False for Textual Inversion, whose new token rows train, and for LoRA on the text encoder)
    caches_text_embeddings = True
    #: checkpoints/ entries too large to copy into MLflow; the method writes a pointer file instead
    stored_once: tuple[str, ...] = ()

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, c: Components) -> list[dict]:
        """Freeze the base, add/unfreeze what trains, return optimizer parameter groups (fp32)."""
        raise NotImplementedError

    def trainable_modules(self, c: Components) -> dict[str, torch.nn.Module]:
        return {"unet": c.unet, "text_encoder": c.text_encoder}

    def trainable_state(self, c: Components) -> dict[str, torch.Tensor]:
        """Exact trainable tensors, for resumable checkpoints (bit-identical resume)."""
        state = {}
        for prefix, module in self.trainable_modules(c).items():
            for name, param in module.named_parameters():
                if param.requires_grad:
                    state[f"{prefix}.{name}"] = param.detach().cpu().clone()
        return state

    def load_trainable_state(self, c: Components, state: dict[str, torch.Tensor]) -> None:
        modules = self.trainable_modules(c)
        for prefix, module in modules.items():
            own = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if own:
                missing = set(own) - {n for n, _ in module.named_parameters()}
                if missing:
                    raise RuntimeError(f"checkpoint has {len(missing)} tensors this {prefix} lacks, e.g. {sorted(missing)[:2]}")
                params = dict(module.named_parameters())
                with torch.no_grad():
                    for name, value in own.items():
                        params[name].copy_(value)

    def extra_batches(self, c: Components, run_dir: Path) -> ExtraBatches | None:
        """Extra examples mixed into every batch, or None."""
        return None

    def caption(self, text: str) -> str:
        """Rewrite a caption or prompt for this method (Textual Inversion inserts its token)."""
        return text

    def save(self, c: Components, checkpoint_dir: Path, metadata: dict[str, str]) -> list[Path]:
        raise NotImplementedError

    def load_into(self, pipe, checkpoint_dir: Path, scale: float = 1.0) -> None:
        raise NotImplementedError

    def fuse(self, pipe) -> None:
        """Fold what load_into added into the base weights, for a pipeline that only samples from now on
        (an adapter kept beside the base costs every forward pass). A no-op where nothing sits beside it."""


def config_metadata(cfg, prediction_type: str = "") -> dict[str, str]:
    """The resolved config travels inside every saved artifact (safetensors metadata), with the prediction
    type the weights were trained for (the base model's when the config leaves it empty)."""
    return {"research_config": json.dumps(cfg.to_dict(), sort_keys=True), "research_method": cfg.method,
            "research_prediction_type": prediction_type or cfg.prediction_type}
