"""DreamBooth: fine-tune every UNet weight; the text encoder and the VAE stay frozen (so caption
embeddings and latents are cached), optionally with prior preservation.

Prior preservation (``--with-prior-preservation``): before training, the base model generates
``--num-class-images`` images of ``--class-prompt`` (seeded, saved in ``<run>/class_images/`` and
reused on resume); every batch then also holds as many class examples, and
loss = instance loss + ``--prior-loss-weight`` * class loss, so the fine-tune keeps what the base
model knew about the class. The loop mixes them in through the generic ``extra_batches`` hook.

Saved as a diffusers UNet folder ``checkpoints/unet/`` (``save_pretrained``: config.json +
diffusion_pytorch_model.safetensors, fp32 because lr-5e-6 updates vanish in bf16), with the
resolved run config under ``_research_config`` in its config.json (diffusers drops ``_`` keys on
load). Cost notes for SD 1.5 (860M UNet parameters): the artifact is ~3.4 GB, and every resumable
state holds the weights plus Adam's two moments, ~10 GB; ``--checkpoints-total-limit`` bounds how
many are kept and ``--checkpointing-steps 0`` writes none.

A method (see base.py): it sits on the blocks (sampling builds the base model's class images) and
below the training loop, which it never imports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import cast_training_params

from research.atomic import write_json
from research.methods.base import Components, ExtraBatches, Method, encode_images
from research.sampling import MANIFEST, load_set, plan_jobs, sample_components, save_set

log = logging.getLogger("research")
CLASS_IMAGES = "class_images"


class DreamBooth(Method):
    name = "dreambooth"
    unet_folder = "unet"  # the saved UNet: checkpoints/unet/ (a diffusers model folder)
    #: checkpoint paths kept once, in the run folder: MLflow gets a pointer file instead of a 3.4 GB copy
    stored_once = ("unet/",)
    pointer_name = "unet_location.json"

    def trainable_modules(self, c: Components) -> dict[str, torch.nn.Module]:
        return {"unet": c.unet}

    def setup(self, c: Components) -> list[dict]:
        c.vae.requires_grad_(False)
        c.text_encoder.requires_grad_(False)
        c.unet.requires_grad_(True)
        # the base may sit in bf16/fp16; the weights that train (here: all of the UNet) stay fp32
        cast_training_params(c.unet, dtype=torch.float32)
        params = [p for p in c.unet.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        state_gb = n * 4 * 3 / 1e9  # fp32 weights + Adam's two moments
        if self.cfg.checkpointing_steps:
            log.warning("dreambooth: each resumable state is ~%.2f GB (weights + Adam moments); at most %d kept "
                        "(--checkpoints-total-limit), --checkpointing-steps 0 writes none", state_gb,
                        max(self.cfg.checkpoints_total_limit, 1))
        return [{"params": params, "lr": self.cfg.learning_rate}]

    # ─── prior preservation ──────────────────────────────────────────────────────────────────
    def extra_batches(self, c: Components, run_dir: Path) -> ExtraBatches | None:
        """Class images from the base model (before any step), as cached latents + class-prompt embeddings."""
        if not self.cfg.with_prior_preservation:
            return None
        folder = Path(run_dir) / CLASS_IMAGES
        images = self._class_images(c, folder)
        device = c.unet.device
        latents = encode_images(c.vae, images, self.cfg.resolution)
        with torch.no_grad():
            ids = c.tokenizer([self.cfg.class_prompt], padding="max_length", max_length=c.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(device)
            hidden = c.text_encoder(ids)[0]
        log.info("prior preservation: %d class images of %r, weight %g", len(images), self.cfg.class_prompt,
                 self.cfg.prior_loss_weight)
        return ExtraBatches(latents=latents, hidden=hidden, weight=self.cfg.prior_loss_weight)

    def _class_images(self, c: Components, folder: Path) -> list:
        # seeds apart from the evaluation seeds (cfg.seed + k), so class and eval images never share noise
        jobs = plan_jobs([self.cfg.class_prompt], self.cfg.num_class_images, self.cfg.seed + 100_000)
        if (folder / MANIFEST).is_file():  # a resumed run reuses the images it generated before its first step
            images, saved = load_set(folder)
            if saved == jobs:
                return images
        # the prior is the base model as it is: its own prediction type, not the one this run trains
        images = sample_components(c, jobs, self.cfg, "class images", scheduler_config=c.base_scheduler_config)
        save_set(images, jobs, folder)
        return images

    # ─── artifact ────────────────────────────────────────────────────────────────────────────
    def save(self, c: Components, checkpoint_dir: Path, metadata: dict[str, str]) -> list[Path]:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        final = checkpoint_dir / self.unet_folder
        tmp = checkpoint_dir / f".tmp-{self.unet_folder}"
        shutil.rmtree(tmp, ignore_errors=True)
        c.unet.save_pretrained(tmp, safe_serialization=True)
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        config["_research_config"] = json.loads(metadata["research_config"])  # the config travels with the weights
        write_json(config_file, config)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a killed save never looks like a finished one
        files = sorted(p for p in final.iterdir() if p.is_file())
        # MLflow gets this pointer, not a second copy of the weights (see stored_once and train.run)
        write_json(checkpoint_dir / self.pointer_name, {
            "path": str(final.resolve()),
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
            "load": "UNet2DConditionModel.from_pretrained(path); pipe.unet = unet"})
        return files

    def load_into(self, pipe, checkpoint_dir: Path, scale: float = 1.0) -> None:
        if scale != 1.0:
            raise ValueError(f"A DreamBooth UNet replaces the base UNet; load it with scale 1, not {scale}.")
        unet = UNet2DConditionModel.from_pretrained(checkpoint_dir / self.unet_folder, dtype=pipe.unet.dtype,
                                                    use_safetensors=True)
        pipe.unet = unet.to(pipe.device)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
