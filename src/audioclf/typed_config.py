"""Typed config sections: a dataclass schema filled from plain config values, checked field by
field, so that a value that cannot work is a ConfigError naming its key and what it allows.

A field's annotation gives its type (int, float, bool, str, Literal choices, lists, nested
dataclasses, unions with None) and `bounded` gives its range. `audioclf.settings` holds the
schema of audioclf's config; this module knows nothing of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value or key that cannot work; the message names the key."""


def bounded(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with a numeric range, checked by `build_section`."""
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    return field(default=default, metadata={k: v for k, v in bounds.items() if v is not None})


def close_matches(name: str, known: Iterable[str]) -> list[str]:
    """The known names `name` was probably meant to be (a typo or two): the closest, and any
    about as close, at most 3."""
    scored = sorted(
        ((difflib.SequenceMatcher(None, name, k).ratio(), k) for k in known), reverse=True
    )
    if not scored:
        return []
    return [k for ratio, k in scored[:3] if ratio >= max(0.8, scored[0][0] - 0.05)]


#: A section with at most this many keys is named whole when an unknown key has no near match.
SHORT_SECTION = 8


def build_section(cls: type, values: Any, key: str) -> Any:
    """The dataclass `cls` from a mapping at config key `key`, every field checked."""
    if not isinstance(values, dict):
        raise ConfigError(f"{key} must be a section (key: value), not {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        close = [join_key(key, match) for name in unknown for match in close_matches(name, fields)]
        if close:
            hint = f"; did you mean {' or '.join(close)}?"
        elif len(fields) <= SHORT_SECTION:
            hint = f"; {key or 'the config'} has {', '.join(fields)}"
        else:
            hint = ""
        raise ConfigError(f"unknown key(s) {[join_key(key, name) for name in unknown]}{hint}")
    hints = typing.get_type_hints(cls)
    arguments = {}
    for name, spec in fields.items():
        full_key = join_key(key, name)
        if name not in values:
            if spec.default is dataclasses.MISSING:
                raise ConfigError(f"missing key {full_key}")
            continue
        arguments[name] = _check(values[name], hints[name], full_key, spec.metadata)
    return cls(**arguments)


def join_key(key: str, name: str) -> str:
    """The dotted key of `name` in the section at `key` (`name` alone at the top)."""
    return f"{key}.{name}" if key else name


def _check(value: Any, hint: Any, key: str, bounds: typing.Mapping[str, float]) -> Any:
    """`value` if it fits `hint` and `bounds`; else a ConfigError naming `key`."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} must be set ({_describe(hint, bounds)}), not null")
    for option in options:
        if option is type(None):
            continue
        if dataclasses.is_dataclass(option):
            if isinstance(value, dict):
                return build_section(option, value, key)
            continue
        if typing.get_origin(option) is Literal:
            if value in typing.get_args(option) and isinstance(value, str):
                return value
            continue
        if typing.get_origin(option) is list:
            if isinstance(value, list):
                (item,) = typing.get_args(option)
                return [_check(v, item, f"{key}[{i}]", {}) for i, v in enumerate(value)]
            continue
        if option is dict and isinstance(value, dict):
            return value
        converted = _scalar(value, option)
        if converted is not None:
            if not _in_bounds(converted, bounds):
                raise ConfigError(f"{key} must be {_describe(hint, bounds)}, not {value!r}")
            return converted
    yaml_bool = isinstance(value, bool) and str in options
    raise ConfigError(
        f"{key} must be {_describe(hint, bounds)}, not {value!r}"
        + (
            ' (YAML reads a bare yes, no, on or off as a bool: quote it, "yes")'
            if yaml_bool
            else ""
        )
    )


def _is_union(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union


def _scalar(value: Any, option: Any) -> Any:
    """`value` as the scalar type `option`, or None when it is not one."""
    if option is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if option is int:
        return value if isinstance(value, int) else None
    if option is float:
        if isinstance(value, int | float) and not math.isnan(value):
            return float(value)
        return None
    if option is str:
        return value if isinstance(value, str) else None
    return None


def _in_bounds(value: Any, bounds: typing.Mapping[str, float]) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return True
    tests = {
        "ge": lambda limit: value >= limit,
        "gt": lambda limit: value > limit,
        "le": lambda limit: value <= limit,
        "lt": lambda limit: value < limit,
    }
    return all(tests[name](limit) for name, limit in bounds.items())


def _describe(hint: Any, bounds: typing.Mapping[str, float]) -> str:
    """What a key allows, in words: 'a whole number >= 1', 'one of ...', 'null or ...'."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    limits = " and ".join(f"{symbols[name]} {limit:g}" for name, limit in bounds.items())
    words = []
    for option in options:
        if option is type(None):
            words.append("null")
        elif typing.get_origin(option) is Literal:
            words.append("one of " + ", ".join(map(str, typing.get_args(option))))
        elif typing.get_origin(option) is list:
            words.append("a list")
        elif dataclasses.is_dataclass(option):
            names = ", ".join(f.name for f in dataclasses.fields(option))
            words.append(f"a section ({names})")
        elif option in (int, float):
            noun = "a whole number" if option is int else "a number"
            words.append(f"{noun} {limits}".strip())
        else:
            names = {bool: "true or false", str: "text", dict: "a section"}
            words.append(names.get(option, getattr(option, "__name__", str(option))))
    return " or ".join(words)
