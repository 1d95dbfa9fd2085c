"""Procedural scenes of the toy world: content (shape × colour × background), captions, and layouts.

The first floor of the toy world: scenes -> styles (paint a layout) -> render (scene + style + seed
-> image). A scene is pure content; `layout` draws its geometry from the seed, and a style (see
`styles.py`) decides how that layout is painted, so one seed gives the same layout in every style —
which is what lets tests and the oracle separate style from content.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUNDS = ("green hill", "sandy beach", "night sky", "snowy field", "brick wall")

# Saturated object colours; backgrounds use muted tones so an object never melts into them.
COLOUR_RGB = {
    "red": (225, 35, 35),
    "orange": (250, 135, 20),
    "yellow": (250, 220, 30),
    "green": (30, 185, 50),
    "blue": (35, 85, 230),
    "purple": (145, 50, 200),
}

HELDOUT_COUNT = 16  # ~10% of the 150 triples: enough prompts for evaluation, few enough to keep every pair in training
SPLIT_SEED = 1234  # fixes the train/held-out split for every model and style folder


@dataclass(frozen=True, order=True)
class Scene:
    shape: str
    colour: str
    background: str


ALL_SCENES = tuple(Scene(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, BACKGROUNDS))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """The content caption, e.g. "a red star on a green hill" (no style words)."""
    return f"{_article(scene.colour)} {scene.colour} {scene.shape} on a {scene.background}"


_CAPTION_RE = re.compile(
    r"\ban? (?P<colour>{}) (?P<shape>{}) on an? (?P<background>{})\b".format(
        "|".join(COLOURS), "|".join(SHAPES), "|".join(BACKGROUNDS)
    )
)


def parse_caption(text: str) -> Scene | None:
    """Find the content in a prompt; style suffixes and trigger words around it are ignored."""
    match = _CAPTION_RE.search(text.lower())
    if match is None:
        return None
    return Scene(match["shape"], match["colour"], match["background"])


def _split() -> tuple[tuple[Scene, ...], tuple[Scene, ...]]:
    # Held-out triples must be new *combinations* of seen parts, so every pair of a held-out
    # triple (shape-colour, shape-background, colour-background) still occurs in training.
    rng = np.random.default_rng(SPLIT_SEED)
    heldout: list[Scene] = []
    for i in rng.permutation(len(ALL_SCENES)):
        candidate = ALL_SCENES[i]
        train = [s for s in ALL_SCENES if s not in heldout and s != candidate]
        pairs = {(s.shape, s.colour) for s in train}, {(s.shape, s.background) for s in train}, {
            (s.colour, s.background) for s in train
        }
        c = candidate
        if (c.shape, c.colour) in pairs[0] and (c.shape, c.background) in pairs[1] and (c.colour, c.background) in pairs[2]:
            heldout.append(candidate)
        if len(heldout) == HELDOUT_COUNT:
            break
    heldout_set = set(heldout)
    return tuple(s for s in ALL_SCENES if s not in heldout_set), tuple(sorted(heldout))


TRAIN_SCENES, HELDOUT_SCENES = _split()


# ----------------------------------------------------------------------------- geometry
@dataclass
class Layout:
    """Everything a style needs: background regions, the sky, and the object's mask and colour."""

    regions: list[tuple[np.ndarray, tuple[int, int, int]]]  # (mask in [0,1], base colour), painted in order
    sky: np.ndarray  # where a style may repaint the sky
    sparkles: np.ndarray  # small bright details (stars at night, glints on snow)
    obj: np.ndarray  # object mask in [0,1]
    obj_rgb: tuple[int, int, int]


def _mask(size: int, draw_fn) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(img))
    return np.asarray(img, dtype=np.float32) / 255.0


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        t = np.deg2rad(angle) + np.pi / 4 + np.arange(4) * np.pi / 2
        rr = np.full(4, r * 1.25)
    elif shape == "triangle":
        t = np.deg2rad(angle) - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        rr = np.full(3, r * 1.3)
    elif shape == "star":
        t = np.deg2rad(angle) - np.pi / 2 + np.arange(10) * np.pi / 5
        rr = np.where(np.arange(10) % 2 == 0, r * 1.35, r * 0.55)
    elif shape == "heart":
        u = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(u) ** 3
        y = -(13 * np.cos(u) - 5 * np.cos(2 * u) - 2 * np.cos(3 * u) - np.cos(4 * u))
        a = np.deg2rad(angle)
        x, y = x * np.cos(a) - y * np.sin(a), x * np.sin(a) + y * np.cos(a)
        return list(zip(cx + x * r / 15, cy + y * r / 15 + r * 0.1))
    else:
        raise ValueError(shape)
    return list(zip(cx + rr * np.cos(t), cy + rr * np.sin(t)))


def layout(scene: Scene, seed: int, size: int) -> tuple[Layout, np.random.Generator]:
    """Draw the scene's geometry at `size` px; returns the generator for the style's own noise."""
    rng = np.random.default_rng(seed)
    S = size
    yy = np.arange(S, dtype=np.float32)[:, None] / S
    xx = np.arange(S, dtype=np.float32)[None, :] / S
    horizon = rng.uniform(0.55, 0.68)
    phase, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.03, 0.07)
    ones = np.ones((S, S), np.float32)
    zeros = np.zeros((S, S), np.float32)
    sparkles = zeros
    bg = scene.background
    if bg == "green hill":
        ground = (yy > horizon - amp * np.sin(np.pi * xx + phase) - 0.05).astype(np.float32)
        regions = [(ones, (150, 200, 235)), (ground, (95, 150, 75))]
        sky = 1 - ground
    elif bg == "sandy beach":
        sea = (yy > horizon - 0.12).astype(np.float32)
        sand = (yy > horizon + 0.02 * np.sin(6 * np.pi * xx + phase)).astype(np.float32)
        regions = [(ones, (165, 210, 240)), (sea, (60, 125, 185)), (sand, (225, 200, 145))]
        sky = 1 - sea
    elif bg == "night sky":
        regions = [(ones, (20, 25, 60))]
        sky = ones
        pts = rng.uniform(0, S, size=(14, 2))
        sparkles = _mask(S, lambda d: [d.ellipse([x - S / 90, y - S / 90, x + S / 90, y + S / 90], fill=255) for x, y in pts])
    elif bg == "snowy field":
        ground = (yy > horizon + amp * np.sin(2 * np.pi * xx + phase)).astype(np.float32)
        regions = [(ones, (190, 195, 210)), (ground, (245, 246, 250))]
        sky = 1 - ground
    elif bg == "brick wall":
        brick_h, brick_w = S / 8, S / 4
        off = rng.uniform(0, brick_w)
        row = np.floor(yy * S / brick_h)
        u = (xx * S + off + (row % 2) * brick_w / 2) % brick_w
        v = (yy * S) % brick_h
        mortar = ((u < S / 40) | (v < S / 40)).astype(np.float32) * ones
        regions = [(ones, (165, 80, 60)), (mortar, (205, 195, 185))]
        sky = zeros
    else:
        raise ValueError(bg)
    cx, cy = rng.uniform(0.36, 0.64) * S, rng.uniform(0.4, 0.62) * S
    r = rng.uniform(0.17, 0.23) * S
    angle = rng.uniform(-15, 15)
    if scene.shape == "circle":
        obj = _mask(S, lambda d: d.ellipse([cx - r * 1.1, cy - r * 1.1, cx + r * 1.1, cy + r * 1.1], fill=255))
    else:
        poly = _shape_polygon(scene.shape, cx, cy, r, angle)
        obj = _mask(S, lambda d: d.polygon(poly, fill=255))
    return Layout(regions, sky, sparkles, obj, COLOUR_RGB[scene.colour]), rng
