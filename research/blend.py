"""Experiment IV: blend two style LoRAs by linear interpolation of their weight deltas.

    python -m research.blend --adapter-a runs/exp1/<pastel run> --adapter-b runs/exp1/<comic run> \
        --weights 0,0.25,0.5,0.75,1 --export-weight 0.5

At weight t every adapted layer gets (1-t)·ΔW_A + t·ΔW_B with ΔW = (alpha/r)·B·A. Interpolating the
A and B matrices separately would be wrong: ((1-t)B1 + tB2)((1-t)A1 + tA2) is not (1-t)B1A1 + tB2A2.
Sampling uses diffusers' multi-adapter (``set_adapters(["a", "b"], [1-t, t])``), which adds exactly
those two scaled deltas. ``--export-weight t`` writes ONE adapter file with the same delta: the two
ranks concatenated (down = [A1; A2], up = [(1-t)s1·B1, t·s2·B2], alpha = rank so the loaded scale
is 1), in diffusers keys plus the kohya/A1111 copy; it loads with plain ``load_lora_weights``.

Every t uses the same prompts and seeds. Output: ``runs/exp4/<timestamp>_<a>_x_<b>/`` with
``t_0.50/`` images, ``thumbnails/`` (one grid per prompt across t, and grid.png), ``metrics.json``
(per t: style similarity to A's and to B's held-out images, the oracle's probability of A's and B's
style when the configs name an oracle) and ``checkpoints/`` (the exported blend); one MLflow run in
experiment exp4.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file

from research.atomic import atomic_path, save_image, write_json
from research.arguments import add_config_arguments, apply_overrides
from research.config import ConfigError, TrainConfig
from research.data import DataError
from research.methods.lora import LoRA, peft_key, to_kohya
from research.metrics.stats import Design, summarize
from research.models import ModelNotFoundError

log = logging.getLogger("research")

WEIGHT_NAME = LoRA.weight_name
KOHYA_NAME = LoRA.kohya_name
DOWN, UP = ".lora_A.weight", ".lora_B.weight"  # peft's names, the one scheme adapter files use
METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps rank/alpha; load_lora_weights reads it
DEFAULT_EXPERIMENT = "exp4"
# Metrics measured against one style (its held-out images or its oracle class): computed once per side.
PER_STYLE = ("style_similarity", "fid", "kid", "oracle_style_accuracy")
# Flags that may override the sampling/evaluation settings read from adapter A's config.
FLAGS = ["base_model", "device", "mixed_precision", "sampler", "num_inference_steps", "guidance_scale",
         "num_eval_images", "sample_batch_size", "validation_prompts_file", "seed", "metrics", "clip_model",
         "feature_extractor", "inception_weights", "lpips_weights", "oracle", "experiment", "output_dir"]


class BlendError(ConfigError):
    """Two adapters that cannot be blended, or a path that is not one; the message says what to pass."""


# ─── adapters and their deltas ──────────────────────────────────────────────────────────────
@dataclass
class Adapter:
    label: str  # short name for folders, legends and the MLflow run
    checkpoint_dir: Path  # folder holding pytorch_lora_weights.safetensors
    tensors: dict[str, torch.Tensor]  # <component>.<module>.lora_{A,B}.weight
    lora_meta: dict  # diffusers' flat LoraConfig metadata: "unet.r", "unet.lora_alpha", ...
    cfg: TrainConfig  # the config it was trained with

    @property
    def modules(self) -> set[str]:
        return {k[:-len(DOWN)] for k in self.tensors if k.endswith(DOWN)}

    def scale(self, component: str) -> float:
        """alpha / r, as peft applies it (alpha / sqrt(r) for rsLoRA)."""
        r, alpha = self.lora_meta[f"{component}.r"], self.lora_meta[f"{component}.lora_alpha"]
        return alpha / (math.sqrt(r) if self.lora_meta.get(f"{component}.use_rslora") else r)

    def delta(self, module: str) -> torch.Tensor:
        """ΔW = (alpha/r)·B·A of one adapted layer (linear layers; conv kernels flattened)."""
        up, down = self.tensors[module + UP], self.tensors[module + DOWN]
        return self.scale(module.split(".")[0]) * (up.flatten(1) @ down.flatten(1))


def load_adapter(path: str | Path) -> Adapter:
    """A LoRA run folder (runs/exp1/<run>) or the checkpoints folder inside it."""
    path = Path(path)
    folder = next((d for d in (path / "checkpoints", path) if (d / WEIGHT_NAME).is_file()), None)
    if folder is None:
        raise BlendError(f"{path} has no {WEIGHT_NAME} (nor checkpoints/{WEIGHT_NAME}); pass the folder of a "
                         "finished LoRA run or its checkpoints folder.")
    with safe_open(folder / WEIGHT_NAME, framework="pt") as f:
        tensors = {peft_key(k): f.get_tensor(k).float() for k in f.keys()}  # files of earlier versions too
        meta = dict(f.metadata() or {})
    if METADATA_KEY not in meta:
        raise BlendError(f"{folder / WEIGHT_NAME} carries no rank/alpha metadata, so its scale is unknown; "
                         "blend adapters saved by research.train.")
    run_config = folder.parent / "config.json" if folder.name == "checkpoints" else folder / "config.json"
    values = (json.loads(run_config.read_text()) if run_config.is_file()
              else json.loads(meta.get("research_config", "{}")))
    if not values:  # without its config the adapter's style, data and base model are unknown: no guessing
        raise BlendError(f"{path} has neither config.json nor a config in its adapter metadata; blend adapters "
                         "saved by research.train.")
    cfg = TrainConfig.from_dict(values, source=str(run_config))
    if cfg.method != "lora" or meta.get("research_method", "lora") != "lora":
        raise BlendError(f"{path} holds a {cfg.method} run; only LoRA adapters are blended as weight deltas.")
    label = cfg.resolved_run_name()
    return Adapter(label, folder, tensors, json.loads(meta[METADATA_KEY]), cfg)


def check_compatible(a: Adapter, b: Adapter) -> None:
    for x in (a, b):
        odd = sorted(k for k in x.tensors if not k.endswith((DOWN, UP)))
        if odd:
            raise BlendError(f"Adapter {x.label} has tensors other than LoRA down/up weights (e.g. {odd[0]}); "
                             "blend plain LoRA adapters (no lora bias, no DoRA).")
        for component in {m.split(".")[0] for m in x.modules}:
            if x.lora_meta.get(f"{component}.use_dora") or x.lora_meta.get(f"{component}.rank_pattern") or \
                    x.lora_meta.get(f"{component}.alpha_pattern"):
                raise BlendError(f"Adapter {x.label} uses DoRA or per-layer rank/alpha patterns; blend plain "
                                 "LoRA adapters with one rank and alpha.")
    if a.modules != b.modules:
        only_a, only_b = sorted(a.modules - b.modules), sorted(b.modules - a.modules)
        raise BlendError(f"Adapters {a.label} and {b.label} target different modules ({len(only_a)} only in A, "
                         f"e.g. {(only_a or ['-'])[0]}; {len(only_b)} only in B, e.g. {(only_b or ['-'])[0]}); "
                         "blend adapters trained with the same --unet-target-modules and --train-text-encoder.")
    for m in sorted(a.modules):
        if a.tensors[m + UP].shape[0] != b.tensors[m + UP].shape[0] or \
                a.tensors[m + DOWN].shape[1:] != b.tensors[m + DOWN].shape[1:]:
            raise BlendError(f"Adapters {a.label} and {b.label} have different layer shapes at {m}; "
                             "blend adapters trained on the same base model.")
    if a.cfg.base_model != b.cfg.base_model:
        log.warning("adapters were trained on different base models (%s, %s); sampling uses %s",
                    a.cfg.base_model, b.cfg.base_model, a.cfg.base_model)


def blend_state_dict(a: Adapter, b: Adapter, t: float) -> tuple[dict[str, torch.Tensor], dict]:
    """One LoRA whose delta is exactly (1-t)·ΔW_A + t·ΔW_B: ranks concatenated, scales folded into up.

    B_mix·A_mix = [(1-t)s_A·B_A, t·s_B·B_B]·[A_A; A_B] = (1-t)s_A·B_A·A_A + t·s_B·B_B·A_B, and with
    alpha = r_mix the loader's scale is 1.
    """
    check_compatible(a, b)
    tensors, meta = {}, dict(a.lora_meta)
    for m in sorted(a.modules):
        component = m.split(".")[0]
        tensors[m + DOWN] = torch.cat([a.tensors[m + DOWN], b.tensors[m + DOWN]], dim=0).contiguous()
        tensors[m + UP] = torch.cat([(1 - t) * a.scale(component) * a.tensors[m + UP],
                                     t * b.scale(component) * b.tensors[m + UP]], dim=1).contiguous()
    for component in {m.split(".")[0] for m in a.modules}:
        rank = a.lora_meta[f"{component}.r"] + b.lora_meta[f"{component}.r"]
        meta.update({f"{component}.r": rank, f"{component}.lora_alpha": float(rank),
                     f"{component}.use_rslora": False})
    return tensors, meta


def export_blend(a: Adapter, b: Adapter, t: float, checkpoint_dir: Path) -> list[Path]:
    """Write the blended adapter (diffusers keys + rank/alpha metadata) and its kohya copy, atomically."""
    tensors, lora_meta = blend_state_dict(a, b, t)
    rank = lora_meta["unet.r"] if "unet.r" in lora_meta else next(v for k, v in lora_meta.items() if k.endswith(".r"))
    cfg = dataclasses.replace(a.cfg, rank=int(rank), lora_alpha=float(rank), run_name=f"{a.label}_x_{b.label}")
    provenance = {"a": str(a.checkpoint_dir), "b": str(b.checkpoint_dir), "t": t,
                  "scale_a": {c: a.scale(c) for c in {m.split(".")[0] for m in a.modules}},
                  "scale_b": {c: b.scale(c) for c in {m.split(".")[0] for m in b.modules}}}
    # the config travels with the weights, as for every adapter this project saves
    metadata = {"format": "pt", METADATA_KEY: json.dumps(lora_meta, indent=2, sort_keys=True),
                "research_method": "lora", "research_config": json.dumps(cfg.to_dict(), sort_keys=True),
                "research_blend": json.dumps(provenance, sort_keys=True)}
    out, kohya = checkpoint_dir / WEIGHT_NAME, checkpoint_dir / KOHYA_NAME
    with atomic_path(out) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    # to_kohya writes one alpha for every layer; alpha = each layer's own rank keeps the scale at 1
    # even when the UNet and text-encoder ranks differ
    converted = to_kohya(tensors, 1.0)
    converted = {k: (torch.tensor(float(converted[k[:-len(".alpha")] + ".lora_down.weight"].shape[0]))
                     if k.endswith(".alpha") else v) for k, v in converted.items()}
    with atomic_path(kohya) as tmp:
        save_file(converted, tmp, metadata={k: v for k, v in metadata.items() if k != METADATA_KEY})
    return [out, kohya]


# ─── sampling across t ──────────────────────────────────────────────────────────────────────
def t_label(t: float) -> str:
    return f"t_{t:.2f}" if abs(round(t, 2) - t) < 1e-9 else f"t_{t:g}"


def load_blend_pipeline(cfg: TrainConfig, a: Adapter, b: Adapter):
    from research.models import load_pipeline, make_sampler, pick_device, pick_precision, weight_dtype

    device = pick_device(cfg.device)
    pipe = load_pipeline(cfg.base_model, weight_dtype(pick_precision(cfg.mixed_precision, device))).to(device)
    pipe = make_sampler(pipe, cfg.sampler)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(a.checkpoint_dir), weight_name=WEIGHT_NAME, adapter_name="a")
    pipe.load_lora_weights(str(b.checkpoint_dir), weight_name=WEIGHT_NAME, adapter_name="b")
    return pipe


def render(pipe, cfg: TrainConfig, jobs, weights: list[float]) -> dict[float, list[Image.Image]]:
    from research.sampling import generate

    images = {}
    for t in weights:
        # diffusers scales each adapter's delta by its weight and adds them: exactly (1-t)ΔW_A + tΔW_B
        pipe.set_adapters(["a", "b"], adapter_weights=[1.0 - t, t])
        images[t] = generate(pipe, jobs, num_inference_steps=cfg.num_inference_steps,
                             guidance_scale=cfg.guidance_scale, resolution=cfg.resolution,
                             batch_size=cfg.sample_batch_size, desc=t_label(t))
    return images


def write_grids(images: dict[float, list[Image.Image]], jobs, out_dir: Path, per_prompt: int = 4) -> list[Path]:
    """Per prompt a grid: columns are t, rows are seeds; grid.png: one row per prompt (first seed)."""
    weights = list(images)
    w, h = images[weights[0]][0].size
    label = 14

    def grid(rows: list[int], names: list[str]) -> Image.Image:
        side = max(4, max(len(n) for n in names) * 6 + 4) if names else 0
        canvas = Image.new("RGB", (side + w * len(weights), label + h * len(rows)), "white")
        draw = ImageDraw.Draw(canvas)
        for col, t in enumerate(weights):
            draw.text((side + col * w + 2, 1), f"t={t:g}", fill="black")
            for row, k in enumerate(rows):
                canvas.paste(images[t][k], (side + col * w, label + row * h))
        for row, name in enumerate(names):
            draw.text((2, label + row * h + h // 2 - 5), name, fill="black")
        return canvas

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    prompts = sorted({j.prompt_index for j in jobs})
    for index in prompts:
        rows = [k for k, j in enumerate(jobs) if j.prompt_index == index][:per_prompt]
        path = out_dir / f"p{index:02d}_blend.png"
        save_image(grid(rows, []), path)
        written.append(path)
    firsts = [next(k for k, j in enumerate(jobs) if j.prompt_index == index) for index in prompts]
    path = out_dir / "grid.png"
    save_image(grid(firsts, [f"p{i:02d}" for i in prompts]), path)
    return written + [path]


# ─── metrics across t ───────────────────────────────────────────────────────────────────────
def _references(x: Adapter) -> list[Image.Image] | None:
    """The style's held-out images, split exactly as its training run split them."""
    from research.data import load_style_folder

    c = x.cfg
    try:
        data = load_style_folder(c.style_dir, style_name=c.style_name, resolution=c.resolution,
                                 caption_template=c.caption_template, trigger_word=c.trigger_word,
                                 holdout_fraction=c.holdout_fraction, seed=c.seed)
    except DataError as err:
        log.warning("no references for adapter %s (%s); its reference metrics are skipped", x.label, err)
        return None
    if len(data.heldout) < 2:
        log.warning("adapter %s has %d held-out image(s); its reference metrics need 2 and are skipped",
                    x.label, len(data.heldout))
        return None
    return [e.image for e in data.heldout]


def evaluate_blend(cfg: TrainConfig, images: dict[float, list[Image.Image]], jobs, a: Adapter, b: Adapter) -> dict:
    """{"t_0.50": {"clip_score": {...}, "style_similarity_a": {...}, "oracle_style_prob_b": {...}}, ...}.

    Backbones load once and every image set's features are extracted once; metrics against one style
    are then scored against A's and against B's references (suffix _a, _b), the rest once.
    """
    from research.evaluation import load_oracle, metric_names
    from research.metrics import (MissingWeightsError, image_features, load_backbones, metric_interval,
                                  metric_replicates)
    from research.metrics.features import clip_text_features
    from research.models import pick_device

    names = metric_names(cfg)
    if not names:
        return {}
    try:
        bk = load_backbones(names, clip_model=cfg.clip_model, inception_weights=cfg.inception_weights or None,
                            lpips_weights=cfg.lpips_weights or None, oracle=load_oracle(cfg.oracle, pick_device(cfg.device)),
                            feature_extractor=cfg.feature_extractor, device=str(pick_device(cfg.device)), seed=cfg.seed)
    except MissingWeightsError as err:
        log.error("evaluation skipped: %s", err)  # the images are kept; the fix is in the message
        return {"evaluation_error": str(err)}
    design = Design.of([j.prompt for j in jobs], [j.seed for j in jobs])
    sides = {side: _side(bk, x, design) for side, x in (("a", a), ("b", b))}
    text = clip_text_features(bk.clip, [j.prompt for j in jobs]) if "clip_score" in bk.metrics else None
    results = {}
    for t, imgs in images.items():
        feats = image_features(bk, imgs, t_label(t), progress=False)
        out = {}
        for m in bk.metrics:
            if m not in PER_STYLE:
                r, extras = metric_replicates(bk, m, feats, None, design, text)
                out[m] = {**metric_interval(m, r), **extras}
                continue
            for side, s in sides.items():
                if s.design is not None and (m != "oracle_style_accuracy" or s.style_index is not None):
                    r, extras = metric_replicates(bk, m, feats, s.references, s.design, text, s.style)
                    out[f"{m}_{side}"] = {**metric_interval(m, r), **extras}
        for side, s in sides.items():
            if "oracle" in feats and s.style_index is not None:
                # the oracle's probability of each style: the "does the mix move smoothly" curve
                out[f"oracle_style_prob_{side}"] = dict(summarize(
                    feats["oracle"]["style"][:, s.style_index], design.prompts, design.seeds, (0.0, 1.0)),
                    backbone="oracle")
        results[t_label(t)] = out
    return results


@dataclass
class _Side:
    style: str
    style_index: int | None  # the style's oracle class, None without an oracle or when it has no such class
    references: dict | None  # reference features
    design: Design | None  # the evaluation design with this side's reference count; None without references


def _side(bk, x: Adapter, design: Design) -> _Side:
    from research.metrics import image_features
    from research.metrics.oracle import class_index

    style, index = x.cfg.resolved_style_name(), None
    if bk.oracle is not None:
        if style in bk.oracle.labels.get("style", []):
            index = class_index("style", style, bk.oracle.labels)
        else:
            log.warning("the oracle has no style %r (adapter %s); its oracle metrics are skipped", style, x.label)
    refs = _references(x)
    if refs is None:
        return _Side(style, index, None, None)
    feats = image_features(bk, refs, f"references {x.label}", references=True, progress=False)
    return _Side(style, index, feats, dataclasses.replace(design, n_reference=len(refs)))


# ─── the whole run ──────────────────────────────────────────────────────────────────────────
def run_blend(a_path: str, b_path: str, weights: list[float], export_weight: float | None, args,
              track: bool = True) -> Path:
    from research.data import read_validation_prompts
    from research.sampling import plan_jobs, save_set
    from research.tracking import Tracker, flatten_metrics, new_run_dir, setup_logging

    a, b = load_adapter(a_path), load_adapter(b_path)
    if a.label == b.label:  # two runs of one style: tell them apart in folder names and legends
        a.label, b.label = f"{a.label}_a", f"{b.label}_b"
    check_compatible(a, b)
    cfg = apply_overrides(a.cfg, args, FLAGS)
    prompts = []
    for x in (a, b):  # both styles' prompts, so neither side is favoured
        for p in read_validation_prompts(Path(x.cfg.style_dir), x.cfg.resolved_style_name(),
                                         cfg.validation_prompts_file):
            if p not in prompts:
                prompts.append(p)
    name = f"{a.label}_x_{b.label}"
    run_dir = new_run_dir(cfg.output_dir, cfg.experiment, name)
    (run_dir / "thumbnails").mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir / "logs.txt")
    blend_config = {"adapter_a": str(a.checkpoint_dir), "adapter_b": str(b.checkpoint_dir), "weights": weights,
                    "export_weight": export_weight, "prompts": prompts, "config": cfg.to_dict()}
    write_json(run_dir / "config.json", blend_config)
    tags = {"experiment": cfg.experiment, "method": "lora_blend", "adapter_a": a.label, "adapter_b": b.label,
            "style_a": a.cfg.resolved_style_name(), "style_b": b.cfg.resolved_style_name(),
            "base_model": cfg.base_model, "run_dir": str(run_dir),
            "mlflow.runName": name}  # also names the run `mlflow run -e blend` opened
    tracker = Tracker(run_dir, cfg.experiment, name, tags, enabled=track)
    log.info("blend %s x %s at t = %s -> %s", a.label, b.label, weights, run_dir)
    try:
        tracker.log_params({"adapter_a": str(a_path), "adapter_b": str(b_path),
                            "weights": ",".join(f"{t:g}" for t in weights),
                            "export_weight": "" if export_weight is None else f"{export_weight:g}",
                            **{k: getattr(cfg, k) for k in FLAGS if k not in ("experiment", "output_dir")},
                            "resolution": cfg.resolution, "rank_a": a.lora_meta.get("unet.r"),
                            "rank_b": b.lora_meta.get("unet.r")})
        if export_weight is not None:
            files = export_blend(a, b, export_weight, run_dir / "checkpoints")
            log.info("exported the blend at t=%g: %s", export_weight, ", ".join(map(str, files)))
        metrics: dict = {"weights": weights, "n_images": 0, "a": {"label": a.label, "style": a.cfg.resolved_style_name()},
                         "b": {"label": b.label, "style": b.cfg.resolved_style_name()}}
        if weights:
            jobs = plan_jobs(prompts, cfg.num_eval_images, cfg.seed)
            images = render(load_blend_pipeline(cfg, a, b), cfg, jobs, weights)
            for t, imgs in images.items():
                save_set(imgs, jobs, run_dir / t_label(t))
            write_grids(images, jobs, run_dir / "thumbnails")
            metrics["n_images"] = len(jobs)
            metrics.update(evaluate_blend(cfg, images, jobs, a, b))
        write_json(run_dir / "metrics.json", metrics)
        per_t = {k: v for k, v in metrics.items() if k.startswith("t_")}
        tracker.log_metrics(flatten_metrics(per_t))  # t_0.50.style_similarity_a: one column per t in the UI
        for step, key in enumerate(per_t):  # and one curve per metric, step = index of t
            tracker.log_metrics(flatten_metrics(per_t[key]), step=step)
        tracker.log_folder()
        tracker.finish("FINISHED")
    except BaseException:
        log.exception("blend failed")
        tracker.fail()
        raise
    return run_dir


def parse_weights(text: str) -> list[float]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        weights = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--weights must be comma-separated numbers like 0,0.25,0.5,0.75,1, got {text!r}.") from None
    if not all(math.isfinite(t) for t in weights):
        raise ConfigError(f"--weights must be finite numbers, got {text!r}.")
    return list(dict.fromkeys(weights))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m research.blend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter-a", "--adapter_a", dest="adapter_a", required=True,
                        help="LoRA run folder (or its checkpoints folder) of style A (t=0)")
    parser.add_argument("--adapter-b", "--adapter_b", dest="adapter_b", required=True,
                        help="LoRA run folder (or its checkpoints folder) of style B (t=1)")
    parser.add_argument("--weights", default="0,0.25,0.5,0.75,1",
                        help="blend weights t to sample (0 = A, 1 = B); 'none' = export only")
    parser.add_argument("--export-weight", "--export_weight", dest="export_weight", default="",
                        help="also write one blended adapter file at this t; empty = none")
    add_config_arguments(parser, names=FLAGS)
    parser.set_defaults(experiment=DEFAULT_EXPERIMENT)  # blends go to exp4 unless --experiment says otherwise
    parser.add_argument("--no-tracking", action="store_true", help="write the run folder only, no MLflow run")
    return parser


def main(argv: list[str] | None = None) -> int:
    from research.tracking import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        weights = parse_weights(args.weights)
        export = None
        if str(args.export_weight).strip():
            try:
                export = float(args.export_weight)
            except ValueError:
                export = float("nan")
            if not math.isfinite(export):
                raise ConfigError(f"--export-weight must be a finite number like 0.5, got {args.export_weight!r}.")
        if not weights and export is None:
            raise ConfigError("Nothing to do: pass --weights to sample or --export-weight to write a blended adapter.")
        run_dir = run_blend(args.adapter_a, args.adapter_b, weights, export, args, track=not args.no_tracking)
    except (ConfigError, DataError, ModelNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\nDone. Blend folder: {run_dir}\n  grids:   {run_dir / 'thumbnails'}\n  metrics: {run_dir / 'metrics.json'}"
          + (f"\n  adapter: {run_dir / 'checkpoints' / WEIGHT_NAME}" if export is not None else "")
          + f"\n  figure:  python reports/blend_figure.py --run-dir {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
