"""The model registry: `@register_model` on each architecture, `create_model` to build one."""

from __future__ import annotations

import logging
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
    try:
        model = _BUILDERS[name](num_classes=num_classes, **params)
    except TypeError as error:
        if "unexpected keyword argument" in str(error):
            raise ModelError(f"model {name!r}: {error}") from error
        raise
    if pretrained_path:
        load_pretrained(model, pretrained_path)
    if freeze_backbone:
        model.freeze_backbone()
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s: %s parameters (%s trainable)", name, f"{total:,}", f"{trainable:,}")
    return model
