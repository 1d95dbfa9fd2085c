"""The oracle: a small CNN that reads the truth of a toy image — its style, shape, colour, background.

It lets the study check what standard metrics only estimate: did training move the style, and was
the content kept. Weights are `config.json` + `model.safetensors` (no pickle), stored in half precision
(a classifier's verdicts do not need more; it runs in float32). For a look it was never trained on
(unseen.py) it hands out that look's hand-written detector instead of a style verdict.

Two trunks, one per question. The style head reads features learned on clean renders of the four
looks. The content heads (shape, colour, background) read a second trunk, trained with scenes under
ink lines as well (pretrain.ink_over), so a look that draws over the scene, such as woodcut, does not
hide its content. One shared trunk cannot do both: learning to look past ink lines taught it to look
past comic's outlines too (README, "The content judge"). `Oracle.joined` puts two trained
oracles together; an oracle built without `content_width` reads everything from one trunk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from research.toyworld.scenes import parse_caption
from research.toyworld.unseen import DETECTORS

HEADS = ("style", "shape", "colour", "background")
CONTENT = ("shape", "colour", "background")  # the heads the content trunk feeds, when there is one
IMAGE_SIZE = 64  # the oracle's input; other sizes are resized to it


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )  # fmt: skip


def _trunk(width: int) -> nn.Sequential:
    # 64 → 32 → 16 → 8 → 4, then global pooling (in forward): position does not matter, only what is there.
    return nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width), _block(4 * width, 4 * width))


class Oracle(nn.Module):
    def __init__(self, labels: dict[str, list[str]], width: int = 32, content_width: int | None = None):
        super().__init__()
        self.labels = {head: list(labels[head]) for head in HEADS}
        self.width, self.content_width = width, content_width
        self.features = _trunk(width)
        self.content_features = _trunk(content_width) if content_width else None
        widths = {head: 4 * (content_width if content_width and head in CONTENT else width) for head in HEADS}
        self.heads = nn.ModuleDict({head: nn.Linear(widths[head], len(self.labels[head])) for head in HEADS})

    @property
    def config(self) -> dict:
        return {"labels": self.labels, "width": self.width, "content_width": self.content_width, "image_size": IMAGE_SIZE}

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for a float batch N×3×64×64 in [0, 1]."""
        x = pixels * 2 - 1
        h = self.features(x).mean(dim=(2, 3))
        hc = self.content_features(x).mean(dim=(2, 3)) if self.content_features is not None else h
        return {head: layer(hc if head in CONTENT else h) for head, layer in self.heads.items()}

    @classmethod
    def joined(cls, style: "Oracle", content: "Oracle") -> "Oracle":
        """One oracle whose style verdict is `style`'s and whose content verdicts are `content`'s, each
        read from its own trunk (their other heads are dropped). Either may be joined already: a joined
        oracle's style comes from its first trunk and its content from its second."""
        if style.labels != content.labels:
            raise ValueError("the two oracles name different classes; train both on the same labels")
        trunk = content.content_features if content.content_width else content.features
        out = cls(style.labels, style.width, content.content_width or content.width)
        out.features.load_state_dict(style.features.state_dict())
        out.content_features.load_state_dict(trunk.state_dict())
        out.heads["style"].load_state_dict(style.heads["style"].state_dict())
        for head in CONTENT:
            out.heads[head].load_state_dict(content.heads[head].state_dict())
        return out.eval()

    def _to_tensor(self, images) -> torch.Tensor:
        device = next(self.parameters()).device
        if isinstance(images, torch.Tensor):
            x = images.float()
        else:
            x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]))
            x = x.permute(0, 3, 1, 2)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x.to(device)

    @torch.no_grad()
    def predict_proba(self, images: list[Image.Image] | torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Class probabilities per head; images are PIL images or a float tensor N×3×H×W in [0, 1]."""
        was_training = self.training
        self.eval()
        x = self._to_tensor(images)
        out = {head: [] for head in HEADS}
        for i in range(0, len(x), batch_size):
            for head, logits in self(x[i : i + batch_size]).items():
                out[head].append(logits.softmax(-1).cpu())
        self.train(was_training)
        return {head: torch.cat(parts) for head, parts in out.items()}

    def predict(self, images: list[Image.Image] | torch.Tensor) -> dict[str, list[str]]:
        """The most likely label per head and image."""
        probs = self.predict_proba(images)
        return {head: [self.labels[head][i] for i in p.argmax(-1).tolist()] for head, p in probs.items()}

    @staticmethod
    def scene_of(prompt: str):
        """The scene a toy-world prompt asks for (None outside the toy grammar): the truth content is judged by."""
        return parse_caption(prompt)

    @staticmethod
    def detector(style: str):
        """The hand-written detector (image -> bool) of a look the oracle was never trained on, or None.

        The metrics judge such a look's style with it: the oracle cannot, and a learned judge would not
        be independent of what the UNet learned."""
        return DETECTORS.get(style)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Oracle":
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        model = cls(config["labels"], config["width"], config.get("content_width"))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(path / "model.safetensors").items()})
        return model.eval()

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config, indent=2))
        half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        save_file(half, path / "model.safetensors")
