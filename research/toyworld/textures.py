"""Procedural textures that are none of the toy world's styles: what makes the toy VAE general.

SD 1.5's VAE reconstructs almost any image because it was trained on almost every kind of image.
The v2 toy VAE gets some of that breadth from these families (pretrain.py trains it on them beside
the four looks), so that a style it has never seen, such as the woodcut look in `unseen.py`, survives
an encode/decode round trip and an adapter can learn it.

    stripes     parallel stripes at any angle, period from TRAIN_PERIODS, soft or hard edges
    crosshatch  two stripe sets at different angles, multiplied (ink over ink)
    dots        a regular dot lattice (halftone-like), any angle, radius and period
    checker     checkerboards and rectangular tilings in two or more colours
    gradient    smooth linear or radial blends of two or three colours
    noise       paper grain, value noise at several scales (clouds, blotches)
    polygons    random overlapping polygons and ellipses in a random palette
each optionally followed by a blur or a sharpen. Held out of VAE training, for measuring how well it
generalises (`HELDOUT_FAMILIES`): hatching at periods it never trained on, stipple (random dots),
and mosaic (irregular tiles with grout lines).

`texture(family, rng)` returns one 64×64 RGB uint8 image; the same generator state gives the same
pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIZE = 64
TRAIN_PERIODS = (4.0, 6.0, 9.0, 13.0, 18.0)  # px; hatching is evaluated at periods between these
HELDOUT_PERIODS = (5.0, 7.5, 11.0)
TRAIN_FAMILIES = ("stripes", "crosshatch", "dots", "checker", "gradient", "noise", "polygons")
HELDOUT_FAMILIES = ("hatching_new_periods", "stipple", "mosaic")


def palette(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random colours (n×3 float in 0–255), spread over hue, saturation and brightness."""
    return rng.uniform(0, 255, size=(n, 3)).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _mix(mask: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Colour b where mask is 1, colour a where it is 0 (mask H×W in [0, 1])."""
    return a * (1 - mask[..., None]) + b * mask[..., None]


def stripe_mask(rng: np.random.Generator, period: float, size: int = SIZE, angle: float | None = None) -> np.ndarray:
    """Parallel stripes, 1 on the stripe: random angle and phase, duty cycle 0.25–0.6, soft or hard edges."""
    yy, xx = _grid(size)
    theta = rng.uniform(0, np.pi) if angle is None else angle
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 1)
    duty = rng.uniform(0.25, 0.6)
    if rng.random() < 0.5:  # hard edges, as ink lines
        return ((u % 1.0) < duty).astype(np.float32)
    return (0.5 + 0.5 * np.cos(2 * np.pi * u)).astype(np.float32) ** (1 / (2 * duty))


def _stripes(rng, size, periods=TRAIN_PERIODS):
    colours = palette(rng, 2)
    return _mix(stripe_mask(rng, rng.choice(periods), size), colours[0], colours[1])


def _crosshatch(rng, size, periods=TRAIN_PERIODS):
    paper, ink = palette(rng, 2)
    first = stripe_mask(rng, rng.choice(periods), size)
    second = stripe_mask(rng, rng.choice(periods), size)
    return _mix(np.clip(first + second, 0, 1), paper, ink)


def _dots(rng, size):
    yy, xx = _grid(size)
    period, theta = rng.uniform(4, 16), rng.uniform(0, np.pi / 2)
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / period
    v = (-xx * np.sin(theta) + yy * np.cos(theta)) / period
    d = np.hypot((u % 1) - 0.5, (v % 1) - 0.5)
    paper, ink = palette(rng, 2)
    return _mix((d < rng.uniform(0.15, 0.45)).astype(np.float32), paper, ink)


def _checker(rng, size):
    yy, xx = _grid(size)
    w, h = rng.uniform(4, 24, size=2)
    colours = palette(rng, int(rng.integers(2, 5)))
    index = (np.floor(xx / w) + np.floor(yy / h) * rng.integers(1, 3)).astype(int) % len(colours)
    return colours[index]


def _gradient(rng, size):
    yy, xx = _grid(size)
    colours = palette(rng, 3)
    if rng.random() < 0.5:  # linear, any direction
        theta = rng.uniform(0, 2 * np.pi)
        t = (xx * np.cos(theta) + yy * np.sin(theta)) / size
        t = (t - t.min()) / (t.max() - t.min())
    else:  # radial around a random centre
        cy, cx = rng.uniform(0, size, size=2)
        t = np.hypot(xx - cx, yy - cy)
        t = t / t.max()
    if rng.random() < 0.5:
        return _mix(t, colours[0], colours[1])
    return np.where((t < 0.5)[..., None], _mix(2 * t, colours[0], colours[1]), _mix(2 * t - 1, colours[1], colours[2]))


def value_noise(rng: np.random.Generator, cells: int, size: int = SIZE) -> np.ndarray:
    """Smooth noise in [0, 1]: a cells×cells random grid, upsampled with cubic splines."""
    grid = rng.random((cells + 3, cells + 3))
    smooth = ndimage.zoom(grid, size / cells, order=3)
    start = int(size / cells)
    return np.clip(smooth[start : start + size, start : start + size], 0, 1).astype(np.float32)


def _noise(rng, size):
    colours = palette(rng, 2)
    octaves = [value_noise(rng, cells, size) * w for cells, w in ((2, 1.0), (4, 0.5), (8, 0.25), (16, 0.12))]
    t = sum(octaves) / 1.87
    img = _mix(t, colours[0], colours[1])
    return img + rng.normal(0, rng.uniform(0, 12), size=(size, size, 1))  # paper grain


def _polygons(rng, size):
    colours = palette(rng, 6).astype(np.uint8)
    img = Image.new("RGB", (2 * size, 2 * size), tuple(int(c) for c in colours[0]))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 9))):
        fill = tuple(int(c) for c in colours[rng.integers(1, 6)])
        if rng.random() < 0.3:
            x0, y0 = rng.uniform(-10, 2 * size, size=2)
            draw.ellipse([x0, y0, x0 + rng.uniform(8, size), y0 + rng.uniform(8, size)], fill=fill)
        else:
            points = rng.uniform(-10, 2 * size + 10, size=(int(rng.integers(3, 7)), 2))
            draw.polygon([tuple(p) for p in points], fill=fill)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), np.float32)


def _hatching_new_periods(rng, size):
    return _stripes(rng, size, periods=HELDOUT_PERIODS)


def _stipple(rng, size):
    """Random dots of ink on paper, denser where a smooth shading field is dark."""
    paper, ink = palette(rng, 2)
    shade = value_noise(rng, 3, size)
    dots = (rng.random((size, size)) < 0.08 + 0.5 * shade).astype(np.float32)
    return _mix(ndimage.maximum_filter(dots, size=int(rng.integers(1, 3))), paper, ink)


def _mosaic(rng, size):
    """Irregular tiles (nearest of random centres) in random colours, separated by grout lines."""
    yy, xx = _grid(size)
    n = int(rng.integers(12, 60))
    centres = rng.uniform(0, size, size=(n, 2))
    dist = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    tile = dist.argmin(-1)
    colours = palette(rng, n + 1)
    edge = (ndimage.maximum_filter(tile, 2) != ndimage.minimum_filter(tile, 2)).astype(np.float32)
    return _mix(edge, colours[tile], colours[n])


_FAMILIES = {
    "stripes": _stripes, "crosshatch": _crosshatch, "dots": _dots, "checker": _checker, "gradient": _gradient,
    "noise": _noise, "polygons": _polygons,
    "hatching_new_periods": _hatching_new_periods, "stipple": _stipple, "mosaic": _mosaic,
}  # fmt: skip


def _filter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half the time unchanged; else a blur or an unsharp mask of random strength."""
    choice = rng.random()
    if choice < 0.5:
        return img
    blurred = ndimage.gaussian_filter(img, sigma=(rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), 0))
    if choice < 0.75:
        return blurred
    return img + rng.uniform(0.5, 1.5) * (img - blurred)


def texture(family: str, rng: np.random.Generator, size: int = SIZE, filtered: bool = True) -> np.ndarray:
    """One size×size RGB uint8 image of a family; training families may be blurred or sharpened."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown texture family {family!r}; choose one of {', '.join(_FAMILIES)}")
    img = _FAMILIES[family](rng, size)
    if filtered and family in TRAIN_FAMILIES:
        img = _filter(img, rng)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
