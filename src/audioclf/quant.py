"""Int8 quantization through PT2E (torchao): post-training (PTQ) and quantization-aware (QAT).

The flow is the one PyTorch supports today (`torch.ao.quantization`'s eager mode is deprecated
in torch 2.13): capture the model with `torch.export` (dynamic batch), insert observers
(`prepare_pt2e`) or fake quantizers (`prepare_qat_pt2e`) where a backend's quantizer says,
calibrate or fine-tune, then `convert_pt2e` to a graph of int8 quantize / dequantize ops around
each layer. Backends:

- `xnnpack` (phones and microcontrollers, TFLite): symmetric int8, per-channel weights. On top
  of torchao's XNNPACK rules, SiLU is split into sigmoid * x and the sigmoid gets TFLite's fixed
  int8 range (scale 1/256, zero point -128), so that every op of the TFLite file is int8 (the
  plain rules leave each SiLU in float, which microcontroller runtimes cannot run).
- `x86` (servers): torchao's X86InductorQuantizer; fast once lowered by torch.compile. Its
  graphs do not run in TFLite (the interpreter crashes on them), so the TFLite export refuses.

`QuantizedModel` puts a prepared or converted graph behind the zoo's interface
(`forward(x, labels=None)`, train/eval), so the Trainer fine-tunes and tests it unchanged.
Its checkpoint holds the *prepared* graph's state (weights plus observer / fake-quantizer
statistics) and how it was prepared: `load_quantized` rebuilds the float architecture,
prepares it the same way, loads that state and converts, which gives the same int8 model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.fx import GraphModule

from audioclf.model import Model

log = logging.getLogger(__name__)

BACKENDS = ("xnnpack", "x86")
MODES = ("ptq", "qat")
#: TFLite's fixed int8 range for LOGISTIC (sigmoid) outputs: [0, 1) in 256 steps.
SIGMOID_SCALE, SIGMOID_ZERO_POINT = 1.0 / 256.0, -128
#: The version of the xnnpack rules `prepare` applies. A checkpoint's state loads into the
#: rules it was prepared with only: 1 requantized after dropout, 2 shares its input's range.
XNNPACK_RULES = 2
_MAX_BATCH = 4096


@functools.cache
def _load_torchao() -> None:
    """Import torchao once, without its import-time noise (it logs a warning for each CUDA
    kernel library it cannot load on a CPU machine)."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    except ImportError as error:
        raise QuantizationError(
            f"quantization needs torchao: pip install -e . ({error})"
        ) from error
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    _trace_patterns_once()


_PATTERN_TRACER = "_get_aten_graph_module_for_pattern"


def _trace_patterns_once() -> None:
    """Make torchao trace each of its rewrite patterns once per process.

    Converting a QAT graph traces about 150 small conv-BN patterns with torch.export (25 s of
    a 42 s QAT run of a tiny model on two cores), and every switch of a QAT graph between
    train and eval traces 4 more. A traced pattern depends only on the pattern's code, its
    closure and defaults, and the shapes of the example inputs; the first trace for such a
    key is kept and each caller gets its own copy. A pattern this cannot key is traced as
    before.
    """
    from torchao.quantization.pt2e import qat_utils, reference_representation_rewrite, utils

    trace = getattr(utils, _PATTERN_TRACER)
    if getattr(trace, "traces", None) is not None:
        return
    traces: dict[Any, Any] = {}

    def traced_once(pattern, example_inputs, is_cuda=False, **kwargs):
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return trace(pattern, example_inputs, is_cuda, **kwargs)
        if key not in traces:
            traces[key] = trace(pattern, example_inputs, is_cuda, **kwargs)
        return copy_graph(traces[key])

    traced_once.traces = traces
    traced_once.original = trace
    for module in (utils, qat_utils, reference_representation_rewrite):
        if hasattr(module, _PATTERN_TRACER):
            setattr(module, _PATTERN_TRACER, traced_once)


def copy_graph(graph: GraphModule) -> GraphModule:
    """A deep copy of a captured graph, without the FutureWarning torch's pytree gives for
    each tree spec it copies (`isinstance(treespec, LeafSpec)` is deprecated; it reached
    users' consoles, `audioclf-predict` included)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        return copy.deepcopy(graph)


def _pattern_key(pattern: Any, example_inputs: Any, is_cuda: bool, kwargs: dict) -> Any:
    """What a traced pattern depends on, hashable; None when the pattern is not a plain
    function (or a module wrapping one, `fn`) or holds something unhashable."""
    function = getattr(pattern, "fn", pattern)
    code = getattr(function, "__code__", None)
    if code is None:
        return None

    def shape_of(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype, value.device.type)
        if isinstance(value, tuple | list):
            return tuple(shape_of(item) for item in value)
        if isinstance(value, dict):
            return tuple(sorted((name, shape_of(item)) for name, item in value.items()))
        return value

    cells = tuple(shape_of(cell.cell_contents) for cell in function.__closure__ or ())
    defaults = (shape_of(function.__defaults__), shape_of(function.__kwdefaults__))
    key = (code, cells, defaults, shape_of(example_inputs), is_cuda, shape_of(kwargs))
    try:
        hash(key)
    except TypeError:
        return None
    return key


class QuantizationError(RuntimeError):
    """A model that could not be quantized, or a quantized checkpoint that does not load."""


@dataclass(frozen=True)
class QuantSpec:
    """How a model was quantized: enough to prepare it again the same way."""

    backend: Literal["xnnpack", "x86"]
    mode: Literal["ptq", "qat"]
    #: The input the graph was captured with, without the batch: (1, frames, mels).
    input_shape: tuple[int, ...]
    #: Weights with a scale per output channel (false: one per tensor; xnnpack only).
    per_channel: bool = True
    #: The xnnpack rules' version (`XNNPACK_RULES`); 1 in checkpoints from before the field.
    rules: int = XNNPACK_RULES

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise QuantizationError(f"backend {self.backend!r}: one of {BACKENDS}")
        if self.mode not in MODES:
            raise QuantizationError(f"mode {self.mode!r}: one of {MODES}")
        if not self.per_channel and self.backend != "xnnpack":
            raise QuantizationError("per-tensor weights (per_channel=false) need backend xnnpack")


def _xnnpack_quantizer(qat: bool, per_channel: bool = True):
    # torchao keeps its XNNPACK quantizer (the rules XNNPACK and TFLite execute) under
    # torchao.testing since ExecuTorch took over the public one; it is the same code.
    from torchao.quantization.pt2e.quantizer import (
        FixedQParamsQuantizationSpec,
        QuantizationAnnotation,
        SharedQuantizationSpec,
    )
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    sigmoid_output = FixedQParamsQuantizationSpec(
        dtype=torch.int8,
        scale=SIGMOID_SCALE,
        zero_point=SIGMOID_ZERO_POINT,
        quant_min=-128,
        quant_max=127,
        qscheme=torch.per_tensor_affine,
    )

    class MobileQuantizer(XNNPACKQuantizer):
        """XNNPACK's rules, plus int8 SiLU (as sigmoid * x) and sigmoid."""

        def transform_for_annotation(self, model: GraphModule) -> GraphModule:
            model = super().transform_for_annotation(model)
            return split_silu(model)

        def annotate(self, model: GraphModule) -> GraphModule:
            model = super().annotate(model)
            config = self.global_config
            for node in model.graph.nodes:
                if node.op != "call_function" or "quantization_annotation" in node.meta:
                    continue
                if node.target == torch.ops.aten.sigmoid.default:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: config.input_activation},
                        output_qspec=sigmoid_output,
                        _annotated=True,
                    )
                elif node.target in _DROPOUT and _quantized_output(node.args[0]):
                    # Dropout shares its input's int8 parameters, as XNNPACK's rules have
                    # pooling share them: otherwise the next layer's input gets its own and
                    # the int8 graph requantizes there, which TFLite does not (litert-torch
                    # drops eval-mode dropout with the requantization).
                    shared = SharedQuantizationSpec(node.args[0])
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: shared},
                        output_qspec=shared,
                        _annotated=True,
                    )
            return model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "XNNPACKQuantizer is deprecated" (see above)
        return MobileQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat)
        )


_DROPOUT = (torch.ops.aten.dropout.default, torch.ops.aten.dropout_.default)


def _quantized_output(node: Any) -> bool:
    annotation = getattr(node, "meta", {}).get("quantization_annotation")
    return annotation is not None and annotation.output_qspec is not None


def split_silu(model: GraphModule) -> GraphModule:
    """Replace each SiLU node by x * sigmoid(x), which quantizers know how to annotate."""
    silu = (torch.ops.aten.silu.default, torch.ops.aten.silu_.default)
    for node in list(model.graph.nodes):
        if node.op != "call_function" or node.target not in silu:
            continue
        with model.graph.inserting_before(node):
            sigmoid = model.graph.call_function(torch.ops.aten.sigmoid.default, (node.args[0],))
            product = model.graph.call_function(torch.ops.aten.mul.Tensor, (node.args[0], sigmoid))
        # The annotators read each node's example value (shape, dtype): same as SiLU's.
        sigmoid.meta = dict(node.meta)
        product.meta = dict(node.meta)
        node.replace_all_uses_with(product)
        model.graph.erase_node(node)
    model.graph.lint()
    model.recompile()
    return model


def make_quantizer(backend: str, qat: bool, per_channel: bool = True):
    """The PT2E quantizer for `backend` (`xnnpack` or `x86`); `per_channel=False` (xnnpack):
    one weight scale per tensor instead of one per output channel."""
    _load_torchao()
    if backend == "xnnpack":
        return _xnnpack_quantizer(qat, per_channel)
    if backend == "x86":
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        return X86InductorQuantizer().set_global(
            get_default_x86_inductor_quantization_config(is_qat=qat)
        )
    raise QuantizationError(f"backend {backend!r}: one of {BACKENDS}")


class _Logits(nn.Module):
    """The model as a one-input graph: features -> logits (no labels: no margin)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features)


def capture(model: nn.Module, example: torch.Tensor, train: bool) -> GraphModule:
    """`model` (features -> logits) as an exported graph with a dynamic batch, in training
    mode for QAT (BatchNorm and dropout as in training) or eval mode for PTQ."""
    module = _Logits(model).train(train)
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
    return exported.module()


class QuantizedModel(nn.Module):
    """A PT2E graph, prepared (observers / fake quantizers: calibrate or fine-tune it) or
    converted (int8), behind the zoo's interface. `train()` / `eval()` switch the graph's
    BatchNorm and dropout as `move_exported_model_to_train` / `_eval` do."""

    def __init__(self, graph: GraphModule, spec: QuantSpec, converted: bool = False) -> None:
        super().__init__()
        _load_torchao()
        from torchao.quantization.pt2e import allow_exported_model_train_eval

        # So that code calling .eval() on an enclosing module (converters do) switches the
        # graph's BatchNorm and dropout instead of failing.
        self.network = allow_exported_model_train_eval(graph)
        self.spec = spec
        self.converted = converted
        #: The prepared graph's state, kept at conversion: what a checkpoint stores.
        self.prepared_state: dict[str, torch.Tensor] | None = None
        self._bn_frozen = False
        self._observers_frozen = False

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.network(x)

    def train(self, mode: bool = True) -> QuantizedModel:
        from torchao.quantization.pt2e import (
            move_exported_model_to_eval,
            move_exported_model_to_train,
        )

        self.training = mode
        # The switch rewrites the graph from patterns traced on random example inputs: it
        # must not move the global generator, or a resumed QAT run draws other dropout masks
        # than an uninterrupted one (whose graph came back from evaluation mode).
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.network)
        if mode and self._bn_frozen:
            _freeze_batch_norm(self.network)
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

    def convert(self) -> QuantizedModel:
        """The int8 model (a new module; this one is left as it was)."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        if self.converted:
            return self
        state = {key: value.detach().clone() for key, value in self.network.state_dict().items()}
        # convert_pt2e works in place: convert a copy rebuilt from the state.
        graph = copy_graph(self.network)
        with warnings.catch_warnings(), _qat_folding(self.spec.mode == "qat"):
            warnings.simplefilter("ignore")
            converted = convert_pt2e(graph, fold_quantize=False)
        result = QuantizedModel(converted, self.spec, converted=True)
        result.prepared_state = state
        return result.eval()

    def checkpoint_state(self) -> dict[str, Any]:
        """What an int8 checkpoint stores: the spec and the prepared graph's state."""
        state = self.prepared_state if self.converted else self.network.state_dict()
        return {"spec": asdict(self.spec), "state": dict(state)}


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


def _freeze_batch_norm(graph: GraphModule) -> None:
    """Training-mode graph, BatchNorm on its running statistics (dropout still active)."""
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.batch_norm.default:
            args = list(node.args)
            args[5] = False  # (input, weight, bias, mean, var, training, momentum, eps, cudnn)
            node.args = tuple(args)
    graph.recompile()


def prepare(
    model: Model,
    example: torch.Tensor,
    backend: str = "xnnpack",
    mode: str = "ptq",
    per_channel: bool = True,
) -> QuantizedModel:
    """A copy of `model` captured and prepared for PTQ (observers) or QAT (fake quantizers);
    `model` itself is left as it was (a captured graph would share its parameters, and
    fine-tuning them would change it)."""
    _load_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    spec = QuantSpec(backend, mode, tuple(example.shape[1:]), per_channel)
    qat = mode == "qat"
    source = copy.deepcopy(model).cpu()
    graph = capture(source, example.cpu(), train=qat)
    quantizer = make_quantizer(backend, qat, per_channel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(graph, quantizer)
    result = QuantizedModel(prepared, spec)
    return result.train(qat)


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
    if spec.backend == "xnnpack" and spec.rules != XNNPACK_RULES:
        # Its observers' names still fit, but not what they observed: loaded, the graph would
        # quantize differently from the model that was tested.
        raise QuantizationError(
            f"{source}: quantized with an earlier version's int8 rules ({spec.rules}, now "
            f"{XNNPACK_RULES}), which requantized after dropout where TFLite does not; quantise "
            "its float checkpoint again: run.train=false run.quantise=true "
            "run.checkpoint_path=<its run>/checkpoints/best.pth"
        )
    example = torch.zeros(2, *spec.input_shape)
    prepared = prepare(model, example, spec.backend, spec.mode, spec.per_channel)
    load_graph_state(prepared.network, state, source)
    return prepared.convert()


def load_graph_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a prepared graph's state (or a QuantizedModel's) with every key checked; the
    observers' and fake quantizers' statistics take the loaded shapes (their per-channel
    ranges are empty before calibration). QuantizationError names what does not fit."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise QuantizationError(
            f"{source}: the int8 state does not match this architecture: "
            f"missing {_some(missing)}, unexpected {_some(unexpected)}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise QuantizationError(f"{source}: the int8 state does not load: {error}") from error


def _some(keys: list[str]) -> str:
    return "[]" if not keys else ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
