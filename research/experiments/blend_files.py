"""Experiment IV's files: read a trained LoRA run as an `Adapter`, write a blend as one adapter file.

The exported blend is in diffusers keys (loads with plain ``load_lora_weights``) plus the kohya/A1111
copy, and carries its config and provenance in its metadata like every adapter this project saves.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from research.atomic import atomic_path
from research.config import TrainConfig
from research.errors import BlendError
from research.experiments.blend_math import Adapter, blend_state_dict
from research.methods.lora import LoRA, peft_key, to_kohya

WEIGHT_NAME = LoRA.weight_name
KOHYA_NAME = LoRA.kohya_name
METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps rank/alpha; load_lora_weights reads it


def _adapter_folder(path: Path) -> Path:
    folder = next((d for d in (path / "checkpoints", path) if (d / WEIGHT_NAME).is_file()), None)
    if folder is None:
        raise BlendError(f"{path} has no {WEIGHT_NAME} (nor checkpoints/{WEIGHT_NAME}); pass the folder of a "
                         "finished LoRA run or its checkpoints folder.")
    return folder


def _run_config(path: Path, folder: Path, meta: dict) -> TrainConfig:
    """The run's config.json, else the config the adapter file carries; without either, no guessing."""
    run_config = folder.parent / "config.json" if folder.name == "checkpoints" else folder / "config.json"
    values = (json.loads(run_config.read_text()) if run_config.is_file()
              else json.loads(meta.get("research_config", "{}")))
    if not values:  # without its config the adapter's style, data and base model are unknown
        raise BlendError(f"{path} has neither config.json nor a config in its adapter metadata; blend adapters "
                         "saved by research.train.")
    return TrainConfig.from_dict(values, source=str(run_config))


def load_adapter(path: str | Path) -> Adapter:
    """A LoRA run folder (runs/exp1/<run>) or the checkpoints folder inside it."""
    path = Path(path)
    folder = _adapter_folder(path)
    with safe_open(folder / WEIGHT_NAME, framework="pt") as f:
        tensors = {peft_key(k): f.get_tensor(k).float() for k in f.keys()}  # files of earlier versions too
        meta = dict(f.metadata() or {})
    if METADATA_KEY not in meta:
        raise BlendError(f"{folder / WEIGHT_NAME} carries no rank/alpha metadata, so its scale is unknown; "
                         "blend adapters saved by research.train.")
    cfg = _run_config(path, folder, meta)
    if cfg.method != "lora" or meta.get("research_method", "lora") != "lora":
        raise BlendError(f"{path} holds a {cfg.method} run; only LoRA adapters are blended as weight deltas.")
    return Adapter(cfg.resolved_run_name(), folder, tensors, json.loads(meta[METADATA_KEY]), cfg)


def export_blend(a: Adapter, b: Adapter, t: float, checkpoint_dir: Path) -> list[Path]:
    """Write the blended adapter (diffusers keys + rank/alpha metadata) and its kohya copy, atomically."""
    tensors, lora_meta = blend_state_dict(a, b, t)
    rank = lora_meta["unet.r"] if "unet.r" in lora_meta else next(v for k, v in lora_meta.items() if k.endswith(".r"))
    cfg = dataclasses.replace(a.cfg, rank=int(rank), lora_alpha=float(rank), run_name=f"{a.label}_x_{b.label}")
    provenance = {"a": str(a.checkpoint_dir), "b": str(b.checkpoint_dir), "t": t,
                  "scale_a": {c: a.scale(c) for c in a.components},
                  "scale_b": {c: b.scale(c) for c in b.components}}
    # the config travels with the weights, as for every adapter this project saves
    metadata = {"format": "pt", METADATA_KEY: json.dumps(lora_meta, indent=2, sort_keys=True),
                "research_method": "lora", "research_config": json.dumps(cfg.to_dict(), sort_keys=True),
                "research_blend": json.dumps(provenance, sort_keys=True)}
    out, kohya = checkpoint_dir / WEIGHT_NAME, checkpoint_dir / KOHYA_NAME
    with atomic_path(out) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    # to_kohya writes one alpha for every layer; alpha = each layer's own rank keeps the scale at 1
    # even when the UNet and text-encoder ranks differ
    converted = to_kohya(tensors, 1.0)
    converted = {k: (torch.tensor(float(converted[k[:-len(".alpha")] + ".lora_down.weight"].shape[0]))
                     if k.endswith(".alpha") else v) for k, v in converted.items()}
    with atomic_path(kohya) as tmp:
        save_file(converted, tmp, metadata={k: v for k, v in metadata.items() if k != METADATA_KEY})
    return [out, kohya]
