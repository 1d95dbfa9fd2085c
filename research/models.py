"""Load a base Stable Diffusion 1.x model from any source, and the precision/device policy.

Sources: a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), a local diffusers folder, a
single ``.safetensors`` checkpoint, or ``embedded`` (the toy-world model this project ships). All
go through the same diffusers classes; nothing downstream knows which one it got.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

EMBEDDED = "embedded"


class ModelNotFoundError(RuntimeError):
    """The base model or a backbone cannot be loaded; the message names it and the fix."""


def embedded_model_dir() -> Path:
    from research.toyworld import SD_DIR  # imported lazily: only the embedded default needs it

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


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def load_pipeline(base_model: str, dtype: torch.dtype = torch.float32):
    """Return a ``StableDiffusionPipeline`` on CPU in `dtype`, or raise one clear ModelNotFoundError."""
    from diffusers import StableDiffusionPipeline

    source = resolve_base_model(base_model)
    path = Path(source)
    hint = (f"Could not load the base model {base_model!r}: download it on a machine with network access "
            f"(e.g. `huggingface-cli download {base_model}`) and pass its local folder with --base-model")
    kwargs = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise ModelNotFoundError(f"Checkpoint file {path} does not exist; fix --base-model.")
            return StableDiffusionPipeline.from_single_file(str(path), **kwargs)
        if path.exists() or source.startswith((".", "/")):
            if not (path / "model_index.json").is_file():
                raise ModelNotFoundError(f"{path} is not a diffusers model folder (no model_index.json); "
                                         "pass a diffusers folder, a .safetensors checkpoint or a hub id to --base-model.")
        return StableDiffusionPipeline.from_pretrained(source, local_files_only=_offline(), use_safetensors=True,
                                                       **kwargs)
    except ModelNotFoundError:
        raise
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelNotFoundError(f"{hint} ({type(err).__name__}).") from err
    except Exception as err:  # network errors from huggingface_hub come in many types
        if "connect" in str(err).lower() or "offline" in str(err).lower() or "resolve" in str(err).lower():
            raise ModelNotFoundError(f"{hint} ({type(err).__name__}).") from err
        raise


PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the training loop knows how to target


def make_sampler(pipe, sampler: str, prediction_type: str = ""):
    """Swap the pipeline's sampling scheduler (training always uses DDPM with the same config).

    prediction_type: what the UNet in the pipeline predicts now (an adapter trained for v-prediction on an
    epsilon base predicts v); empty keeps the pipeline's own.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    cls = classes.get(sampler, type(pipe.scheduler))
    if sampler in classes or overrides:
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
    return pipe
