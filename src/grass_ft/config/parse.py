"""A configuration from flat YAML plus ``key=value`` overrides: aliases resolved, values coerced to each key's type,
then validated (:mod:`grass_ft.config.checks`); and config.yaml written back."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..base.errors import not_utf8
from .checks import ConfigError, validate
from .keys import ALIAS_VALUES, ALIASES, AUTO_KEYS, TrainConfig


def resolve_aliases(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``raw`` with every alias of :data:`ALIASES` renamed to its canonical key, and the errors: an alias given
    together with its canonical key (or two aliases of one key), or a bad bf16/fp16 value."""
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    errors: list[str] = []
    for key, value in raw.items():
        canon = ALIASES.get(key, key)
        if canon in source:
            errors.append(f"`{key}` and `{source[canon]}` both set `{canon}`; give one (`{canon}` is the name "
                          f"config.yaml uses)")
            continue
        if key in ALIAS_VALUES:
            try:
                flag = _coerce(key, value, bool)
            except ValueError as e:
                errors.append(str(e))
                continue
            value = ALIAS_VALUES[key][flag]
        out[canon] = value
        source[canon] = key
    return out, errors


def unknown_key_message(key: str, known: typing.Iterable[str]) -> str:
    """"unknown key `gama` (did you mean `gamma`?)", or the list of known keys when nothing is close."""
    known = sorted(known)
    plain = {k.replace("_", ""): k for k in known}
    close = ([plain[key.replace("_", "").replace("-", "")]] if key.replace("_", "").replace("-", "") in plain
             else difflib.get_close_matches(key, known, n=1, cutoff=0.75))
    if close:
        return f"unknown key `{key}` (did you mean `{close[0]}`?)"
    return f"unknown key `{key}`; known keys: {', '.join(known)}"


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ValueError naming what is allowed."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(key, value, args[0])
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"`{key}` must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"`{key}` must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"`{key}` must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(f"`{key}` must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"`{key}` must be a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"`{key}` must be a string, got {value!r}")
        return str(value)
    return value


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["gamma=4", "tau=0.5"]`` -> ``{"gamma": "4", "tau": "0.5"}``; a bare word is an error."""
    out: dict[str, str] = {}
    errors = []
    for a in args:
        if "=" not in a:
            errors.append(f"argument {a!r} is not key=value")
            continue
        k, v = a.split("=", 1)
        out[k.strip()] = v
    if errors:
        raise ConfigError(errors)
    return out


def build_config(config_file: str | None = None, overrides: dict[str, Any] | None = None,
                 num_blocks: int | None = None, known_methods: typing.Sequence[str] = (),
                 auto_method: bool = True) -> TrainConfig:
    """Merge a YAML file and ``key=value`` overrides into a validated :class:`TrainConfig`.

    Raises:
        ConfigError: listing every unknown key, wrong type and out-of-range value at once.
    """
    raw: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError([f"config file {path}: {e.strerror}"]) from None
        except UnicodeDecodeError as e:
            raise ConfigError([not_utf8(path, e)]) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"config file {path}: not valid YAML ({e})"]) from None
        if not isinstance(loaded, dict):
            raise ConfigError([f"config file {path}: expected a mapping of key: value, got {type(loaded).__name__}"])
        raw.update(loaded)
    # aliases resolve within the file and within the overrides, so that an override wins either way
    raw, errors = resolve_aliases(raw)
    over, over_errors = resolve_aliases(dict(overrides or {}))
    raw.update(over)
    errors.extend(over_errors)

    hints = _field_types(TrainConfig)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            errors.append(unknown_key_message(str(key), known))
            continue
        if key in AUTO_KEYS and str(value).strip().lower() == "auto":
            values[key] = "auto"
            continue
        try:
            values[key] = _coerce(key, value, int if key == "gamma" else hints[key])
        except ValueError as e:
            errors.append(str(e))
    cfg = TrainConfig(**values)
    errors.extend(validate(cfg, num_blocks, known_methods, skip=set(raw) - set(values), auto_method=auto_method))
    if errors:
        raise ConfigError(errors)
    return cfg


def save_config(cfg: TrainConfig | dict[str, Any], path: str | Path) -> None:
    """config.yaml: a configuration, or the resolved record of a run (grass_ft.run.resolve.filled)."""
    Path(path).write_text(yaml.safe_dump(cfg if isinstance(cfg, dict) else cfg.to_dict(), sort_keys=False))
