"""The toy world: procedural styled scenes, and the tiny SD / CLIP / oracle pretrained on them (see shared/DESIGN.md §2).

    scenes -> styles -> render     content and layout, the four looks that paint a layout, the image
    generate                       style folders of rendered scenes (data/toy/<style>/)
    tokenizer, oracle              the word-level tokenizer; the classifier that judges style and content
    pretrain, check                pretraining the tiny models from scratch (resumable: pretrain_state); judging a base model
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SD_DIR = WEIGHTS_DIR / "sd"  # a diffusers StableDiffusionPipeline folder
CLIP_DIR = WEIGHTS_DIR / "clip"  # transformers CLIPModel + CLIPTokenizer + CLIPImageProcessor
ORACLE_DIR = WEIGHTS_DIR / "oracle"  # research.toyworld.oracle.Oracle

__all__ = ["WEIGHTS_DIR", "SD_DIR", "CLIP_DIR", "ORACLE_DIR"]
