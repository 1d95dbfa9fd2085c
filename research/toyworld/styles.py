"""The four looks of the toy world. Each paints any scene layout (see `scenes.layout`); render.py
turns a scene, a style and a seed into an image.

- plain:  flat colours, thin dark edge — what the base model learns.
- pastel: soft watercolour (Ghibli stand-in): colours washed toward paper white, blurred,
          darker pigment at the edges, paper grain and blotchy wash.
- vivid:  Makoto Shinkai stand-in: saturated colours, a dusk gradient sky, glow around the object.
- comic:  American-comic stand-in: bold black outlines, flat cel-shaded colours, halftone dots.

Every look keeps the object's hue, its silhouette and the background's layout, so content stays
recognisable in all styles.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from research.toyworld.scenes import Layout

STYLES = ("plain", "pastel", "vivid", "comic")

PAPER = np.array([255, 248, 236], np.float32)


def _compose(lay: Layout, colour) -> np.ndarray:
    S = lay.obj.shape[0]
    img = np.zeros((S, S, 3), np.float32)
    for mask, rgb in lay.regions:
        img = img * (1 - mask[..., None]) + mask[..., None] * colour(rgb)
    return img


def _over(img: np.ndarray, mask: np.ndarray, rgb) -> np.ndarray:
    return img * (1 - mask[..., None]) + mask[..., None] * np.asarray(rgb, np.float32)


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    """A band of `width` px around the outside of a mask."""
    grown = ndimage.maximum_filter(mask, size=2 * width + 1)
    return np.clip(grown - mask, 0, 1)


def _saturate(rgb, factor: float) -> np.ndarray:
    rgb = np.asarray(rgb, np.float32)
    grey = rgb.mean(axis=-1, keepdims=True)
    return np.clip(grey + factor * (rgb - grey), 0, 255)


def _plain(lay: Layout, rng: np.random.Generator) -> np.ndarray:
    img = _compose(lay, lambda rgb: np.asarray(rgb, np.float32))
    img = _over(img, lay.sparkles, (240, 240, 200))
    img = _over(img, _ring(lay.obj, 1), 0.55 * np.asarray(lay.obj_rgb, np.float32))
    return _over(img, lay.obj, lay.obj_rgb)


def _pastel(lay: Layout, rng: np.random.Generator) -> np.ndarray:
    S = lay.obj.shape[0]
    wash = lambda rgb: 0.5 * np.asarray(rgb, np.float32) + 0.5 * PAPER  # noqa: E731
    img = _compose(lay, wash)
    img = _over(img, lay.sparkles, (255, 250, 225))
    obj_rgb = wash(lay.obj_rgb)
    img = _over(img, lay.obj, obj_rgb)
    # Watercolour pigment pools at the edge of a wash: darken the object's inner rim.
    rim = np.clip(lay.obj - ndimage.gaussian_filter(lay.obj, 3), 0, 1) * 2
    img = img * (1 - 0.35 * rim[..., None])
    img = ndimage.gaussian_filter(img, sigma=(1.6, 1.6, 0))
    # Blotchy wash: smooth low-frequency brightness variation, then fine paper grain.
    blotch = ndimage.zoom(rng.normal(0, 1, (6, 6)), S / 6, order=3)[:S, :S]
    img = img * (1 + 0.05 * blotch[..., None]) + rng.normal(0, 4, (S, S, 1))
    return img


def _vivid(lay: Layout, rng: np.random.Generator) -> np.ndarray:
    S = lay.obj.shape[0]
    img = _compose(lay, lambda rgb: _saturate(rgb, 1.7) * 1.05)
    y = np.linspace(0, 1, S, dtype=np.float32)[:, None, None]
    night = lay.regions[0][1] == (20, 25, 60)
    if night:  # a deep violet night rather than a dusk
        sky = (1 - y) * np.array([10, 10, 70], np.float32) + y * np.array([110, 40, 150], np.float32)
    else:  # dusk: deep blue above, magenta, then orange at the horizon
        sky = np.where(
            y < 0.5,
            (1 - 2 * y) * np.array([30, 50, 170], np.float32) + 2 * y * np.array([215, 80, 170], np.float32),
            (2 - 2 * y) * np.array([215, 80, 170], np.float32) + (2 * y - 1) * np.array([255, 175, 70], np.float32),
        )
    img = img * (1 - lay.sky[..., None]) + lay.sky[..., None] * sky
    # Glow: light spills from sparkles and the object onto what is around them.
    obj_rgb = _saturate(lay.obj_rgb, 1.5)
    img = img + 120 * ndimage.gaussian_filter(lay.sparkles, 3)[..., None]
    img = _over(img, lay.sparkles, (255, 255, 235))
    glow = ndimage.gaussian_filter(lay.obj, S / 20)
    img = img + 0.9 * glow[..., None] * obj_rgb * (1 - lay.obj[..., None])
    # A bright specular sheen on the object's upper part.
    x = np.linspace(0, 1, S, dtype=np.float32)[None, :]
    sheen = np.clip(1.2 - 1.6 * (y[..., 0] + x) / 2, 0, 1) * 0.45
    img = _over(img, lay.obj, obj_rgb)
    img = img + (lay.obj * sheen)[..., None] * (255 - obj_rgb)
    return img


def _comic(lay: Layout, rng: np.random.Generator) -> np.ndarray:
    S = lay.obj.shape[0]
    flat = lambda rgb: _saturate(rgb, 1.3)  # noqa: E731
    img = _compose(lay, flat)
    # Halftone: a fixed dot grid (period S/16) darkens the background like cheap print.
    period = S / 16
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    d = np.hypot((xx % period) - period / 2, (yy % period) - period / 2)
    dots = (d < period * 0.28).astype(np.float32)
    img = img * (1 - 0.4 * dots[..., None])
    img = _over(img, lay.sparkles, (255, 255, 255))
    # Black ink where background regions meet.
    label = np.zeros((S, S), np.float32)
    for i, (mask, _) in enumerate(lay.regions):
        label = np.where(mask > 0.5, i, label)
    edges = (ndimage.maximum_filter(label, 3) != ndimage.minimum_filter(label, 3)).astype(np.float32)
    img = _over(img, edges, (0, 0, 0))
    # Cel shading: the object's lower-right part one flat tone darker.
    obj_rgb = flat(lay.obj_rgb)
    shifted = ndimage.shift(lay.obj, (-S / 20, -S / 20), order=0)
    shade = lay.obj * (1 - shifted)
    img = _over(img, lay.obj, obj_rgb)
    img = _over(img, shade, 0.7 * obj_rgb)
    return _over(img, _ring(lay.obj, max(2, S // 40)), (0, 0, 0))


_PAINTERS = {"plain": _plain, "pastel": _pastel, "vivid": _vivid, "comic": _comic}


def paint(lay: Layout, style: str, rng: np.random.Generator) -> np.ndarray:
    """Pixels (H×W×3, float, 0–255 before clipping) of a layout in a style."""
    if style not in _PAINTERS:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    return _PAINTERS[style](lay, rng)
