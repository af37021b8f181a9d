"""Argument types of the ``ldm`` command: a value outside its range stops the command while it parses.

Each is an ``argparse`` ``type=``: a bad value exits with status 2 and argparse's one line
``ldm <command>: error: argument --steps: must be a whole number >= 1, got '0'``, before any import
of torch or any file is touched. Checks that need the model (the sampler's step range, the VAE's
downsampling factor) live beside the model code and run before any image is made.

    parser.add_argument("--steps", type=whole(1), default=25)
    parser.add_argument("--guidance", type=number(0), default=5.0)
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from ldm.errors import UserError

SEED_LIMIT = 2**63  # seeds are in [0, 2**63), as train.seed in the configs
SIGMA_REL_LIMIT = math.sqrt(1 / 12)  # = ldm.ema.MAX_SIGMA_REL (a uniform average); here to keep torch out of parsing


class ArgumentValueError(UserError, ValueError):
    """A value that passes its type but not what the command, the data or the model allows; names the argument."""


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """A type for whole numbers in [low, high] (no upper end when ``high`` is None)."""
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number {allowed}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a whole number {allowed}, got {text!r}")
        return value

    parse.__name__ = f"whole number {allowed}"
    return parse


def number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """A type for finite numbers in the interval from ``low`` to ``high`` (ends open as asked): never NaN or inf."""
    if high == math.inf:
        allowed = f"{'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            value = math.nan
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be a finite number {allowed}, got {text!r}")
        return value

    parse.__name__ = f"finite number {allowed}"
    return parse


def text(value: str) -> str:
    """A non-empty string (a column name, a split)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def heldout(value: str) -> float:
    """``--heldout``: a fraction in (0, 1) or a whole count >= 1 (the data's size is checked when it is read)."""
    try:
        amount = number(0, low_open=True)(value)
    except argparse.ArgumentTypeError:
        amount = math.nan
    if not math.isfinite(amount) or (amount >= 1 and amount != int(amount)):
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1) or a whole count >= 1, got {value!r}")
    return amount


def clip_spec(value: str) -> str:
    """``--clip MODEL_NAME:PRETRAINED_PATH``, ``local-dir:DIR``, ``hf-hub:ORG/REPO`` or a saved open_clip folder;
    a weights path that does not exist is refused here, not after an hour of training."""
    from pathlib import Path

    usage = "must be MODEL_NAME:PRETRAINED_PATH (e.g. ViT-B-32:/models/vit_b_32.safetensors) or an open_clip folder"
    if not value.strip():
        raise argparse.ArgumentTypeError(usage)
    if (Path(value) / "open_clip_config.json").is_file() or value.startswith("hf-hub:"):
        return value
    if ":" not in value:
        if "/" in value or value.startswith(("~", ".")):
            raise argparse.ArgumentTypeError(f"{value} is not an open_clip folder (no open_clip_config.json)")
        return value  # a bare architecture name: random weights (the report says so)
    name, _, path = value.partition(":")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{usage}, got {value!r}")
    if name == "local-dir":
        if not (Path(path) / "open_clip_config.json").is_file():
            raise argparse.ArgumentTypeError(f"{value}: {path} is not an open_clip folder (no open_clip_config.json)")
    elif ("/" in path or "." in path) and not Path(path).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"{value}: the weights file {path} does not exist")
    return value


def override(value: str) -> str:
    """``--set key.sub=value``: a dotted key, '=', a value (the config checks the key and the value)."""
    key, sep, _ = value.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise argparse.ArgumentTypeError(f"must look like key.sub=value (e.g. train.max_steps=100), got {value!r}")
    return value


def resume(value: str) -> str:
    """``--resume latest|never|PATH``: a PATH must be an existing checkpoint folder."""
    from pathlib import Path

    if value in ("latest", "never") or Path(value).expanduser().is_dir():
        return value
    raise argparse.ArgumentTypeError(f"must be latest, never or an existing checkpoint-<step> folder, got {value!r}")


SEED = whole(0, SEED_LIMIT - 1)
POSITIVE = whole(1)
SIGMA_REL = number(0, SIGMA_REL_LIMIT, low_open=True, high_open=True)
