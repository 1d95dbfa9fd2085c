"""Training-speed benchmark: steps/s and peak memory of the real training loop.

    python -m research.bench                                   # the embedded toy model on this machine
    python -m research.bench --model sd15 --resolution 512     # SD 1.5 shapes, random weights (GPU)

Random-pattern images, no tracking, no sampling: only `research.train.train` is timed. The
evaluation benchmark is `python -m research.bench_eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_style_folder(folder: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def main(argv: list[str] | None = None) -> int:
    from research.config import TrainConfig
    from research.random_models import build_random_pipeline
    from research.tracking import setup_logging
    from research.train import train

    parser = argparse.ArgumentParser(prog="python -m research.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="embedded | tiny | sd15 | a model folder or hub id")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps to time")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mixed-precision", default="auto")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--train-text-encoder", action="store_true")
    parser.add_argument("--out", default="", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    setup_logging()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model in {"tiny", "sd15"}:
            model = str(build_random_pipeline(tmp / "model", model))
        style = make_style_folder(tmp / "style", n=16, size=args.resolution)
        cfg = TrainConfig(style_dir=str(style), base_model=model, resolution=args.resolution,
                          train_batch_size=args.batch_size, rank=args.rank, lora_alpha=args.rank,
                          max_train_steps=args.steps, lr_warmup_steps=0, holdout_fraction=0.0,
                          checkpointing_steps=0, device=args.device, mixed_precision=args.mixed_precision,
                          gradient_checkpointing=args.gradient_checkpointing,
                          train_text_encoder=args.train_text_encoder, log_every=max(args.steps // 5, 1))
        cfg.validate()
        result = train(cfg, tmp / "run")
    report = dict(model=args.model, resolution=args.resolution, batch_size=args.batch_size, rank=args.rank,
                  steps=args.steps, gradient_checkpointing=args.gradient_checkpointing, **result.cost)
    print(json.dumps(report, indent=2))
    if args.out:
        from research.atomic import write_json

        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
