"""Experiment IV's maths: the weight delta of a LoRA and one LoRA that holds a blend of two.

At weight t every adapted layer gets (1-t)·ΔW_A + t·ΔW_B with ΔW = (alpha/r)·B·A. Interpolating the
A and B matrices separately would be wrong: ((1-t)B1 + tB2)((1-t)A1 + tA2) is not (1-t)B1A1 + tB2A2.
`blend_state_dict` writes the exact blend as one LoRA: the two ranks concatenated
(down = [A1; A2], up = [(1-t)s1·B1, t·s2·B2], alpha = rank so the loaded scale is 1).

Pure tensor maths on adapters already in memory; blend_files reads and writes them, style_blend
samples and scores them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from research.config import TrainConfig
from research.errors import BlendError

log = logging.getLogger("research")

DOWN, UP = ".lora_A.weight", ".lora_B.weight"  # peft's names, the one scheme adapter files use


@dataclass
class Adapter:
    label: str  # short name for folders, legends and the MLflow run
    checkpoint_dir: Path  # folder holding pytorch_lora_weights.safetensors
    tensors: dict[str, torch.Tensor]  # <component>.<module>.lora_{A,B}.weight
    lora_meta: dict  # diffusers' flat LoraConfig metadata: "unet.r", "unet.lora_alpha", ...
    cfg: TrainConfig  # the config it was trained with

    @property
    def modules(self) -> set[str]:
        return {k[:-len(DOWN)] for k in self.tensors if k.endswith(DOWN)}

    @property
    def components(self) -> set[str]:
        """The adapted models: "unet", and "text_encoder" when it was trained too."""
        return {m.split(".")[0] for m in self.modules}

    def scale(self, component: str) -> float:
        """alpha / r, as peft applies it (alpha / sqrt(r) for rsLoRA)."""
        r, alpha = self.lora_meta[f"{component}.r"], self.lora_meta[f"{component}.lora_alpha"]
        return alpha / (math.sqrt(r) if self.lora_meta.get(f"{component}.use_rslora") else r)

    def delta(self, module: str) -> torch.Tensor:
        """ΔW = (alpha/r)·B·A of one adapted layer (linear layers; conv kernels flattened)."""
        up, down = self.tensors[module + UP], self.tensors[module + DOWN]
        return self.scale(module.split(".")[0]) * (up.flatten(1) @ down.flatten(1))


def _check_plain(x: Adapter) -> None:
    """Only plain LoRA has a delta of the form (alpha/r)·B·A with one rank and alpha."""
    odd = sorted(k for k in x.tensors if not k.endswith((DOWN, UP)))
    if odd:
        raise BlendError(f"Adapter {x.label} has tensors other than LoRA down/up weights (e.g. {odd[0]}); "
                         "blend plain LoRA adapters (no lora bias, no DoRA).")
    for component in x.components:
        if x.lora_meta.get(f"{component}.use_dora") or x.lora_meta.get(f"{component}.rank_pattern") or \
                x.lora_meta.get(f"{component}.alpha_pattern"):
            raise BlendError(f"Adapter {x.label} uses DoRA or per-layer rank/alpha patterns; blend plain "
                             "LoRA adapters with one rank and alpha.")


def check_compatible(a: Adapter, b: Adapter) -> None:
    for x in (a, b):
        _check_plain(x)
    if a.modules != b.modules:
        only_a, only_b = sorted(a.modules - b.modules), sorted(b.modules - a.modules)
        raise BlendError(f"Adapters {a.label} and {b.label} target different modules ({len(only_a)} only in A, "
                         f"e.g. {(only_a or ['-'])[0]}; {len(only_b)} only in B, e.g. {(only_b or ['-'])[0]}); "
                         "blend adapters trained with the same --unet-target-modules and --train-text-encoder.")
    for m in sorted(a.modules):
        if a.tensors[m + UP].shape[0] != b.tensors[m + UP].shape[0] or \
                a.tensors[m + DOWN].shape[1:] != b.tensors[m + DOWN].shape[1:]:
            raise BlendError(f"Adapters {a.label} and {b.label} have different layer shapes at {m}; "
                             "blend adapters trained on the same base model.")
    if a.cfg.base_model != b.cfg.base_model:
        log.warning("adapters were trained on different base models (%s, %s); sampling uses %s",
                    a.cfg.base_model, b.cfg.base_model, a.cfg.base_model)


def blend_state_dict(a: Adapter, b: Adapter, t: float) -> tuple[dict[str, torch.Tensor], dict]:
    """One LoRA whose delta is exactly (1-t)·ΔW_A + t·ΔW_B: ranks concatenated, scales folded into up.

    B_mix·A_mix = [(1-t)s_A·B_A, t·s_B·B_B]·[A_A; A_B] = (1-t)s_A·B_A·A_A + t·s_B·B_B·A_B, and with
    alpha = r_mix the loader's scale is 1.
    """
    check_compatible(a, b)
    tensors, meta = {}, dict(a.lora_meta)
    for m in sorted(a.modules):
        component = m.split(".")[0]
        tensors[m + DOWN] = torch.cat([a.tensors[m + DOWN], b.tensors[m + DOWN]], dim=0).contiguous()
        tensors[m + UP] = torch.cat([(1 - t) * a.scale(component) * a.tensors[m + UP],
                                     t * b.scale(component) * b.tensors[m + UP]], dim=1).contiguous()
    for component in a.components:
        rank = a.lora_meta[f"{component}.r"] + b.lora_meta[f"{component}.r"]
        meta.update({f"{component}.r": rank, f"{component}.lora_alpha": float(rank),
                     f"{component}.use_rslora": False})
    return tensors, meta


def t_label(t: float) -> str:
    """The name of blend weight t in folders and metrics.json: t_0.50 (more digits only when needed)."""
    return f"t_{t:.2f}" if abs(round(t, 2) - t) < 1e-9 else f"t_{t:g}"
