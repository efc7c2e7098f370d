"""The model zoo: `create_model(name, num_classes, **params)` builds any name in `list_models()`.

Every model is a `Model`: log-mel features `(B, 1, T, F)` or `(B, T, F)` in, logits out, with
`forward(x, labels=None)` and `fuse_model()`. Importing this package registers the
architectures below; adding one is a file with a `@register_model` class and a yaml in
config/model/.
"""

from audioclf.model import effv2, ghost_effv2, panns  # noqa: F401  (registers the architectures)
from audioclf.model.base import Model
from audioclf.model.pretrained import CheckpointError, load_pretrained, read_state_dict
from audioclf.model.registry import ModelError, create_model, list_models, register_model

__all__ = [
    "CheckpointError",
    "Model",
    "ModelError",
    "create_model",
    "list_models",
    "load_pretrained",
    "read_state_dict",
    "register_model",
]
