"""Command-line flags built from the typed run config: the bottom floor, beside research/config.py.

One flag per TrainConfig field (``--kebab-case`` and its ``--snake_case`` twin), grouped by the
config's sections, with the knob comments as help text; the precedence rules (defaults < --config
file < typed flags) that turn parsed flags into a TrainConfig; and the one-line parser every CLI uses.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from research import config
from research.config import TrainConfig, field_type, parse_bool, read_config_file

CONFIG_SOURCE = Path(config.__file__)  # --help reads the knob comments and section lines of the dataclass


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives the one `error:` line every other bad input gives (no usage dump)."""

    def error(self, message: str):
        print(f"error: {message.rstrip('.')}; see {self.prog} --help.", file=sys.stderr)
        sys.exit(2)


def _help_comments() -> dict[str, str]:
    """The knob comments in config.py become the --help text, so docs and code cannot drift."""
    comments = {}
    for line in CONFIG_SOURCE.read_text().splitlines():
        stripped = line.strip()
        if ":" in stripped and "=" in stripped and "  # " in stripped and not stripped.startswith("#"):
            name = stripped.split(":", 1)[0].strip()
            comments[name] = stripped.split("  # ", 1)[1]
    return comments


class TypedFlag(argparse.Action):
    """Stores the value and remembers that the flag was typed (defaults never pass through here)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        typed = set(getattr(namespace, "_typed", set()))
        namespace._typed = typed | {self.dest}


def _sections() -> dict[str, str]:
    """Each field's section in TrainConfig ("# ── data ──" lines), so --help lists the flags in groups."""
    sections, current = {}, "options"
    names = {f.name for f in fields(TrainConfig)}
    for line in CONFIG_SOURCE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# ──") and stripped.strip("# ─"):
            current = stripped.strip("# ─").strip()
        elif ":" in stripped and stripped.split(":", 1)[0] in names:
            sections.setdefault(stripped.split(":", 1)[0], current)
    return sections


def add_config_arguments(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """Add one flag per config field (``--kebab-case`` and its ``--snake_case`` twin), grouped by section."""
    comments, sections, groups = _help_comments(), _sections(), {}
    parser.add_argument("--config", default="", help="JSON file of config values (e.g. research/configs/toy.json)")
    for f in fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        section = sections.get(f.name, "options")
        if section not in groups:
            groups[section] = parser.add_argument_group(section)
        kind = field_type(f)
        flags = [f"--{config.flag(f.name)}"] + ([f"--{f.name}"] if "_" in f.name else [])
        groups[section].add_argument(*flags, dest=f.name, default=f.default, type=parse_bool if kind is bool else kind,
                                     action=TypedFlag, metavar=kind.__name__.upper(),
                                     help=f"{comments.get(f.name, '')} (default: {f.default!r})")


def given_values(args: argparse.Namespace, names: list[str] | None = None) -> dict[str, Any]:
    """The values a person gave: the --config file's, overridden by typed flags (under `mlflow run`: by
    flags that differ from their default). Defaults are left out, so a resume can tell what was asked.
    `names`, when given, keeps only those fields (a follow-up command's flags)."""
    keep = {f.name for f in fields(TrainConfig)} if names is None else set(names)
    values = {}
    if getattr(args, "config", ""):
        in_file = read_config_file(args.config)  # the file's own keys, read once
        checked = TrainConfig.from_dict(in_file, source=str(args.config)).to_dict()  # checks the file on its own, naming it
        values = {k: v for k, v in checked.items() if k in in_file and k in keep}
    under_mlflow = bool(os.environ.get("MLFLOW_RUN_ID"))  # it passes every parameter, typed or not
    typed = getattr(args, "_typed", set())
    for f in fields(TrainConfig):
        if f.name in keep and hasattr(args, f.name):
            given = getattr(args, f.name)
            # a value other than the default always overrides (sub-commands set their own defaults);
            # a typed default does too, except under mlflow run where "typed" means nothing
            if given != f.default or (f.name in typed and not under_mlflow):
                values[f.name] = given
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config file < typed flags (under `mlflow run`: flags that differ from their default)."""
    return TrainConfig.from_dict(given_values(args), source="command line")


def apply_overrides(cfg: TrainConfig, args: argparse.Namespace, names: list[str]) -> TrainConfig:
    """Flags of a follow-up command (sample, evaluate, blend) override a finished run's config.json,
    with a training command's precedence over the run's own values (`given_values`, kept to `names`):
    a typed flag wins even when it equals the default (``--guidance-scale 7.5`` over a run sampled at 5)."""
    return TrainConfig.from_dict({**cfg.to_dict(), **given_values(args, names)}, source="command line")


def add_run_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", "--run_dir", required=True, help="run folder with checkpoints/ and config.json")


def finished_run_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                        names: list[str]) -> tuple[Path, TrainConfig]:
    """The run folder a follow-up command (sample, evaluate) names, and its config.json with the command's
    flags `names` on top; a folder without config.json is a bad flag."""
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").is_file():
        parser.error(f"{run_dir} is not a run folder (no config.json); pass a folder under runs/.")
    return run_dir, apply_overrides(TrainConfig.from_json_file(run_dir / "config.json"), args, names)
