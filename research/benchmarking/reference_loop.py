"""The reference loop `make bench` sets our training against: LoRA training written the plain way.

Its shape follows diffusers' examples/text_to_image/train_text_to_image_lora.py, the script most
people start from: a torch DataLoader runs the image transforms (resize, crop, flip, normalise) for
every batch, the frozen VAE encodes every batch and the frozen text encoder embeds every caption at
every step (nothing cached), noise and timesteps are drawn per step, and the loss is read back to
the host every step for the progress bar. Frozen base weights sit in the mixed-precision dtype,
trainable LoRA weights in fp32, exactly as in ours.

Only the loop differs from ours: the trainable LoRA (targets, rank, alpha, initialisation) is made
by the same method setup, from the same model, config and images, so both train the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from research.config import TrainConfig
from research.data import style_folder_for
from research.methods import Components, get_method
from research.models import load_pipeline, pick_device, pick_precision, weight_dtype
from research.training.loop import Hook, StepInfo, peak_memory_mb


class CaptionedImages(Dataset):
    """The style folder's training images, transformed on every access as the example's dataset is."""

    def __init__(self, cfg: TrainConfig, tokenizer):
        self.examples = style_folder_for(cfg).train
        crop = transforms.CenterCrop(cfg.resolution) if cfg.center_crop else transforms.RandomCrop(cfg.resolution)
        flip = transforms.RandomHorizontalFlip() if cfg.random_flip else transforms.Lambda(lambda x: x)
        self.transform = transforms.Compose([
            transforms.Resize(cfg.resolution, interpolation=transforms.InterpolationMode.BILINEAR), crop, flip,
            transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
        # the example tokenizes once when the dataset is built; the text encoder still runs every step
        self.input_ids = tokenizer([e.caption for e in self.examples], padding="max_length", truncation=True,
                                   max_length=tokenizer.model_max_length, return_tensors="pt").input_ids

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.transform(self.examples[i].image), "input_ids": self.input_ids[i]}


def reference_train(cfg: TrainConfig, hooks: list[Hook] = ()) -> dict:
    """Train cfg.max_train_steps LoRA steps the plain way; hooks get on_step after every optimizer step."""
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.mixed_precision, device)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              cpu=device.type == "cpu")
    torch.manual_seed(cfg.seed)
    dtype = weight_dtype(precision)
    c = Components.from_pipeline(load_pipeline(cfg.base_model, dtype))
    param_groups = get_method(cfg).setup(c)
    for module in (c.unet, c.vae, c.text_encoder):
        module.to(accelerator.device)
    loader = DataLoader(CaptionedImages(cfg, c.tokenizer), batch_size=cfg.train_batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=cfg.adam_weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps, num_cycles=cfg.lr_num_cycles)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(c.unet, optimizer, loader, lr_scheduler)
    unet.train()
    step, train_loss = 0, 0.0
    while step < cfg.max_train_steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                loss = _loss(cfg, c, unet, batch, dtype)
                # the example logs the gathered mean loss every step: one host sync per step
                train_loss += accelerator.gather(loss.repeat(len(batch["input_ids"]))).mean().item()
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_([p for g in param_groups for p in g["params"]], cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                for hook in hooks:
                    hook.on_step(StepInfo(step), c)
                if step >= cfg.max_train_steps:
                    break
    return {"peak_memory_mb": peak_memory_mb(accelerator.device), "train_loss": train_loss / max(step, 1)}


def _loss(cfg: TrainConfig, c: Components, unet, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    """One batch's min-SNR-weighted diffusion loss, encoding images and captions afresh."""
    sched = c.noise_scheduler
    latents = c.vae.encode(batch["pixel_values"].to(dtype)).latent_dist.sample() * c.vae.config.scaling_factor
    noise = torch.randn_like(latents)
    if cfg.noise_offset:
        noise += cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
    noisy = sched.add_noise(latents, noise, timesteps)
    hidden = c.text_encoder(batch["input_ids"], return_dict=False)[0]
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
    pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
    if not cfg.snr_gamma:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    snr = compute_snr(sched, timesteps)
    weights = torch.stack([snr, cfg.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / snr if sched.config.prediction_type == "epsilon" else weights / (snr + 1)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (loss * weights).mean()
