"""Toy-world images: a scene's layout painted in a style, anti-aliased to the final size.

The top of the toy world's three floors (scenes -> styles -> render). The geometry is drawn from the
seed first and only then the style's own noise, so one seed gives the same layout in every style.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from research.toyworld.scenes import Scene, layout
from research.toyworld.styles import paint


def render(scene: Scene, style: str, seed: int, size: int = 64) -> Image.Image:
    """An RGB image of `scene` in `style`; the same (scene, style, seed, size) gives the same pixels."""
    return render_with(lambda lay, rng: paint(lay, style, rng), scene, seed, size)


def render_with(painter: Callable, scene: Scene, seed: int, size: int = 64) -> Image.Image:
    """`painter(layout, rng) -> pixels` applied to the scene's layout: any look, the same geometry per seed."""
    # Draw at twice the size and downsample, so edges are anti-aliased like real images.
    lay, rng = layout(scene, seed, 2 * size)
    img = Image.fromarray(np.clip(painter(lay, rng), 0, 255).astype(np.uint8), "RGB")
    return img.resize((size, size), Image.Resampling.BOX)
