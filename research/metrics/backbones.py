"""Loaders for the metric backbones (CLIP, Inception, LPIPS/AlexNet).

Each loader either returns a ready model or raises MissingWeightsError whose message is one sentence naming
the backbone, the option that points to a local copy, and how to skip the metric instead. Each
backbone's library (transformers, clean-fid's Inception, lpips) is imported inside its loader: a run
loads only what the metrics it names need, and some of them are slow to import.
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from research.errors import MissingWeightsError
from research.models import hf_offline

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the default CLIP; the toy world passes its own folder
INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's TorchScript Inception (the TF FID network)


# ----------------------------------------------------------------------------- CLIP

@dataclass
class ClipBundle:
    """A CLIPModel with the tokenizer and image processor that belong to it."""
    model: "torch.nn.Module"
    tokenizer: object
    processor: object
    name: str


def load_clip(name_or_path: str = DEFAULT_CLIP, device: str = "cpu") -> ClipBundle:
    # deferred: only the chosen backbone is imported
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    local = Path(name_or_path).exists()
    try:
        kwargs = {"local_files_only": local or hf_offline()}
        model = CLIPModel.from_pretrained(name_or_path, **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, **kwargs)
        processor = CLIPImageProcessor.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:  # transformers/hub report missing files, no network and bad ids this way
        raise MissingWeightsError(
            f"CLIP backbone '{name_or_path}' is not available offline; pass --clip-model with a local "
            f"CLIPModel folder, or leave out clip_score, style_similarity (and fid/kid with the CLIP "
            f"feature extractor) via --metrics.") from e
    return ClipBundle(model.to(device).eval(), tokenizer, processor, str(name_or_path))


# ----------------------------------------------------------------------------- Inception (clean-fid)

def load_inception(weights: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """clean-fid's Inception in clean mode (what build_feature_extractor(mode="clean") wraps), kept as a
    module so that both its pool features (FID/KID) and its class probabilities (IS) are reachable.

    weights: None downloads to clean-fid's cache folder; a file or a folder holding inception-2015-12-05.pt
    loads that copy.
    """
    from cleanfid.inception_torchscript import InceptionV3W  # deferred: only the chosen backbone is imported

    hint = ("pass --inception-weights with a local inception-2015-12-05.pt, or leave out fid, kid and "
            "inception_score via --metrics.")
    try:
        if weights is None:
            model = InceptionV3W("/tmp", download=True)  # clean-fid's own default cache folder
        else:
            model = InceptionV3W(_inception_folder(Path(weights), hint), download=False)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; a bad file fails in jit.load
        where = "could not be downloaded" if weights is None else f"could not be loaded from '{weights}'"
        raise MissingWeightsError(f"Inception backbone (clean-fid) {where}; {hint}") from e
    return model.to(device).eval()


def _inception_folder(path: Path, hint: str) -> str:
    if path.is_dir():
        return str(path)
    if not path.is_file():
        raise MissingWeightsError(f"Inception backbone file '{path}' does not exist; {hint}")
    if path.name == INCEPTION_FILE:
        return str(path.parent)
    # clean-fid only loads a file of that exact name from a folder: link ours in under it
    folder = Path(tempfile.mkdtemp(prefix="inception-"))
    (folder / INCEPTION_FILE).symlink_to(path.resolve())
    return str(folder)


# ----------------------------------------------------------------------------- LPIPS

def load_lpips(weights: str | None = None, device: str = "cpu", seed: int = 0) -> tuple[torch.nn.Module, str]:
    """lpips.LPIPS(net="alex") and a label for its trunk.

    weights: None takes torchvision's ImageNet AlexNet (torch hub cache or network); a .safetensors/.pth file
    holds a torchvision AlexNet state dict; "random" builds a seeded random trunk (the toy world, where no
    AlexNet weights exist). The linear layers always come from the lpips package itself.
    """
    import lpips  # deferred: only the chosen backbone is imported

    warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", module="torchvision")  # lpips uses the old API
    hint = "pass --lpips-weights with a local AlexNet .safetensors/.pth (or 'random'), or leave out lpips_diversity via --metrics."
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
        return model.to(device).eval(), f"alex-random(seed={seed})"
    if weights is None:
        try:
            model = lpips.LPIPS(net="alex", verbose=False)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise MissingWeightsError(f"LPIPS AlexNet trunk (torchvision ImageNet weights) could not be downloaded; {hint}") from e
        return model.to(device).eval(), "alex"
    path = Path(weights)
    if not path.is_file():
        raise MissingWeightsError(f"LPIPS AlexNet trunk file '{path}' does not exist; {hint}")
    model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    _load_alexnet_trunk(model, path)
    return model.to(device).eval(), f"alex({path.name})"


def _load_alexnet_trunk(model: torch.nn.Module, path: Path) -> None:
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code from the file
    # lpips splits torchvision's alexnet.features into slices whose children keep their index as name
    layers = {name: layer for s in range(1, model.net.N_slices + 1)
              for name, layer in getattr(model.net, f"slice{s}").named_children()}
    wanted = {f"features.{i}.{p}" for i, layer in layers.items() for p, _ in layer.named_parameters()}
    if not wanted <= state.keys():
        raise ValueError(f"'{path}' is not a torchvision AlexNet state dict (missing {sorted(wanted - state.keys())[:3]}).")
    with torch.no_grad():
        for key in wanted:
            _, i, p = key.split(".")
            getattr(layers[i], p).copy_(state[key])
