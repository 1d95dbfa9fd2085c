"""The typed run config: one dataclass and its JSON round-trip. The bottom floor: it imports only
research.errors (the flags built from it live beside it, in research/arguments.py).

Every knob has exactly one name, used by the CLI (``--rank`` or ``--rank``'s snake twin
``--lora_alpha``), by MLproject (``-P rank=16``), by the Makefile (``RANK=16``) and in
``config.json``. Defaults are the real-model recipe of the seed study (SD 1.5, 512 px); the
embedded toy default lives in ``research/configs/toy.json`` and is applied with ``--config``.

Precedence: dataclass defaults < ``--config`` file < flags typed on the command line or set to a
non-default value. Under ``mlflow run`` (which passes every parameter, typed or not) a flag left
at its default does not override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import string
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from research.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PACKAGE_DIR / "configs"
TOY_CONFIG = CONFIGS_DIR / "toy.json"


# The SD 1.5 recipes' learning rates, by method: what --learning-rate 0 (the default) means. LoRA 1e-4
# (diffusers train_text_to_image_lora), TI 5e-3 (diffusers textual_inversion: 5e-4 scaled by batch x
# accumulation), DreamBooth 5e-6 (diffusers train_dreambooth).
RECIPE_LEARNING_RATES = {"lora": 1e-4, "textual_inversion": 5e-3, "dreambooth": 5e-6}
# The values --method takes. The registry (research.methods.METHODS) implements exactly these and refuses
# any other name itself; a test keeps the two lists equal, so the config needs no import of the registry.
METHOD_NAMES = tuple(RECIPE_LEARNING_RATES)
# The names --metrics takes, in research.metrics' order. The metrics package computes exactly these; a
# test keeps the two lists equal, so the config checks a name without importing torch and the metrics.
METRIC_NAMES = ("clip_score", "style_similarity", "fid", "kid", "inception_score", "lpips_diversity",
                "oracle_style_accuracy", "oracle_content_accuracy")


@dataclass
class TrainConfig:
    # ── data ──────────────────────────────────────────────────────────────────────────────────
    style_dir: str = "data/ghibli"  # folder of style images with optional same-stem .txt captions
    style_name: str = ""  # used in the caption template and run names; empty = the folder's name
    caption_template: str = "an illustration in {style} style"  # caption for images without a .txt
    trigger_word: str = ""  # prepended to every caption (e.g. "ghbli"); empty = none
    validation_prompts_file: str = ""  # one prompt a line; empty = <style_dir>/validation_prompts.txt or defaults
    resolution: int = 512  # training and sampling size in pixels (SD 1.5 was trained at 512)
    center_crop: bool = True  # center crop after resizing; false = random crop (disables latent caching)
    random_flip: bool = True  # horizontal flip augmentation (cached latents keep both flips)
    holdout_fraction: float = 0.2  # images held out of training as evaluation references
    heldout_split: str = "all"  # references evaluation uses: all | selection | reporting (alternate halves of the held-out images, so a search selects on one and reports on the other)
    # ── base model ────────────────────────────────────────────────────────────────────────────
    base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id, diffusers folder, .safetensors, or "embedded"
    mixed_precision: str = "auto"  # auto = bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU
    device: str = "auto"  # auto = cuda if available, else cpu
    # ── method ────────────────────────────────────────────────────────────────────────────────
    method: str = "lora"  # which parameters train: lora | textual_inversion | dreambooth
    rank: int = 32  # LoRA rank r (seed default)
    lora_alpha: float = 16.0  # LoRA scale numerator: the update is (alpha / rank) * B @ A
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    unet_target_modules: str = "to_q,to_k,to_v,to_out.0"  # UNet attention projections that get LoRA
    train_text_encoder: bool = False  # also put LoRA on the text encoder (disables text-embedding caching)
    text_encoder_target_modules: str = "q_proj,k_proj,v_proj,out_proj"  # CLIP attention projections
    placeholder_token: str = "<style>"  # Textual Inversion: new token put in every caption and prompt (load_textual_inversion's token=)
    initializer_token: str = "painting"  # Textual Inversion: new vectors start at this word's embedding (mean of its pieces if it splits)
    num_vectors: int = 4  # Textual Inversion: vectors behind the placeholder; diffusers names them <style>, <style>_1, ...
    with_prior_preservation: bool = False  # DreamBooth: also train on base-model images of --class-prompt so the class is not forgotten
    prior_loss_weight: float = 1.0  # DreamBooth: lambda in loss = instance + lambda * prior (1 is the paper's choice)
    class_prompt: str = "an illustration"  # DreamBooth: prompt of the class images the base model generates before training
    num_class_images: int = 100  # DreamBooth: class images generated (seeded) for prior preservation
    # ── optimisation ──────────────────────────────────────────────────────────────────────────
    max_train_steps: int = 1000  # optimizer steps (after gradient accumulation)
    train_batch_size: int = 2  # images per device per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    learning_rate: float = 0.0  # AdamW learning rate of what the method trains; 0 = the method's SD 1.5 recipe (LoRA 1e-4, TI 5e-3, DreamBooth 5e-6)
    text_encoder_lr: float = 5e-5  # learning rate for text-encoder weights, when they train
    adam_weight_decay: float = 1e-2  # decoupled weight decay
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit (GPU only) to save optimizer memory
    lr_scheduler: str = "cosine_with_restarts"  # any diffusers scheduler name (constant, cosine, ...)
    lr_warmup_steps: int = 100  # linear warm-up steps
    lr_num_cycles: int = 3  # restarts for cosine_with_restarts
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    snr_gamma: float = 5.0  # min-SNR-gamma loss weighting; 5 is the paper's choice; 0 disables
    noise_offset: float = 0.0  # offset noise strength (0.05-0.1 helps very dark/bright images)
    caption_dropout: float = 0.0  # share of captions swapped for the empty prompt, so the style also reaches the unconditional branch that guidance subtracts
    prediction_type: str = ""  # epsilon | v_prediction; empty = what the base model's scheduler says
    gradient_checkpointing: bool = False  # trade compute for activation memory
    cache_latents: bool = True  # encode images once with the frozen VAE instead of every step
    seed: int = 1126  # seeds data order, noise, timesteps and sampling (seed study's value)
    # ── checkpoints ───────────────────────────────────────────────────────────────────────────
    checkpointing_steps: int = 500  # save resumable state every N steps; 0 = none (the adapter itself is always saved at the end)
    checkpoints_total_limit: int = 2  # keep this many resumable states; older ones are deleted
    resume_from_checkpoint: str = ""  # "latest" or a path to a state folder; needs --run-dir of that run
    # ── sampling ──────────────────────────────────────────────────────────────────────────────
    sampler: str = "dpm++"  # dpm++ | ddim | euler | default (the scheduler saved with the model)
    num_inference_steps: int = 30  # denoising steps per image
    guidance_scale: float = 7.5  # classifier-free guidance scale
    num_eval_images: int = 64  # images per arm (adapter and baseline): prompts x seeds
    validation_steps: int = 0  # log validation images to MLflow every N steps; 0 = only at the end
    sample_batch_size: int = 8  # images per pipeline call
    eval_seed_offset: int = 0  # added to --seed for the evaluation images; a search re-scores its best trial on fresh seeds
    # ── evaluation ────────────────────────────────────────────────────────────────────────────
    metrics: str = "clip_score,style_similarity,fid,kid,inception_score,lpips_diversity"  # computed at the end of training; "none" = skip
    clip_model: str = "openai/clip-vit-base-patch32"  # CLIP for clip_score/style_similarity: hub id or folder
    feature_extractor: str = "inception"  # FID/KID features: inception (real) | clip (CLIP image tower)
    inception_weights: str = ""  # local Inception weights for FID/KID/IS when offline
    lpips_weights: str = ""  # local AlexNet trunk for LPIPS; "random" = seeded random trunk
    oracle: str = ""  # folder of a style/content oracle (the toy world ships one)
    # ── tracking ──────────────────────────────────────────────────────────────────────────────
    experiment: str = "exp1"  # MLflow experiment and runs/<experiment>/ folder
    run_name: str = ""  # empty = <style_name>_<method>
    output_dir: str = "runs"  # root of run folders
    run_dir: str = ""  # continue in this existing run folder (for --resume-from-checkpoint)
    log_every: int = 10  # log loss/lr to MLflow and the progress bar every N steps

    # ─────────────────────────────────────────────────────────────────────────────────────────
    def __post_init__(self) -> None:
        if self.learning_rate == 0 and self.method in RECIPE_LEARNING_RATES:  # config.json keeps the rate that ran
            self.learning_rate = RECIPE_LEARNING_RATES[self.method]

    def resolved_style_name(self) -> str:
        return self.style_name or Path(self.style_dir).name

    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.resolved_style_name()}_{self.method}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source} has unknown keys {unknown}; valid keys are the flags of --help.")
        cfg = cls(**{k: _coerce(known[k], v, source) for k, v in values.items()})
        cfg.validate()
        return cfg

    @classmethod
    def from_json_file(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(read_config_file(path), source=str(path))

    def validate(self) -> None:
        """Sanity checks at the end of parsing, each with the fix in its message. Checks that need the
        loaded model (target modules, rank vs layer size, resolution vs the VAE) live in the loop's prepare()."""
        self._check_method()  # first: an unknown method has no recipe learning rate for the number checks
        self._check_numbers()
        self._check_choices()
        _check_caption_template(self.caption_template)
        self._check_metrics()
        if self.resume_from_checkpoint and not self.run_dir:
            raise ConfigError("--resume-from-checkpoint needs --run-dir pointing at the run folder to continue.")

    def _check_numbers(self) -> None:
        for f in fields(self):  # a NaN slips through every range check below, so refuse it first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{flag(f.name)} must be a finite number, got {value}.")
        positive = ["resolution", "max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                    "num_inference_steps", "num_eval_images", "sample_batch_size", "log_every",
                    "checkpoints_total_limit", "learning_rate", "lora_alpha", "text_encoder_lr"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{flag(name)} must be a positive number, got {getattr(self, name)}.")
        not_negative = ["checkpointing_steps", "lr_warmup_steps", "lr_num_cycles", "validation_steps",
                        "snr_gamma", "noise_offset", "max_grad_norm", "adam_weight_decay", "guidance_scale",
                        "num_class_images", "prior_loss_weight", "eval_seed_offset"]
        for name in not_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{flag(name)} must not be negative (0 turns it off), got {getattr(self, name)}.")
        for name in ["caption_dropout", "holdout_fraction", "lora_dropout"]:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{flag(name)} must be in [0, 1), got {getattr(self, name)}.")
        if self.resolution % 8:
            raise ConfigError(f"--resolution must be a multiple of 8 (the VAE's stride), got {self.resolution}.")

    def _check_choices(self) -> None:
        from diffusers.optimization import SchedulerType  # lazily: diffusers is heavy

        # piecewise_constant needs step rules that no flag carries
        schedulers = [s.value for s in SchedulerType if s.value != "piecewise_constant"]
        choices = {"mixed_precision": ["auto", "no", "fp16", "bf16"], "prediction_type": ["", "epsilon", "v_prediction"],
                   "sampler": ["dpm++", "ddim", "euler", "default"], "lr_scheduler": schedulers,
                   "feature_extractor": ["inception", "clip"], "heldout_split": ["all", "selection", "reporting"]}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = ", ".join(a for a in allowed if a)
                raise ConfigError(f"--{flag(name)} must be one of {shown}, got {getattr(self, name)!r}.")

    def metric_names(self) -> list[str]:
        """--metrics as a list; [] for "none"."""
        names = [m.strip() for m in self.metrics.split(",") if m.strip()]
        return [] if names == ["none"] else names

    def _check_metrics(self) -> None:
        """A misspelt metric is refused here, not after training and sampling have run."""
        unknown = [m for m in self.metric_names() if m not in METRIC_NAMES]
        if unknown:
            raise ConfigError(f"--metrics names unknown metric(s) {', '.join(unknown)}; choose from "
                              f"{', '.join(METRIC_NAMES)}, or none.")

    def _check_method(self) -> None:
        if self.method not in METHOD_NAMES:
            raise ConfigError(unknown_method_message(self.method))
        if self.method == "textual_inversion":
            if self.num_vectors <= 0:
                raise ConfigError(f"--num-vectors must be a positive integer, got {self.num_vectors}.")
            if not self.placeholder_token.strip() or any(ch.isspace() for ch in self.placeholder_token):
                raise ConfigError(f"--placeholder-token must be one word without spaces (e.g. <style>), "
                                  f"got {self.placeholder_token!r}.")
        if self.method == "dreambooth" and self.with_prior_preservation:
            if self.num_class_images <= 0 or not self.class_prompt.strip():
                raise ConfigError("--with-prior-preservation needs --num-class-images > 0 and a non-empty --class-prompt.")
        if self.method == "lora":
            if self.rank <= 0:
                raise ConfigError(f"--rank must be a positive integer, got {self.rank}.")
            targets = ["unet_target_modules"] + (["text_encoder_target_modules"] if self.train_text_encoder else [])
            for name in targets:
                if not [t for t in getattr(self, name).split(",") if t.strip()]:
                    raise ConfigError(f"--{flag(name)} is empty; name at least one layer (e.g. to_q,to_k,to_v,to_out.0).")

def unknown_method_message(method: str) -> str:
    return f"--method must be one of {', '.join(METHOD_NAMES)}, got {method!r}."


def flag(name: str) -> str:
    return name.replace("_", "-")


def _check_caption_template(template: str) -> None:
    """The template may name {style} only; a typo would otherwise surface as a KeyError mid-run."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ConfigError(f"--caption-template {template!r} is not a valid template ({err}); "
                          "write {{style}} for the style name and {{{{ }}}} for literal braces.") from None
    unknown = sorted(names - {"style"})
    if unknown:
        raise ConfigError(f"--caption-template {template!r} names unknown fields {unknown}; the only field is "
                          "{style} (use {{ }} for literal braces).")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The JSON object in a --config file, or a ConfigError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist or is not a regular file; pass an existing JSON "
                          "file to --config.")
    try:
        values = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {path} is not UTF-8 text; save it as UTF-8 JSON.") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"Config file {path} is not valid JSON ({err}); fix the file.") from None
    except OSError as err:
        raise ConfigError(f"Config file {path} cannot be read ({err.strerror}); fix its permissions.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {path} holds {type(values).__name__ if values is not None else 'null'}, "
                          'not a JSON object like {"rank": 16}; fix the file.')
    return values


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def field_type(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    kind = field_type(f)
    try:
        if kind is bool:
            return parse_bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ConfigError(f"{source}: {f.name} must be {kind.__name__}, got {value!r}.") from None


