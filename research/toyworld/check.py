"""Judge a toy base model with the oracle: does it follow held-out prompts, and does it draw `plain`?

    python -m research.toyworld.check [--sd research/toyworld/weights/sd] [--num-images 64]

Samples the held-out prompts exactly as training's evaluation does (same sampler, steps, guidance,
prompts and seeds as research/configs/toy.json), so the numbers are the `baseline` arm of a
quickstart run. Prints content accuracy (shape and colour both right), the share of images the
oracle calls `plain`, and the accuracy of each oracle head, each with a 95% bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from research.atomic import write_json
from research.config import TOY_CONFIG, TrainConfig
from research.metrics.oracle import class_index, oracle_content_accuracy, oracle_style_accuracy
from research.metrics.stats import summarize
from research.models import load_pipeline, make_sampler
from research.sampling import generate, plan_jobs
from research.toyworld import ORACLE_DIR, SD_DIR
from research.toyworld.oracle import Oracle
from research.toyworld.scenes import HELDOUT_SCENES, caption, parse_caption


def judge_base_model(sd_dir: Path, oracle_dir: Path = ORACLE_DIR, num_images: int = 64, seed: int | None = None) -> dict:
    """Oracle verdicts on the base model's images of the held-out prompts, as {name: {mean, ci95, n}}."""
    cfg = TrainConfig.from_dict(json.loads(TOY_CONFIG.read_text()), source=str(TOY_CONFIG))
    pipe = make_sampler(load_pipeline(str(sd_dir)), cfg.sampler)
    pipe.set_progress_bar_config(disable=True)
    jobs = plan_jobs([caption(s) for s in HELDOUT_SCENES], num_images, cfg.seed if seed is None else seed)
    images = generate(pipe, jobs, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                      resolution=cfg.resolution, batch_size=cfg.sample_batch_size, desc="base model")
    oracle = Oracle.from_pretrained(oracle_dir)
    probs = {head: p.detach().cpu().numpy() for head, p in oracle.predict_proba(images).items()}
    scenes = [parse_caption(j.prompt) for j in jobs]
    # the same per-image scores as a run's oracle_content_accuracy / oracle_style_accuracy
    per_image = {"content": oracle_content_accuracy(probs, scenes, oracle.labels),
                 "plain": oracle_style_accuracy(probs, "plain", oracle.labels)}
    for head in ("shape", "colour", "background"):
        truth = [class_index(head, getattr(s, head), oracle.labels) for s in scenes]
        per_image[head] = probs[head].argmax(-1) == truth
    prompts, seeds = [j.prompt for j in jobs], [j.seed for j in jobs]
    result = {name: summarize(v, prompts, seeds, bounds=(0.0, 1.0)) for name, v in per_image.items()}
    styles = [oracle.labels["style"][i] for i in probs["style"].argmax(-1)]
    result["style_counts"] = {st: styles.count(st) for st in sorted(set(styles))}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd", type=Path, default=SD_DIR, help="toy SD folder to judge")
    parser.add_argument("--oracle", type=Path, default=ORACLE_DIR, help="oracle folder")
    parser.add_argument("--num-images", type=int, default=64, help="images over the held-out prompts")
    parser.add_argument("--seed", type=int, default=None, help="first sampling seed (default: the toy config's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num-images must be at least 1")
    result = judge_base_model(args.sd, args.oracle, args.num_images, args.seed)
    for name, value in result.items():
        if name != "style_counts":
            print(f"{name:>10}: {value['mean']:.3f}  [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]  n={value['n']}")
    print(f"{'styles':>10}: {result['style_counts']}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
