"""The model registry: `@register_model` on each architecture, `create_model` to build one."""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import logging
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from audioclf.model.base import Model
from audioclf.model.pretrained import load_pretrained

log = logging.getLogger(__name__)

Builder = Callable[..., Model]
B = TypeVar("B", bound=Builder)

_BUILDERS: dict[str, Builder] = {}


class ModelError(ValueError):
    """An unknown model name or parameter; the message names it."""


def register_model(name: str) -> Callable[[B], B]:
    """Register a builder (a Model subclass or a function returning one) under `name`."""

    def register(builder: B) -> B:
        if name in _BUILDERS:
            raise ValueError(f"model name {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder

    return register


def list_models() -> list[str]:
    """Every registered model name, sorted."""
    return sorted(_BUILDERS)


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained_path: str | Path | None = None,
    freeze_backbone: bool = False,
    **params: Any,
) -> Model:
    """Build the registered model `name` for `num_classes` classes.

    `params` go to the architecture (see its yaml in config/model/). `pretrained_path` loads a
    checkpoint (an official PANNs file or one of ours); `freeze_backbone` then leaves only the
    classifier trainable.
    """
    if name not in _BUILDERS:
        raise ModelError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    builder = _BUILDERS[name]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(
            f"model {name!r}: num_classes must be a whole number >= 1, not {num_classes!r}"
        )
    hints = _parameter_types(builder)
    for key, value in params.items():
        if key in hints and not _has_type(value, hints[key]):
            raise ModelError(
                f"model {name!r}: parameter {key} must be {_type_name(hints[key])}, not {value!r}"
            )
    try:
        model = builder(num_classes=num_classes, **params)
    except TypeError as error:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        # One the caller gave; a builder's own bug inside (a layer's keyword) stays a TypeError.
        if unexpected and unexpected[1] in params:
            raise ModelError(_unknown_parameter(name, unexpected[1], builder)) from error
        raise
    except ValueError as error:
        raise ModelError(f"model {name!r}: {error}") from error
    if pretrained_path:
        load_pretrained(model, pretrained_path)
    if freeze_backbone:
        model.freeze_backbone()
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s: %s parameters (%s trainable)", name, f"{total:,}", f"{trainable:,}")
    return model


def _init_functions(builder: Builder) -> list[Callable[..., Any]]:
    """The functions that take a builder's parameters: a function itself, or for a class each
    `__init__` it defines or inherits, base classes first; through partials."""
    target = builder.func if isinstance(builder, functools.partial) else builder
    if not isinstance(target, type):
        return [target]
    return [cls.__init__ for cls in reversed(target.__mro__) if "__init__" in vars(cls)]


def _unknown_parameter(name: str, parameter: str, builder: Builder) -> str:
    """What a parameter the builder does not take was probably meant to be, and what it takes."""
    known = []
    for function in reversed(_init_functions(builder)):  # the architecture's own first
        with contextlib.suppress(TypeError, ValueError):  # a builtin's __init__ has none
            for argument in inspect.signature(function).parameters.values():
                plain = argument.kind in (argument.POSITIONAL_OR_KEYWORD, argument.KEYWORD_ONLY)
                if plain and argument.name not in ("self", "num_classes", *known):
                    known.append(argument.name)
    own = inspect.signature(create_model).parameters.values()
    known += [argument.name for argument in own if argument.kind is argument.KEYWORD_ONLY]
    close = difflib.get_close_matches(parameter, known, n=3, cutoff=0.8)
    return (
        f"model {name!r} has no parameter {parameter!r}"
        + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
        + f" (its parameters: {', '.join(known)})"
    )


def _parameter_types(builder: Builder) -> dict[str, Any]:
    """The annotated types of a builder's parameters, through partials and base classes."""
    hints: dict[str, Any] = {}
    for function in _init_functions(builder):
        try:
            hints.update(typing.get_type_hints(function))
        except (NameError, TypeError):
            continue
    hints.pop("return", None)
    return hints


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a config value fits a simple annotation (int, float, bool, str, X | None);
    other annotations are not checked here."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        return type(None) in options
    for option in options:
        if option is bool and isinstance(value, bool):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return math.isfinite(value)
        if option is str and isinstance(value, str):
            return True
        if option not in (bool, int, float, str, type(None)):
            return True
    return False


def _type_name(hint: Any) -> str:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    names = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text"}
    return " or ".join(names.get(option, "null") for option in options)
