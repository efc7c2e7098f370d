"""Int8 quantization through PT2E (torchao): post-training (PTQ) and quantization-aware (QAT).

The flow is the one PyTorch supports today (`torch.ao.quantization`'s eager mode is deprecated
in torch 2.13): capture the model with `torch.export` (dynamic batch), insert observers
(`prepare_pt2e`) or fake quantizers (`prepare_qat_pt2e`) where a backend's quantizer says,
calibrate or fine-tune, then `convert_pt2e` to a graph of int8 quantize / dequantize ops around
each layer. The backends' quantizers (`xnnpack` for phones, TFLite and microcontrollers;
`x86` for servers, whose graphs the TFLite interpreter cannot run) are in
`audioclf.quantizers`.

A captured graph keeps the Python branches it took: `QuantizedModel.train()` / `eval()`
switch its dropout and BatchNorm ops by their `training` argument (`set_graph_mode`), and
stochastic depth is off in QAT graphs (`capture`).

`QuantizedModel` puts a prepared or converted graph behind the zoo's interface (`forward(x,
labels=None)`, train/eval), so the Trainer fine-tunes and tests it unchanged. Its checkpoint
holds the *prepared* graph's state (weights plus observer / fake-quantizer statistics), how it
was prepared, each observer's quantization parameters and the input normalisation a model's
input BatchNorm became (PANNs' bn0, `take_input_normalization`, kept out of the graph so that
it is int8 from its input): `load_quantized` rebuilds the float architecture, prepares it the
same way, loads that state and converts with those parameters, which gives the same int8 model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import types
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.fx import GraphModule

from audioclf.model import Model
from audioclf.model.heads import ArcFaceHead, fold_arcface
from audioclf.model.layers import DropPath
from audioclf.normalization import FeatureNormalization
from audioclf.quantizers import (
    BACKENDS,
    DROPOUT,
    QuantizationError,
    copy_graph,
    load_torchao,
    make_quantizer,
    pin_qparams,
    some_keys,
)

log = logging.getLogger(__name__)

MODES = ("ptq", "qat")
#: The version of how `prepare` captures and annotates a model. A checkpoint's state loads
#: into the graph it was prepared as, only. 2: PTQ captures the fused model (1 left PANNs
#: MobileNets' BatchNorms after pooling in float), dropout shares its input's int8 range (1
#: requantized after it, which TFLite does not). 3: ArcFace heads folded (2 normalised the
#: class centres in the graph); other models' graphs are those of 2. 4: an input BatchNorm
#: (PANNs' bn0) taken out of the graph as the model's input normalisation, so the graph is
#: int8 from its input; an int8 checkpoint without `input_normalization` keeps it in, as 3 did.
RULES = 4
_MAX_BATCH = 4096


@dataclass(frozen=True)
class QuantSpec:
    """How a model was quantized: enough to prepare it again the same way."""

    backend: Literal["xnnpack", "x86"]
    mode: Literal["ptq", "qat"]
    #: The input the graph was captured with, without the batch: (1, frames, mels).
    input_shape: tuple[int, ...]
    #: Weights with a scale per output channel (false: one per tensor; xnnpack only).
    per_channel: bool = True
    #: `RULES` when prepared; 1 in checkpoints from before the field.
    rules: int = RULES

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise QuantizationError(f"backend {self.backend!r}: one of {BACKENDS}")
        if self.mode not in MODES:
            raise QuantizationError(f"mode {self.mode!r}: one of {MODES}")
        if not self.per_channel and self.backend != "xnnpack":
            raise QuantizationError("per-tensor weights (per_channel=false) need backend xnnpack")


class _Logits(nn.Module):
    """The model as a one-input graph: features -> logits (no labels: no margin)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features)


def capture(model: nn.Module, example: torch.Tensor, train: bool) -> GraphModule:
    """`model` (features -> logits) as an exported graph with a dynamic batch, in training
    mode for QAT (BatchNorm and dropout as in training) or eval mode for PTQ.

    Stochastic depth is off in both: torch.export keeps Python's `if self.training` branch it
    took, so a captured DropPath would drop residual branches in evaluation and in the int8
    model too. Any other random op outside dropout in a training-mode graph is an error, for
    the same reason."""
    module = _Logits(model).train(train)
    drop_paths = [layer for layer in module.modules() if isinstance(layer, DropPath)]
    for layer in drop_paths:
        layer.eval()
    if train and any(layer.drop_prob > 0 for layer in drop_paths):
        log.info("QAT: stochastic depth is off while fine-tuning (a captured graph keeps it)")
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            exported = torch.export.export(
                module, (example,), dynamic_shapes={"features": {0: batch}}
            )
        except Exception as error:  # noqa: BLE001 - any capture failure is this model's
            raise QuantizationError(
                f"torch.export could not capture {type(model).__name__} for quantization: "
                f"{type(error).__name__}: {error}"
            ) from error
    graph = exported.module()
    if train:
        _refuse_random_ops(graph, type(model).__name__)
    return graph


def _refuse_random_ops(graph: GraphModule, name: str) -> None:
    random = Counter(
        str(node.target)
        for node in graph.graph.nodes
        if node.op == "call_function"
        and node.target not in _TRAINING_ARGUMENT
        and torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
    )
    if random:
        found = ", ".join(f"{op} x{count}" for op, count in random.items())
        raise QuantizationError(
            f"{name} captured in training mode for QAT holds random ops outside dropout "
            f"({found}): torch.export fixes Python branches on self.training as taken, so "
            "they would run in evaluation and in the int8 model too. Turn them off for QAT "
            "(the zoo's stochastic depth is turned off so), or quantise with PTQ"
        )


class QuantizedModel(nn.Module):
    """A PT2E graph, prepared (observers / fake quantizers: calibrate or fine-tune it) or
    converted (int8), behind the zoo's interface. `train()` / `eval()` switch the graph's
    dropout and BatchNorm (`set_graph_mode`). `input_normalization`, when the model's own
    input BatchNorm was taken out of the graph (`Model.take_input_normalization`), is applied
    in float before it; exports put it in their sidecars."""

    def __init__(
        self,
        graph: GraphModule,
        spec: QuantSpec,
        converted: bool = False,
        input_normalization: FeatureNormalization | None = None,
    ) -> None:
        super().__init__()
        load_torchao()
        self.network = _switchable(graph)
        self.spec = spec
        self.converted = converted
        self.set_input_normalization(input_normalization)
        #: The prepared graph's state, kept at conversion: what a checkpoint stores.
        self.prepared_state: dict[str, torch.Tensor] | None = None
        #: Each observer's [scale, zero point] that conversion used, by name (`pin_qparams`).
        self.qparams: dict[str, list[torch.Tensor]] | None = None
        self._bn_frozen = False
        self._observers_frozen = False

    def set_input_normalization(self, normalization: FeatureNormalization | None) -> None:
        """Apply `normalization` to the input before the graph (None: nothing)."""
        self.input_normalization = normalization
        for name in ("mean", "std"):
            value = None if normalization is None else getattr(normalization, name)
            tensor = None if value is None else torch.as_tensor(value, dtype=torch.float32)
            self.register_buffer(f"input_{name}", tensor, persistent=False)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if self.input_mean is not None:
            x = (x - self.input_mean) / self.input_std
        return self.network(x)

    def train(self, mode: bool = True) -> QuantizedModel:
        self.training = mode
        set_graph_mode(self.network, mode, batch_norm=mode and not self._bn_frozen)
        return self

    def fuse_model(self) -> QuantizedModel:
        """Nothing to do: PT2E folds BatchNorm into the convolutions at conversion."""
        return self

    def start_epoch(self, epoch: int, freeze_bn_epoch: int, freeze_observer_epoch: int) -> None:
        """QAT: from `freeze_bn_epoch` BatchNorm uses its running statistics (no more
        updates); from `freeze_observer_epoch` the quantization ranges stop moving."""
        if self.converted:
            return
        from torchao.quantization.pt2e import disable_observer

        if epoch >= freeze_bn_epoch and not self._bn_frozen:
            self._bn_frozen = True
            log.info("QAT epoch %d: BatchNorm statistics frozen", epoch + 1)
        if epoch >= freeze_observer_epoch and not self._observers_frozen:
            self.network.apply(disable_observer)
            self._observers_frozen = True
            log.info("QAT epoch %d: quantization ranges frozen", epoch + 1)
        self.train(self.training)

    def convert(
        self, qparams: dict[str, Any] | None = None, source: str = "checkpoint"
    ) -> QuantizedModel:
        """The int8 model (a new module; this one is left as it was), with the observers'
        quantization parameters given as `qparams` (an int8 checkpoint's) or computed."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        if self.converted:
            return self
        state = {key: value.detach().clone() for key, value in self.network.state_dict().items()}
        # convert_pt2e works in place: convert a copy rebuilt from the state.
        graph = copy_graph(self.network)
        with warnings.catch_warnings(), _qat_folding(self.spec.mode == "qat"):
            warnings.simplefilter("ignore")  # torchao's, an observer's that never ran included
            pinned = pin_qparams(graph, qparams, source)
            converted = convert_pt2e(graph, fold_quantize=False)
        result = QuantizedModel(converted, self.spec, True, self.input_normalization)
        result.prepared_state = state
        result.qparams = pinned
        return result.eval()

    def checkpoint_state(self) -> dict[str, Any]:
        """What an int8 checkpoint stores: the spec, the prepared graph's state and (once
        converted) the quantization parameters its conversion used."""
        state = self.prepared_state if self.converted else self.network.state_dict()
        content = {"spec": asdict(self.spec), "state": dict(state)}
        if self.qparams is not None:
            content["qparams"] = dict(self.qparams)
        if self.input_normalization is not None:
            content["input_normalization"] = self.input_normalization.as_lists()
        return content


@contextlib.contextmanager
def _qat_folding(needed: bool) -> Iterator[None]:
    """convert_pt2e folds QAT's conv-BN subgraphs whenever a graph holds a BatchNorm, tracing
    about 100 rewrite patterns to look for them (20 s on two cores for a PANNs model, whose
    input BatchNorm follows no convolution; paid on every load of an int8 checkpoint). A PTQ
    graph has none to fold: prepare_pt2e folded its conv-BN pairs. Off unless `needed`."""
    from torchao.quantization.pt2e import quantize_pt2e

    folding = quantize_pt2e._fold_conv_bn_qat
    if not needed:
        quantize_pt2e._fold_conv_bn_qat = lambda graph: graph
    try:
        yield
    finally:
        quantize_pt2e._fold_conv_bn_qat = folding


#: The ops of a captured graph that behave differently in training, and the position of
#: their `training` argument.
_TRAINING_ARGUMENT = {**dict.fromkeys(DROPOUT, 2), torch.ops.aten.batch_norm.default: 5}


def set_graph_mode(graph: GraphModule, training: bool, batch_norm: bool | None = None) -> None:
    """Switch a captured graph's dropout (to `training`) and BatchNorm (to `batch_norm`,
    default `training`; false: its running statistics) by their `training` argument alone.

    torchao's move_exported_model_to_train / _eval rewrite them from patterns traced with
    default arguments instead: dropout came back with p=0.5 whatever the model's (QAT
    fine-tuned at 0.5), BatchNorm with PyTorch's default momentum and eps, and Dropout2d,
    which no pattern matches, stayed in training mode (a random int8 model)."""
    batch_norm = training if batch_norm is None else batch_norm
    changed = False
    for node in graph.graph.nodes:
        index = _TRAINING_ARGUMENT.get(node.target) if node.op == "call_function" else None
        if index is None:
            continue
        value = batch_norm if node.target == torch.ops.aten.batch_norm.default else training
        if node.args[index] is not value:
            node.args = (*node.args[:index], value, *node.args[index + 1 :])
            changed = True
    if changed:
        graph.recompile()


def _switchable(graph: GraphModule) -> GraphModule:
    """`graph` whose train() / eval() switch it by `set_graph_mode` (converters call .eval()
    on what they convert; torchao's prepared graphs refuse both)."""

    def train(module: GraphModule, mode: bool = True) -> GraphModule:
        set_graph_mode(module, mode)
        module.training = mode
        return module

    graph.train = types.MethodType(train, graph)  # type: ignore[method-assign]
    graph.eval = types.MethodType(lambda module: train(module, False), graph)  # type: ignore[method-assign]
    return graph


def prepare(
    model: Model,
    example: torch.Tensor,
    backend: str = "xnnpack",
    mode: str = "ptq",
    per_channel: bool = True,
    take_input_norm: bool = True,
) -> QuantizedModel:
    """A copy of `model` captured and prepared for PTQ (observers) or QAT (fake quantizers);
    `model` itself is left as it was (a captured graph would share its parameters, and
    fine-tuning them would change it). With `take_input_norm` its input BatchNorm, if it has
    one, becomes the QuantizedModel's input normalisation (fixed at its running statistics
    in QAT too); `example` is the model's input either way."""
    load_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    spec = QuantSpec(backend, mode, tuple(example.shape[1:]), per_channel)
    qat = mode == "qat"
    if qat:
        _warn_batch_norm_arguments(model)
    # Contiguous: weights a channels_last training left behind gave DDP's QAT fine-tuning
    # (float32, contiguous) gradients of other strides than its buckets, with a warning.
    source = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    take = getattr(source, "take_input_normalization", None)
    normalization = take() if take_input_norm and take is not None else None
    if qat and normalization is not None:
        log.info("QAT: the input BatchNorm stays at its running statistics (int8 input)")
    if qat and fold_arcface(source):
        log.info("QAT: the ArcFace head fine-tunes as its folded linear layer (no margin)")
    if not qat and hasattr(source, "fuse_model"):
        # PTQ quantizes the inference model: its BatchNorm folded, also where torchao's
        # conv-BN folding does not reach (PANNs' MobileNets pool between the two, which left
        # a float BatchNorm between int8 ops in every block).
        source.eval().fuse_model()
    graph = capture(source, example.cpu(), train=qat)
    quantizer = make_quantizer(backend, qat, per_channel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(graph, quantizer)
    result = QuantizedModel(prepared, spec, input_normalization=normalization)
    return result.train(qat)


def _warn_batch_norm_arguments(model: nn.Module) -> None:
    """torchao's QAT conv-BatchNorm fusion computes with eps 1e-5 and momentum 0.1 whatever
    the layer's (a TODO in torchao.quantization.pt2e.qat_utils); the zoo's layers use those."""
    others = [
        f"{name} (eps {module.eps:g}, momentum {module.momentum})"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and (module.eps != 1e-5 or module.momentum != 0.1)
    ]
    if others:
        log.warning(
            "QAT: torchao's conv-BatchNorm fusion computes with eps 1e-5 and momentum 0.1, so "
            "fine-tuning and the int8 model use those instead of these layers' own: %s%s",
            ", ".join(others[:3]),
            f" and {len(others) - 3} more" if len(others) > 3 else "",
        )


@torch.no_grad()
def calibrate(prepared: QuantizedModel, batches: Iterable[torch.Tensor]) -> int:
    """Run `batches` of features through a prepared model (eval mode); the clips seen."""
    prepared.eval()
    seen = 0
    for features in batches:
        prepared(features)
        seen += len(features)
    if seen == 0:
        raise QuantizationError("calibration needs at least one clip")
    return seen


def quantize_ptq(
    model: Model, batches: Iterable[torch.Tensor], example: torch.Tensor, backend: str = "xnnpack"
) -> QuantizedModel:
    """Post-training quantization: prepare, calibrate on `batches`, convert."""
    prepared = prepare(model, example, backend, "ptq")
    clips = calibrate(prepared, batches)
    log.info("PTQ (%s): calibrated on %d clips", backend, clips)
    return prepared.convert()


def load_quantized(
    model: Model, content: dict[str, Any], source: str = "checkpoint"
) -> QuantizedModel:
    """The int8 model a checkpoint's `quantized` entry describes, built on `model` (the float
    architecture, same classes): prepared as before, loaded with its state, converted."""
    try:
        spec = QuantSpec(
            **{
                "rules": 1,
                **content["spec"],
                "input_shape": tuple(content["spec"]["input_shape"]),
            }
        )
        state = content["state"]
    except (KeyError, TypeError) as error:
        raise QuantizationError(f"{source}: its quantized entry is malformed ({error})") from error
    if not _oldest_rules(model) <= spec.rules <= RULES:
        # Its state may even load (observers keep their names), but not into the graph that
        # was tested: the int8 model would quantize differently.
        which = "a newer" if spec.rules > RULES else "an earlier"
        raise QuantizationError(
            f"{source}: quantized by {which} version's rules ({spec.rules}, now {RULES}), "
            "whose graph this version does not rebuild; quantise its float checkpoint again: "
            "run.train=false run.quantise=true run.checkpoint_path=<its run>/checkpoints/best.pth"
        )
    example = torch.zeros(2, *spec.input_shape)
    stored = content.get("input_normalization")
    prepared = prepare(
        model, example, spec.backend, spec.mode, spec.per_channel, take_input_norm=bool(stored)
    )
    if stored:
        if prepared.input_normalization is None:
            raise QuantizationError(
                f"{source}: has an input normalisation, but {type(model).__name__} has no "
                "input BatchNorm to take it from"
            )
        try:
            prepared.set_input_normalization(FeatureNormalization.from_lists(stored))
        except (ValueError, KeyError, TypeError) as error:
            raise QuantizationError(
                f"{source}: its input normalisation is malformed ({error})"
            ) from error
    load_graph_state(prepared.network, state, source)
    # Checkpoints from before the parameters were stored: computed from the state, as then.
    return prepared.convert(content.get("qparams"), source)


def _oldest_rules(model: nn.Module) -> int:
    """The earliest RULES under which `model`'s graph was the one prepared today."""
    return 3 if any(isinstance(module, ArcFaceHead) for module in model.modules()) else 2


def load_graph_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a prepared graph's state (or a QuantizedModel's) with every key checked; the
    observers' and fake quantizers' statistics take the loaded shapes (their per-channel
    ranges are empty before calibration). QuantizationError names what does not fit."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise QuantizationError(
            f"{source}: the int8 state does not match this architecture: "
            f"missing {some_keys(missing)}, unexpected {some_keys(unexpected)}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise QuantizationError(f"{source}: the int8 state does not load: {error}") from error
