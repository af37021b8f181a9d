"""Loading: YAML file + ``key.sub=value`` overrides -> the validated frozen dataclass; and back to a dict."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ldm.config.checks import ConfigError


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Build ``cls`` from a YAML file (optional) and ``key.sub=value`` overrides (YAML-parsed values)."""
    raw = {} if path is None else _read_yaml(Path(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_first_line(err)}); quote it, "
                              f"e.g. --set '{key.strip()}=\"{value}\"'") from None
        _set_dotted(raw, key.strip().split("."), parsed)
    return from_dict(cls, raw)


def _read_yaml(path: Path) -> dict:
    """The mapping in a YAML config file; every failure names the file (and the line, for syntax errors)."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a .yaml file (see configs/)")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as stream:  # YAML's error marks then name the file and line
            raw = yaml.load(stream, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, not {type(raw).__name__}")
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one section "
                                                        f"(the first would be ignored)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def from_dict(cls: type, raw: dict, prefix: str = "") -> Any:
    """Recursively build dataclass ``cls`` from ``raw``; unknown keys and wrong types are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'{hint}; valid keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
    kwargs = {name: _coerce(hints[name], raw[name], prefix + name) for name in names if name in raw}
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - dataclass signature mismatch is a bug
        raise ConfigError(str(err)) from err


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (tuples as lists) for YAML/JSON dumps and logging."""
    def plain(x):
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _set_dotted(raw: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        raw = raw.setdefault(key, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {key} is not a section")
    raw[keys[-1]] = value


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against type ``hint``; convert lists to tuples and ints to floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item_types = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(item_types) != len(value):
            raise ConfigError(f"{key} must have {len(item_types)} items, got {value!r}")
        return tuple(_coerce(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    if hint is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:  # YAML reads 1e-4 as a string, and 1 as an int
            number = float(value)
        except (ValueError, OverflowError):
            number = None
        if number is not None and not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        if number is not None:
            return number
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint)
                       and not (hint is int and isinstance(value, bool))):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} must be of type {name}, got {value!r}")
