"""The small interface every training method implements.

The training loop never asks which method it runs. A method decides which parameters train
(``setup``), how their state is saved and restored (``trainable_state`` / ``load_trainable_state``
for resumable checkpoints, ``save`` for the shipped artifact) and how that artifact is put into a
fresh pipeline for sampling (``load_into``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


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
        from diffusers import DDPMScheduler

        overrides = {"prediction_type": prediction_type} if prediction_type else {}
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                   DDPMScheduler.from_config(pipe.scheduler.config, **overrides), pipe.scheduler.config)


class Method:
    name = "base"
    #: True when the text encoder and its inputs stay frozen, so caption embeddings can be cached.
    frozen_text_encoder = True
    #: file name of the main artifact inside checkpoints/
    weight_name = ""
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

    def extra_batches(self, c: Components, encode_images, run_dir: Path):
        """Extra examples mixed into every batch (research.train.ExtraBatches), or None."""
        return None

    def caption(self, text: str) -> str:
        """Rewrite a caption or prompt for this method (Textual Inversion inserts its token)."""
        return text

    def save(self, c: Components, checkpoint_dir: Path, metadata: dict[str, str]) -> list[Path]:
        raise NotImplementedError

    def load_into(self, pipe, checkpoint_dir: Path, scale: float = 1.0) -> None:
        raise NotImplementedError


def config_metadata(cfg, prediction_type: str = "") -> dict[str, str]:
    """The resolved config travels inside every saved artifact (safetensors metadata), with the prediction
    type the weights were trained for (the base model's when the config leaves it empty)."""
    return {"research_config": json.dumps(cfg.to_dict(), sort_keys=True), "research_method": cfg.method,
            "research_prediction_type": prediction_type or cfg.prediction_type}
