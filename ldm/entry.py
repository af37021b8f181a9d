"""The stage entry point: ``python -m train.<stage> --config F [--set k=v ...] [--resume R]``.

It belongs with the stages and the config, not the CLI: ``train/*`` import it, and ``ldm.cli`` (which
reaches ``train/*`` through the demo) imports it too, so no import arrow runs from ``train/`` up into
the CLI.
"""

from __future__ import annotations

import argparse
import sys


def stage_entry(config_class_name: str, main, argv: list[str] | None = None):
    """Parse ``--config/--set/--resume``, load the named stage config and call ``main(cfg)``."""
    from ldm import config as config_module

    parser = argparse.ArgumentParser(description=f"train a stage from a YAML config ({config_class_name})")
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = load_stage_config(getattr(config_module, config_class_name), args)
    return main(cfg)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    parser.add_argument("--resume", default=None, metavar="latest|never|PATH",
                        help="continue from a checkpoint (default: latest one in output_dir, if any)")


def load_stage_config(cls, args):
    """The validated stage config from ``args.config`` + ``args.overrides``; exits with the error otherwise."""
    from ldm.config import ConfigError, load_config

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    try:
        return load_config(cls, args.config, overrides)
    except ConfigError as err:
        sys.exit(f"error: {err}")
