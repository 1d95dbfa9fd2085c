"""Load a base Stable Diffusion 1.x model from any source, and the precision/device policy.

Sources: a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), a local diffusers folder, a
single ``.safetensors`` checkpoint, or ``embedded`` (the toy-world model this project ships). All
go through the same diffusers classes; nothing downstream knows which one it got.

A building block (on errors and the toy world's weight paths). diffusers is imported inside the functions
that build pipelines: the metrics import this module for hf_offline alone and must not pay for diffusers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from research.errors import BrokenModelError, ConfigError, ModelNotFoundError
from research.toyworld import SD_DIR

EMBEDDED = "embedded"


def embedded_model_dir() -> Path:
    return Path(SD_DIR)


def resolve_base_model(base_model: str) -> str:
    if base_model == EMBEDDED:
        path = embedded_model_dir()
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"The embedded toy model is missing at {path}; run `make toyworld` to rebuild it.")
        return str(path)
    return base_model


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelNotFoundError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu.")
    return torch.device(device)


def pick_precision(mixed_precision: str, device: torch.device) -> str:
    """bf16 on GPUs that support it, else fp16 on GPU, and full precision on CPU."""
    if mixed_precision != "auto":
        return mixed_precision
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def weight_dtype(precision: str) -> torch.dtype:
    """dtype of the frozen base weights; trainable weights always stay fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def hf_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub spells it, read at call time (the hub reads its copy once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def load_pipeline(base_model: str, dtype: torch.dtype = torch.float32):
    """Return a ``StableDiffusionPipeline`` on CPU in `dtype`, or raise one clear error: a local file or
    folder that exists but does not load is broken (BrokenModelError); a hub id that cannot be fetched
    is missing (ModelNotFoundError)."""
    # deferred: diffusers takes seconds to import; a refused flag answers before it
    from diffusers import StableDiffusionPipeline

    source = resolve_base_model(base_model)
    path = Path(source)
    kwargs = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    local = path.exists() or source.startswith((".", "/"))
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise ModelNotFoundError(f"Checkpoint file {path} does not exist; fix --base-model.")
    elif local and not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"{path} is not a diffusers model folder (no model_index.json); "
                                 "pass a diffusers folder, a .safetensors checkpoint or a hub id to --base-model.")
    try:
        if path.suffix == ".safetensors":
            return StableDiffusionPipeline.from_single_file(str(path), **kwargs)
        return StableDiffusionPipeline.from_pretrained(source, local_files_only=hf_offline(), use_safetensors=True,
                                                       **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _load_error(base_model, local, err) from err


def _load_error(base_model: str, local: bool, err: Exception) -> Exception:
    """Classify a failed load by what was asked for and the exception's type, never by its wording."""
    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if local:  # it is here, so downloading will not help: the file itself is damaged or incomplete
        return BrokenModelError(f"The base model {base_model!r} is broken and cannot be loaded ({detail}); "
                                "re-export or copy it again, then pass it to --base-model.")
    if isinstance(err, ValueError):  # diffusers' and huggingface_hub's check of the id's form
        return ConfigError(f"--base-model {base_model!r} is neither an existing path nor a hub id "
                           "(like stable-diffusion-v1-5/stable-diffusion-v1-5); fix --base-model.")
    if isinstance(err, OSError):  # hub errors (not cached, offline, not found, no network) are all OSErrors
        return ModelNotFoundError(f"Could not load the base model {base_model!r} ({type(err).__name__}): download it "
                                  f"on a machine with network access (e.g. `huggingface-cli download {base_model}`) "
                                  "and pass its local folder with --base-model.")
    return BrokenModelError(f"The base model {base_model!r} has an unreadable file ({type(err).__name__}: {detail}); "
                            "delete its copy in the Hugging Face cache and download it again.")


def vae_downsampling_factor(vae) -> int:
    """Pixels per latent position along each side (diffusers' `vae_scale_factor`): 2^(blocks-1), so 2 for
    the toy VAE (v3) and 8 for SD 1.5's."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_resolution(vae, unet, resolution: int) -> None:
    """The VAE shrinks images by 2^(blocks-1) and the UNet the latents by as much again: below that
    the UNet has less than one latent pixel to work on at its deepest level."""
    vae_factor = vae_downsampling_factor(vae)
    unet_factor = 2 ** (len(unet.config.down_block_types) - 1)
    smallest = vae_factor * max(unet_factor, 8)  # and at least a few latents across
    if resolution % vae_factor or resolution < smallest:
        raise ConfigError(f"--resolution {resolution} does not fit this model: use a multiple of {vae_factor} "
                          f"of at least {smallest} (its VAE shrinks images {vae_factor}x, its UNet {unet_factor}x more).")


def check_lora_targets(model: torch.nn.Module, targets: str, rank: int, flag: str) -> None:
    """The target names must match layers of the model the way peft matches them (the full name or its
    dotted tail), and the rank must fit the smallest of them; said here, not as a peft error mid-setup."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    matched = {t: [n for n in layers if n == t or n.endswith("." + t)] for t in names}
    unknown = [t for t, found in matched.items() if not found]
    if not names or unknown:
        examples = sorted({".".join(n.split(".")[-2:]) for n in layers})[:8]
        raise ConfigError(f"{flag} names no layer of the model: {unknown or targets!r}; use names such as "
                          f"{','.join(examples)}.")
    sizes = {n: _lora_dims(layers[n]) for found in matched.values() for n in found}
    smallest = min(sizes, key=lambda n: min(sizes[n]))
    limit = min(sizes[smallest])
    if rank > limit:
        raise ConfigError(f"--rank {rank} is larger than the layer {smallest} ({sizes[smallest][0]} -> "
                          f"{sizes[smallest][1]}); a LoRA rank above {limit} adds nothing there, use --rank <= {limit}.")


def _lora_dims(layer: torch.nn.Module) -> tuple[int, int]:
    if isinstance(layer, torch.nn.Conv2d):  # LoRA's down projection reads the whole kernel window
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1], layer.out_channels
    return layer.in_features, layer.out_features


PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the training loop knows how to target


def min_snr_weight(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """Each example's min-SNR-gamma loss weight (Hang et al. 2023): min(SNR, γ) / SNR for ε-prediction,
    min(SNR, γ) / (SNR + 1) for v-prediction, so the easy high-SNR (low-noise) timesteps count less.
    Used by the training loop and by the toy world's UNet pretraining."""
    from diffusers.training_utils import compute_snr  # deferred: diffusers takes seconds to import

    snr = compute_snr(scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)


def make_sampler(pipe, sampler: str, prediction_type: str = ""):
    """Swap the pipeline's sampling scheduler (training always uses DDPM with the same config).

    prediction_type: what the UNet in the pipeline predicts now (an adapter trained for v-prediction on an
    epsilon base predicts v); empty keeps the pipeline's own.
    """
    # deferred: diffusers takes seconds to import; a refused flag answers before it
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    cls = classes.get(sampler, type(pipe.scheduler))
    if sampler in classes or overrides:
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
    return pipe
