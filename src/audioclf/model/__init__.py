"""The model zoo: `create_model(name, num_classes, **params)` builds any name in `list_models()`.

Every model is a `Model`: log-mel features `(B, 1, T, F)` or `(B, T, F)` in, logits out, with
`forward(x, labels=None)` and `fuse_model()`. Importing this package imports every module in
it, which registers the architectures: adding one is a file with a `@register_model` class and
a yaml in config/model/.
"""

import importlib
import pkgutil

from audioclf.model.base import Model
from audioclf.model.pretrained import (
    CheckpointError,
    load_pretrained,
    load_state,
    read_state_dict,
)
from audioclf.model.registry import ModelError, create_model, list_models, register_model

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "CheckpointError",
    "Model",
    "ModelError",
    "create_model",
    "list_models",
    "load_pretrained",
    "load_state",
    "read_state_dict",
    "register_model",
]
