"""Style folder -> images, captions, a seeded train/held-out split, and validation prompts.

A building block: it knows only research.errors.

A style folder is read, never written. Layout (captions and prompts optional)::

    data/ghibli/
      0001.png  0001.txt  0002.jpg  ...  validation_prompts.txt
"""

from __future__ import annotations

import dataclasses
import logging
import random
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from research.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
PROMPTS_FILE = "validation_prompts.txt"
# Larger images are skipped, not decoded: 64 MP is 8192 x 8192, far above any training resolution,
# and stays below Pillow's own decompression-bomb limit (89 MP warns, 179 MP raises).
MAX_PIXELS = 8192 * 8192
TEXT_ENCODING = "utf-8"  # captions and prompts; a file that is not UTF-8 is read as Latin-1, with a warning

# Used when a style folder has no validation_prompts.txt and no --validation-prompts-file is given.
DEFAULT_PROMPTS = {
    "ghibli": ["a quiet village on a green hillside", "a girl with a straw hat in a flower field",
               "a steam train crossing a river", "a cosy kitchen with sunlight through the window"],
    "shinkai": ["a city street after rain at dusk", "a train platform under a vivid sunset sky",
                "a schoolgirl looking at a sky full of clouds", "a lonely bridge under a starry night"],
    "comic": ["a superhero standing on a rooftop", "a detective in a rainy alley",
              "a robot bursting through a wall", "a close-up of a surprised face"],
}
GENERIC_PROMPTS = ["a portrait of a young woman", "a landscape with mountains and a lake",
                   "a cat sitting on a windowsill", "a busy market street"]


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    image: Image.Image  # RGB


@dataclass(frozen=True)
class StyleFolder:
    name: str
    train: list[Example]
    heldout: list[Example]  # evaluation references: never trained on
    validation_prompts: list[str]


class SkippedImage(Exception):
    """An image file a style folder may hold but training cannot use; the message says why."""


def load_rgb(path: Path) -> Image.Image:
    """Open any supported image as 8-bit RGB: alpha is composited on white, 16-bit is rescaled.
    Raises SkippedImage for what is not a regular file, too large, or not decodable."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise SkippedImage(f"cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(mode):  # opening a FIFO or a device would block or read forever
        raise SkippedImage("not a regular file")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:  # only the header is read so far
                raise SkippedImage(f"{img.width}x{img.height} is larger than {MAX_PIXELS:,} pixels; downscale it")
            return _to_rgb(img)
    except Image.DecompressionBombError:
        raise SkippedImage(f"larger than {MAX_PIXELS:,} pixels; downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SkippedImage(f"unreadable: {err}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: alpha composited on white, 16-bit rescaled (not clipped)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in {"I;16", "I;16B", "I;16L", "I"}:
        # 16-bit (or 32-bit int) greyscale: scale the full range down to 8 bits, don't clip it.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in {"RGBA", "LA"}:
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")




def read_text(path: Path, what: str) -> str | None:
    """A caption or prompts file as text: UTF-8 (a BOM is dropped); bytes that are not UTF-8 are read as
    Latin-1 with a warning; a file with control bytes (binary) gives None with a warning."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        text = data.decode("latin-1")
        log.warning("%s %s is not UTF-8 (byte %d); read it as Latin-1 - re-save it as UTF-8 if that is wrong.",
                    what, path, err.start)
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in text):
        log.warning("%s %s holds control bytes, not text; ignoring it.", what, path)
        return None
    return text


def _read_caption(image_path: Path, default: str, trigger_word: str) -> str:
    txt = image_path.with_suffix(".txt")
    caption = ""
    if txt.is_file():
        try:
            caption = (read_text(txt, "Caption") or "").strip()
        except OSError as err:
            log.warning("Caption %s cannot be read (%s); using the caption template.", txt, err.strerror)
    caption = caption or default
    return f"{trigger_word}, {caption}" if trigger_word else caption


def read_validation_prompts(style_dir: Path, style_name: str, prompts_file: str = "") -> list[str]:
    path = Path(prompts_file) if prompts_file else style_dir / PROMPTS_FILE
    if prompts_file and not path.is_file():
        raise DataError(f"Validation prompts file {path} does not exist or is not a regular file; "
                        "fix --validation-prompts-file.")
    if path.is_file():
        try:
            text = read_text(path, "Validation prompts file")
        except OSError as err:
            raise DataError(f"Validation prompts file {path} cannot be read ({err.strerror}); fix its permissions.") from None
        if text is None:
            raise DataError(f"Validation prompts file {path} is not text; write one prompt a line as UTF-8.")
        prompts = [line.strip() for line in text.splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
        if prompts:
            return prompts
        log.warning("%s has no prompts; using the defaults for style %r.", path, style_name)
    return DEFAULT_PROMPTS.get(style_name.lower(), GENERIC_PROMPTS)


def require_style_dir(style_dir: str | Path) -> Path:
    """The style folder as a Path, or the one DataError every command gives for a folder that is not there."""
    path = Path(style_dir)
    if not path.is_dir():
        raise DataError(f"Style folder {path} does not exist; pass a folder of images with --style-dir.")
    return path


def style_folders(data_root: Path, only: str = "") -> list[Path]:
    """Sub-folders of data_root that hold images, in name order (--styles picks some by name)."""
    if not data_root.is_dir():
        raise DataError(f"--data-root {data_root} does not exist; pass a folder with one sub-folder per style "
                        "(make data builds data/toy).")
    found = [d for d in sorted(data_root.iterdir())
             if d.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in d.iterdir())]
    if only:
        wanted = [s.strip() for s in only.split(",") if s.strip()]
        missing = sorted(set(wanted) - {d.name for d in found})
        if missing:
            raise DataError(f"--styles names {', '.join(missing)}, not style folders of {data_root} "
                            f"({', '.join(d.name for d in found) or 'none'}).")
        found = [d for d in found if d.name in wanted]
    if not found:
        raise DataError(f"No style folder (a sub-folder with images) under {data_root}; add one per style.")
    return found


def load_style_folder(style_dir: str | Path, *, style_name: str = "", resolution: int = 512,
                      caption_template: str = "an illustration in {style} style", trigger_word: str = "",
                      holdout_fraction: float = 0.2, seed: int = 1126,
                      validation_prompts_file: str = "") -> StyleFolder:
    """Read every usable image of a style folder and split it, reproducibly, into train and held-out."""
    style_dir = require_style_dir(style_dir)
    name = style_name or style_dir.name
    default_caption = caption_template.format(style=name)
    min_side = max(16, resolution // 4)  # smaller images would teach the model upscaling blur, not style
    try:
        paths = sorted(p for p in style_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    except OSError as err:
        raise DataError(f"Style folder {style_dir} cannot be listed ({err.strerror}); fix its permissions.") from None
    examples = []
    for path in paths:
        try:
            image = load_rgb(path)
        except SkippedImage as why:
            log.warning("Skipping image %s: %s.", path, why)
            continue
        if min(image.size) < min_side:
            log.warning("Skipping %s: %dx%d is smaller than %d px (a quarter of --resolution).",
                        path, *image.size, min_side)
            continue
        examples.append(Example(path, _read_caption(path, default_caption, trigger_word), image))
    if not examples:
        raise DataError(f"No usable image in {style_dir}; add .png/.jpg/.jpeg/.webp/.bmp files of at least "
                        f"{min_side} px.")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_heldout = round(len(examples) * holdout_fraction) if len(examples) > 1 else 0
    if holdout_fraction > 0 and len(examples) > 1:
        n_heldout = min(max(n_heldout, 1), len(examples) - 1)  # keep at least one image on each side
    heldout = [examples[i] for i in sorted(order[:n_heldout])]
    train = [examples[i] for i in sorted(order[n_heldout:])]
    prompts = read_validation_prompts(style_dir, name, validation_prompts_file)
    return StyleFolder(name, train, heldout, prompts)


def style_folder_for(cfg) -> StyleFolder:
    """The style folder exactly as a run config reads it (same captions, same held-out split)."""
    folder = load_style_folder(cfg.style_dir, style_name=cfg.style_name, resolution=cfg.resolution,
                               caption_template=cfg.caption_template, trigger_word=cfg.trigger_word,
                               holdout_fraction=cfg.holdout_fraction, seed=cfg.seed,
                               validation_prompts_file=cfg.validation_prompts_file)
    return dataclasses.replace(folder, heldout=reference_split(folder.heldout, cfg.heldout_split))


def reference_split(heldout: list[Example], part: str) -> list[Example]:
    """Alternate held-out images (in file order): a search selects on "selection" and reports on "reporting",
    so the reported number is not the one the selection was optimistic about."""
    if part == "all":
        return heldout
    if len(heldout) < 4:
        raise DataError(f"Splitting the held-out images into selection and reporting halves needs at least 4, "
                        f"got {len(heldout)}; raise --holdout-fraction or add images.")
    return heldout[0::2] if part == "selection" else heldout[1::2]


def preprocess(image: Image.Image, resolution: int, *, center_crop: bool = True, flip: bool = False,
               rng: random.Random | None = None) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square, optionally flip; return CHW in [-1, 1]."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    if center_crop or rng is None:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left, top = rng.randint(0, image.width - resolution), rng.randint(0, image.height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
