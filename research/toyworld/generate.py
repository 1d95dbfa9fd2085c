"""Write toy style folders in exactly the layout users give the trainer.

    python -m research.toyworld.generate --out data/toy --styles pastel,vivid,comic,plain --images-per-style 288
    python -m research.toyworld.generate --out data --styles woodcut    # data/woodcut: a look no toy component knows

Each `<out>/<style>/` holds `0000.png` + `0000.txt` (the content caption, no style words), … and
`validation_prompts.txt` (held-out content captions). Images use training scenes only, so the
validation prompts are combinations no model and no style folder has seen. Besides the four styles
pretraining knows, a folder can be written in a look no toy component was trained on (`unseen.py`),
with the same captions: training on it shows that a LoRA learns a look rather than recalls one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from research.atomic import replace_folder
from research.toyworld.render import render
from research.toyworld.scenes import HELDOUT_SCENES, TRAIN_SCENES, caption
from research.toyworld.styles import STYLES
from research.toyworld.unseen import UNSEEN_LOOKS, render_unseen

IMAGES_PER_STYLE = 288  # ~2 layouts of each of the 134 training triples: a LoRA on 96 kept far less content (48% vs 69%)
FOLDER_SEED_OFFSET = 500_000_000  # style-folder layouts never coincide with pretraining (< 10^8) or test seeds (≥ 9·10^8)
LOOKS = (*STYLES, *UNSEEN_LOOKS)  # a look's index keeps each folder's seeds apart; new looks go at the end


def render_look(scene, look: str, seed: int):
    """A style pretraining knows (render.py) or a look none of it was trained on (unseen.py)."""
    return render(scene, look, seed) if look in STYLES else render_unseen(scene, look, seed)


def generate_style_folder(out_dir: str | Path, style: str, n_images: int, seed: int = 0) -> Path:
    """Write `out_dir/<style>/` atomically (a temporary folder renamed into place); returns its path."""
    if style not in LOOKS:
        raise ValueError(f"unknown style {style!r}; choose from {', '.join(LOOKS)}")
    style_index = LOOKS.index(style)

    def fill(tmp: Path) -> None:
        tmp.mkdir()
        rng = np.random.default_rng([seed, style_index])
        # Cycle through a shuffled list of training scenes, so a small folder still covers many triples.
        order = [TRAIN_SCENES[i] for i in rng.permutation(len(TRAIN_SCENES))]
        for i in range(n_images):
            scene = order[i % len(order)]
            image_seed = FOLDER_SEED_OFFSET + seed * 1_000_000 + style_index * 100_000 + i
            render_look(scene, style, image_seed).save(tmp / f"{i:04d}.png")
            (tmp / f"{i:04d}.txt").write_text(caption(scene) + "\n")
        (tmp / "validation_prompts.txt").write_text("".join(caption(s) + "\n" for s in HELDOUT_SCENES))

    return replace_folder(Path(out_dir) / style, fill)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/toy"), help="parent folder; one sub-folder per style")
    parser.add_argument("--styles", default="pastel,vivid,comic,plain", help=f"comma-separated, from {','.join(LOOKS)}")
    parser.add_argument("--images-per-style", type=int, default=IMAGES_PER_STYLE, help="images (and captions) per style folder")
    parser.add_argument("--seed", type=int, default=0, help="changes scene order and layouts; same seed, same files")
    args = parser.parse_args(argv)
    styles = [s for s in args.styles.split(",") if s]
    if unknown := [s for s in styles if s not in LOOKS]:
        parser.error(f"unknown style(s) {unknown}; choose from {','.join(LOOKS)}")
    if args.images_per_style < 1:
        parser.error("--images-per-style must be at least 1")
    for style in styles:
        path = generate_style_folder(args.out, style, args.images_per_style, args.seed)
        print(f"wrote {args.images_per_style} images to {path}")


if __name__ == "__main__":
    main()
