"""LoRA on the UNet attention projections (and optionally the text encoder), with peft.

Saved as ``pytorch_lora_weights.safetensors`` in diffusers keys (loads with
``StableDiffusionPipeline.load_lora_weights``; rank and alpha kept in its metadata so the loaded
scale is right) and as ``lora_kohya.safetensors`` in the kohya/A1111 key format that ComfyUI and
the web UIs read.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
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
    def frozen_text_encoder(self) -> bool:  # type: ignore[override]
        return not self.cfg.train_text_encoder

    def _lora_config(self, targets: str):
        from peft import LoraConfig

        return LoraConfig(r=self.cfg.rank, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                          init_lora_weights="gaussian", target_modules=_targets(targets))

    def setup(self, c: Components) -> list[dict]:
        from diffusers.training_utils import cast_training_params

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
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = {"unet": convert_state_dict_to_diffusers(get_peft_model_state_dict(c.unet))}
        if self.cfg.train_text_encoder:
            layers["text_encoder"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(c.text_encoder))
        # diffusers' converter renames attention layers only; name conv layers (and any other) the same way,
        # so a file has one key scheme (load_lora_weights reads both, the blend and kohya export need one)
        return {k: {_legacy_key(n): t.detach().to("cpu", torch.float32).contiguous() for n, t in v.items()}
                for k, v in layers.items()}

    def save(self, c: Components, checkpoint_dir: Path, metadata: dict[str, str]) -> list[Path]:
        from diffusers import StableDiffusionPipeline

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


def _legacy_key(name: str) -> str:
    return name.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")


def to_kohya(diffusers_tensors: dict[str, torch.Tensor], lora_alpha: float) -> dict[str, torch.Tensor]:
    """kohya/A1111 keys (``lora_unet_..._to_q.lora_down.weight`` + ``.alpha``) from diffusers keys.

    diffusers' converter writes alpha = rank, which silently rescales any adapter trained with
    alpha != rank; we write the alpha the adapter was trained with.
    """
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(diffusers_tensors))
    return {k: (torch.tensor(float(lora_alpha)) if k.endswith(".alpha") else v.contiguous())
            for k, v in kohya.items()}


def read_config_metadata(path: Path) -> dict:
    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get("research_config", "{}"))
