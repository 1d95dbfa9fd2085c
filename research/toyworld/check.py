"""Judge a toy base model with the oracle: does it follow held-out prompts, and does it draw `plain`?

    python -m research.toyworld.check [--sd research/toyworld/weights/sd] [--num-images 64] [--probe]

Samples the held-out prompts exactly as training's evaluation does (same sampler, steps, guidance,
prompts and seeds as research/configs/toy.json), so the numbers are the `baseline` arm of a
quickstart run. Prints content accuracy (shape and colour both right), the share of images the
oracle calls `plain`, and the accuracy of each oracle head, each with a 95% interval (prompts and seeds
are clusters, research/metrics/stats.py).

`--probe` asks whether an extra word wipes the content out: every prompt gets one inserted word
(captions.py's `probe`) — an unknown token, or a style-free filler word — at its start, its middle or
its end, sampled with the same seeds; content accuracy is reported for each, with its paired
difference from the unprobed prompts (issue 10's target: within 5 points). Each prompt keeps its word
at all three positions, so positions compare like with like.

`--textual-inversion DIR` loads a learned embedding (a Textual Inversion run's checkpoint folder)
into the base model, and the probe word becomes its placeholder token: content accuracy with the
learned token at the start, in the middle and at the end (where training puts it), each paired with
the same prompts and seeds without the token. It says whether the token's content loss depends on
where it stands.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

from research.atomic import write_json
from research.config import TOY_CONFIG, TrainConfig
from research.errors import UserError
from research.methods.textual_inversion import TextualInversion
from research.metrics.oracle import class_index, oracle_content_accuracy, oracle_style_accuracy
from research.metrics.stats import summarize
from research.models import load_pipeline, make_sampler
from research.sampling import Job, generate, plan_jobs
from research.toyworld import ORACLE_DIR, SD_DIR
from research.toyworld.captions import FILLERS, POSITIONS, probe, unknown_token
from research.toyworld.oracle import Oracle
from research.toyworld.scenes import HELDOUT_SCENES, caption, parse_caption

TI_WEIGHTS = TextualInversion.weight_name


PROBE_WORDS = ("unknown", "filler")  # a made-up token (a TI placeholder, a typo) and a word with no content or style


def probe_words(prompts: list[str], kind: str, seed: int) -> dict[str, str]:
    """One word of `kind` per distinct prompt, drawn from `seed`: a prompt keeps its word at every position.
    A kind outside PROBE_WORDS is itself the word (a learned placeholder token)."""
    if kind not in PROBE_WORDS:
        return {p: kind for p in dict.fromkeys(prompts)}
    rng = np.random.default_rng([seed, PROBE_WORDS.index(kind)])
    draw = (lambda: unknown_token(rng)) if kind == "unknown" else (lambda: FILLERS[rng.integers(len(FILLERS))])
    return {p: draw() for p in dict.fromkeys(prompts)}


def probed_jobs(jobs: list[Job], kind: str, position: str, seed: int) -> list[Job]:
    """The same jobs (prompt index, seed) with each prompt's word of `kind` inserted at `position`."""
    words = probe_words([j.prompt for j in jobs], kind, seed)
    return [dataclasses.replace(j, prompt=probe(j.prompt, words[j.prompt], position)) for j in jobs]


def _oracle_probs(pipe, cfg: TrainConfig, oracle: Oracle, jobs: list[Job], desc: str) -> dict:
    """The oracle's class probabilities for the base model's images of `jobs`, sampled as a run samples."""
    images = generate(pipe, jobs, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                      resolution=cfg.resolution, batch_size=cfg.sample_batch_size, desc=desc)
    return {head: p.detach().cpu().numpy() for head, p in oracle.predict_proba(images).items()}


def probe_content(pipe, cfg: TrainConfig, oracle: Oracle, jobs: list[Job], content: np.ndarray, seed: int,
                  kinds: tuple[str, ...] = PROBE_WORDS) -> dict:
    """{"<word>_<position>": {"content", "delta", "example"}}: content accuracy with one inserted word per
    prompt, and its paired difference from the unprobed images `content` (same seeds, same truth)."""
    scenes = [parse_caption(j.prompt) for j in jobs]  # the truth stays the unprobed prompt's scene
    prompts, seeds = [j.prompt for j in jobs], [j.seed for j in jobs]
    out = {}
    for kind in kinds:
        for position in POSITIONS:
            probed = probed_jobs(jobs, kind, position, seed)
            probs = _oracle_probs(pipe, cfg, oracle, probed, f"{kind} word, {position}")
            right = oracle_content_accuracy(probs, scenes, oracle.labels)
            out[f"{kind}_{position}"] = {"content": summarize(right, prompts, seeds, bounds=(0.0, 1.0)),
                                         "delta": summarize(right - content, prompts, seeds, bounds=(-1.0, 1.0)),
                                         "example": probed[0].prompt}
    return out


def judge_base_model(sd_dir: Path, oracle_dir: Path = ORACLE_DIR, num_images: int = 64, seed: int | None = None,
                     with_probe: bool = False, config: Path = TOY_CONFIG, textual_inversion: Path | None = None) -> dict:
    """Oracle verdicts on the base model's images of the held-out prompts, as {name: {mean, ci95, n}};
    with_probe adds {"probe": probe_content(...)}. `config` gives the sampler, steps, guidance and size.
    `textual_inversion`: a checkpoint folder whose learned token is loaded and becomes the probe word."""
    cfg = TrainConfig.from_json_file(config)
    pipe = make_sampler(load_pipeline(str(sd_dir)), cfg.sampler)
    kinds = PROBE_WORDS if textual_inversion is None else (load_learned_token(pipe, textual_inversion),)
    pipe.set_progress_bar_config(disable=True)
    seed = cfg.seed if seed is None else seed
    jobs = plan_jobs([caption(s) for s in HELDOUT_SCENES], num_images, seed)
    oracle = Oracle.from_pretrained(oracle_dir)
    probs = _oracle_probs(pipe, cfg, oracle, jobs, "base model")
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
    if with_probe:
        result["probe"] = probe_content(pipe, cfg, oracle, jobs, per_image["content"], seed, kinds)
    return result


def load_learned_token(pipe, checkpoint: Path) -> str:
    """Load a Textual Inversion checkpoint's embedding into `pipe`; returns its placeholder token."""
    path = checkpoint / TI_WEIGHTS if checkpoint.is_dir() else checkpoint
    if not path.is_file():
        raise UserError(f"--textual-inversion {checkpoint}: no {TI_WEIGHTS} there; give a Textual Inversion "
                        f"run's checkpoint folder (the one holding {TI_WEIGHTS}).")
    with safe_open(str(path), framework="pt") as f:
        (token,) = f.keys()  # the file maps its one placeholder token to its vectors
    pipe.load_textual_inversion(str(path), token=token)
    return token


def _cell(v: dict, signed: bool = False) -> str:
    f = "+.3f" if signed else ".3f"
    return f"{v['mean']:{f}}  [{v['ci95'][0]:{f}}, {v['ci95'][1]:{f}}]"


def print_result(result: dict) -> None:
    for name, value in result.items():
        if name not in ("style_counts", "probe"):
            print(f"{name:>10}: {_cell(value)}  n={value['n']}")
    print(f"{'styles':>10}: {result['style_counts']}")
    if "probe" in result:
        print("content with one word inserted per prompt (same seeds), and its paired difference from the plain prompts:")
        for name, v in result["probe"].items():
            print(f"{name:>16}: {_cell(v['content'])}  diff {_cell(v['delta'], signed=True)}  "
                  f"n={v['content']['n']}  e.g. {v['example']!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd", type=Path, default=SD_DIR, help="toy SD folder to judge")
    parser.add_argument("--oracle", type=Path, default=ORACLE_DIR, help="oracle folder")
    parser.add_argument("--num-images", type=int, default=64, help="images over the held-out prompts")
    parser.add_argument("--seed", type=int, default=None, help="first sampling seed (default: the config's)")
    parser.add_argument("--config", type=Path, default=TOY_CONFIG, help="run config whose sampling settings are used")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--textual-inversion", type=Path, default=None, metavar="DIR",
                        help="a Textual Inversion checkpoint folder: with --probe, its learned token is the inserted word")
    parser.add_argument("--probe", action="store_true",
                        help="also sample every prompt with an unknown token / a filler word at its start, middle "
                             "and end (6 more sets of --num-images) and report the content kept")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num-images must be at least 1")
    try:
        result = judge_base_model(args.sd, args.oracle, args.num_images, args.seed, args.probe, args.config,
                                  args.textual_inversion)
    except UserError as err:  # a bad --config or --sd: its one sentence, no traceback
        parser.error(str(err))
    print_result(result)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
