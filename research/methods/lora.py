"""LoRA on the UNet attention projections (and optionally the text encoder), with peft.

Saved as ``pytorch_lora_weights.safetensors`` in peft's keys under diffusers' component prefixes (loads with
``StableDiffusionPipeline.load_lora_weights``; rank and alpha kept in its metadata so the loaded
scale is right) and as ``lora_kohya.safetensors`` in the kohya/A1111 key format that ComfyUI and
the web UIs read.

A method (see base.py): above the blocks, below the training loop.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from research.atomic import atomic_path
from research.methods.base import Components, Method

ADAPTER = "style"


def _targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class LoRA(Method):
    name = "lora"
    weight_name = "pytorch_lora_weights.safetensors"
    kohya_name = "lora_kohya.safetensors"

    @property
    def caches_text_embeddings(self) -> bool:  # type: ignore[override]
        return not self.cfg.train_text_encoder  # LoRA on the text encoder changes every caption's embedding

    def _lora_config(self, targets: str):
        return LoraConfig(r=self.cfg.rank, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                          init_lora_weights="gaussian", target_modules=_targets(targets))

    def setup(self, c: Components) -> list[dict]:
        for module in (c.unet, c.vae, c.text_encoder):
            module.requires_grad_(False)
        c.unet.add_adapter(self._lora_config(self.cfg.unet_target_modules))
        groups = [{"params": [p for p in c.unet.parameters() if p.requires_grad], "lr": self.cfg.learning_rate}]
        if self.cfg.train_text_encoder:
            c.text_encoder.add_adapter(self._lora_config(self.cfg.text_encoder_target_modules))
            groups.append({"params": [p for p in c.text_encoder.parameters() if p.requires_grad],
                           "lr": self.cfg.text_encoder_lr})
        # the base may sit in bf16/fp16; LoRA weights and their optimizer state must stay fp32
        cast_training_params([c.unet, c.text_encoder], dtype=torch.float32)
        return groups

    def lora_state_dicts(self, c: Components) -> dict[str, dict[str, torch.Tensor]]:
        """peft's own keys (``<module>.lora_A.weight`` / ``.lora_B.weight``) for every component.

        diffusers' training examples convert these to its older names, which differ per component
        (``lora.down`` for UNet attention, ``lora_linear_layer.down`` for the text encoder, peft's for
        convs): one file would hold three schemes. load_lora_weights reads peft keys for UNet and text
        encoder alike, and so do the kohya converter and the blend, so one scheme serves all.
        """
        layers = {"unet": get_peft_model_state_dict(c.unet)}
        if self.cfg.train_text_encoder:
            layers["text_encoder"] = get_peft_model_state_dict(c.text_encoder)
        return {k: {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in v.items()}
                for k, v in layers.items()}

    def save(self, c: Components, checkpoint_dir: Path, metadata: dict[str, str]) -> list[Path]:
        layers = self.lora_state_dicts(c)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=checkpoint_dir) as tmp:
            # diffusers writes the keys and the rank/alpha metadata that load_lora_weights reads back
            StableDiffusionPipeline.save_lora_weights(
                tmp, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers.get("text_encoder"),
                unet_lora_adapter_metadata=c.unet.peft_config["default"].to_dict(),
                text_encoder_lora_adapter_metadata=(c.text_encoder.peft_config["default"].to_dict()
                                                    if "text_encoder" in layers else None),
                weight_name=self.weight_name, safe_serialization=True)
            with safe_open(Path(tmp) / self.weight_name, framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                file_meta = dict(f.metadata() or {})
        file_meta.update(metadata)
        out = checkpoint_dir / self.weight_name
        with atomic_path(out) as tmp_file:
            save_file(tensors, tmp_file, metadata=file_meta)
        kohya = checkpoint_dir / self.kohya_name
        with atomic_path(kohya) as tmp_file:
            save_file(to_kohya(tensors, self.cfg.lora_alpha), tmp_file, metadata=metadata)
        return [out, kohya]

    def load_into(self, pipe, checkpoint_dir: Path, scale: float = 1.0) -> None:
        pipe.load_lora_weights(str(checkpoint_dir), weight_name=self.weight_name, adapter_name=ADAPTER)
        pipe.set_adapters([ADAPTER], adapter_weights=[scale])

    def fuse(self, pipe) -> None:
        # W + scale·(alpha/r)·B·A written into W, then the LoRA layers removed (the fused weights stay):
        # sampling then runs the plain UNet, ~20% faster per image for the toy config's conv + attention LoRA
        pipe.fuse_lora(adapter_names=[ADAPTER])
        pipe.unload_lora_weights()


# the names earlier versions of this project (and diffusers' examples) wrote, mapped to peft's
LEGACY_KEYS = {".lora.down.weight": ".lora_A.weight", ".lora.up.weight": ".lora_B.weight",
               ".lora_linear_layer.down.weight": ".lora_A.weight", ".lora_linear_layer.up.weight": ".lora_B.weight"}


def peft_key(name: str) -> str:
    """A LoRA tensor name in peft's scheme, whichever of the older diffusers schemes it was written in."""
    for old, new in LEGACY_KEYS.items():
        if name.endswith(old):
            return name[:-len(old)] + new
    return name


def to_kohya(tensors: dict[str, torch.Tensor], lora_alpha: float) -> dict[str, torch.Tensor]:
    """kohya/A1111 keys (``lora_unet_..._to_q.lora_down.weight`` + ``.alpha``) from a diffusers file.

    Two departures from diffusers' convert_state_dict_to_kohya, whose output we fix up:
    it writes alpha = rank, which silently rescales any adapter trained with alpha != rank, so we write
    the alpha the adapter was trained with; and it names SD 1.x text-encoder layers ``lora_te1_encoder_…``
    (the SDXL prefix, without the CLIP module path), where sd-scripts and the web UIs expect
    ``lora_te_text_model_encoder_…``.
    """
    kohya = convert_state_dict_to_kohya({peft_key(k): v for k, v in tensors.items()})
    out = {}
    for key, value in kohya.items():
        if key.startswith("lora_te1_"):
            rest = key[len("lora_te1_"):]
            key = "lora_te_" + (rest if rest.startswith("text_model_") else "text_model_" + rest)
        out[key] = torch.tensor(float(lora_alpha)) if key.endswith(".alpha") else value.contiguous()
    return out

