"""Config checks: the error type and the small validators every section's ``__post_init__`` uses.

Each names the key it checks, so a bad value is reported as ``<key> <what to fix>``.
"""

from __future__ import annotations

import math
from pathlib import Path

from ldm.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration file or override is invalid; the message says what to fix."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def _number(key: str, value: float | None, low: float = -math.inf, high: float = math.inf, *,
            low_open: bool = False, high_open: bool = False, nullable: bool = False) -> None:
    """``value`` is a finite number in [low, high] (ends open as asked), or None when ``nullable``."""
    if value is None and nullable:
        return
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    where = ("" if low == -math.inf and high == math.inf else
             f" {'>' if low_open else '>='} {low:g}" if high == math.inf else
             f" {'<' if high_open else '<='} {high:g}" if low == -math.inf else
             f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    _check(math.isfinite(value) and above and below, key,
           f"must be a finite number{where}{' or null' if nullable else ''}, got {value!r}")


def _at_least(key: str, value: int | None, low: int, nullable: bool = False) -> None:
    if not (value is None and nullable):
        _check(value >= low, key, f"must be >= {low}{' or null' if nullable else ''}, got {value!r}")


def _divides(key: str, channels: tuple[int, ...], groups: int, groups_key: str) -> None:
    """Every entry of ``channels`` is a multiple of ``groups`` (GroupNorm, attention heads)."""
    _at_least(groups_key, groups, 1)
    bad = [c for c in channels if c % groups]
    _check(not bad, key, f"{list(bad)} not divisible by {groups_key}={groups}")


def _check_output_dir(output_dir: str, data, inputs: dict[str, str | None] | None = None) -> None:
    """A stage writes (and ``train.resume=never`` moves) everything under output_dir: it must not overlap
    the data or any folder the stage reads (``inputs``: key -> local path or Hub id)."""
    _check(bool(output_dir.strip()), "output_dir", "must not be empty (it would write into the current folder)")
    out = Path(output_dir).expanduser().resolve()
    for key, value in {"data.path": data.path, **(inputs or {})}.items():
        source = Path(value).expanduser().resolve() if value else None
        if source is None or not source.exists():
            continue  # a Hub id, or a path whose absence is reported where it is read
        _check(not (out.is_relative_to(source) or source.is_relative_to(out)), "output_dir",
               f"{output_dir} overlaps {key} {value}: a run writes its checkpoints, samples and final folder under "
               f"output_dir (and --resume never moves them aside), so keep what it reads outside output_dir and "
               f"output_dir outside it")


def _check_map_style(data, stage: str) -> None:  # data: the data section (DataConfig)
    _check(not data.streaming, "data.streaming", f"is supported by the U-Net stage only; {stage} reads the "
           "whole dataset (set data.streaming=false, and data.max_samples to use fewer examples)")
