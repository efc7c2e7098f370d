"""The PT2E quantizers of the backends (which ops get int8, with which ranges) and torchao's
loading, for `audioclf.quant`.

- `xnnpack` (phones and microcontrollers, TFLite): torchao's XNNPACK rules, plus SiLU split
  into sigmoid * x with the sigmoid at TFLite's fixed int8 range (scale 1/256, zero point
  -128), so that every op of the TFLite file is int8 (the plain rules leave each SiLU in
  float, which microcontroller runtimes cannot run); and dropout sharing its input's range,
  as pooling does (its own range was a requantization that litert-torch drops).
- `x86` (servers): torchao's X86InductorQuantizer.

torchao is imported once and quietly, its rewrite patterns are traced once per process, and
its QAT conv-BN passes skip the kinds of convolution a graph does not have. `pin_qparams`
fixes the quantization parameters conversion reads from a graph's observers (an int8
checkpoint's, or each computed once).
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from audioclf.runtime import quiet_pytree_warnings

BACKENDS = ("xnnpack", "x86")
#: TFLite's fixed int8 range for LOGISTIC (sigmoid) outputs: [0, 1) in 256 steps.
SIGMOID_SCALE, SIGMOID_ZERO_POINT = 1.0 / 256.0, -128


class QuantizationError(RuntimeError):
    """A model that could not be quantized, or a quantized checkpoint that does not load."""


@functools.cache
def load_torchao() -> None:
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
    _skip_absent_convolutions()


_PATTERN_TRACER = "_get_aten_graph_module_for_pattern"


def _trace_patterns_once() -> None:
    """Make torchao trace each of its rewrite patterns once per process.

    Converting a QAT graph traces about 120 small conv-BN patterns with torch.export (25 s of
    a 42 s QAT run of a tiny model on two cores). A traced pattern depends only on the
    pattern's code, its closure and defaults, and the shapes of the example inputs; the first
    trace for such a key is kept and each caller gets its own copy. A pattern this cannot key
    is traced each time. Each is traced by `_trace_pattern`, not by torchao's strict tracer.
    """
    from torchao.quantization.pt2e import qat_utils, reference_representation_rewrite, utils

    trace = getattr(utils, _PATTERN_TRACER)
    if getattr(trace, "traces", None) is not None:
        return
    traces: dict[Any, Any] = {}

    def traced_once(pattern, example_inputs, is_cuda=False, **kwargs):
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return _trace_pattern(trace, pattern, example_inputs, is_cuda, kwargs)
        if key not in traces:
            traces[key] = _trace_pattern(trace, pattern, example_inputs, is_cuda, kwargs)
        return copy_graph(traces[key])

    traced_once.traces = traces
    traced_once.original = trace
    for module in (utils, qat_utils, reference_representation_rewrite):
        if hasattr(module, _PATTERN_TRACER):
            setattr(module, _PATTERN_TRACER, traced_once)


def _skip_absent_convolutions() -> None:
    """Make torchao's QAT conv-BN passes skip the convolution kinds a graph does not have.

    Preparing and converting a QAT graph each run a pass per kind (conv1d, conv2d,
    conv_transpose1d, conv_transpose2d), each matching its patterns against the whole graph,
    and converting's passes regenerate the graph's code at each of their 12 patterns: half of
    the 11 s that loading an EfficientNetV2 QAT int8 checkpoint took. For a kind with no node
    in the graph nothing can match, and its pass is skipped. The graphs are the same (tested
    against torchao's own passes).
    """
    from torchao.quantization.pt2e import qat_utils

    for name in ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper"):
        conv_bn_pass = getattr(qat_utils, name)
        if getattr(conv_bn_pass, "original", None) is None:
            setattr(qat_utils, name, _only_for_present_kinds(conv_bn_pass))


def _only_for_present_kinds(conv_bn_pass: Any) -> Any:
    """`conv_bn_pass(m, conv_fn, ...)`, run only when graph `m` has a `conv_fn` op."""

    def for_present_kinds(m: GraphModule, conv_fn: Any, *args: Any, **kwargs: Any) -> GraphModule:
        op = f"aten.{conv_fn.__name__}."  # aten.conv2d.default, aten.conv2d.padding
        if not any(n.op == "call_function" and str(n.target).startswith(op) for n in m.graph.nodes):
            return m
        return conv_bn_pass(m, conv_fn, *args, **kwargs)

    for_present_kinds.original = conv_bn_pass
    return for_present_kinds


def _trace_pattern(
    torchao_trace: Any, pattern: Any, example_inputs: Any, is_cuda: bool, kwargs: dict
) -> GraphModule:
    """A rewrite pattern as torchao traces it (aten ops, dead code and unused input copies
    removed), but by torch.export's non-strict tracer: torchao asks for the strict one, whose
    TorchDynamo pass took 22 of the 29 s that loading an EfficientNetV2 QAT int8 checkpoint
    spent tracing patterns (11 s in all, instead of 23). The graphs are the same (tested
    against torchao's own tracing). A pattern the non-strict tracer refuses, or one for CUDA,
    is left to torchao."""
    if is_cuda:
        return torchao_trace(pattern, example_inputs, is_cuda, **kwargs)
    try:
        exported = torch.export.export(pattern, example_inputs, kwargs, strict=False)
        graph = exported.module(check_guards=False)  # no input-guard node: torchao's graph
    except Exception:  # noqa: BLE001 - torchao's own tracer decides
        return torchao_trace(pattern, example_inputs, is_cuda, **kwargs)
    nodes = graph.graph
    nodes.eliminate_dead_code()
    # The exported module copies back into mutated inputs; a pattern has no use for that.
    for node in list(nodes.nodes):
        if node.target == torch.ops.aten.copy_.default and not node.users:
            nodes.erase_node(node)
    nodes.eliminate_dead_code()
    graph.recompile()
    return graph


def copy_graph(graph: GraphModule) -> GraphModule:
    """A deep copy of a captured graph, without torch's pytree FutureWarnings (they reached
    users' consoles, `audioclf-predict` included)."""
    with quiet_pytree_warnings():
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
    from torchao.testing.pt2e._xnnpack_quantizer_utils import _is_share_obs_or_fq_op

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
                elif (
                    node.target in DROPOUT or _is_share_obs_or_fq_op(node.target)
                ) and _quantized_output(node.args[0]):
                    # Dropout shares its input's int8 parameters, as XNNPACK's rules have
                    # pooling share them: otherwise the next layer's input gets its own and
                    # the int8 graph requantizes there, which TFLite does not (litert-torch
                    # drops eval-mode dropout with the requantization). In graph order, so
                    # that pooling after a dropout shares too (XNNPACK's pass came first).
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


#: Dropout's ops in a captured graph; each takes (input, p, training).
DROPOUT = (
    torch.ops.aten.dropout.default,
    torch.ops.aten.dropout_.default,
    torch.ops.aten.feature_dropout.default,  # nn.Dropout2d / 3d
    torch.ops.aten.alpha_dropout.default,
    torch.ops.aten.feature_alpha_dropout.default,
)


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
    load_torchao()
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


def pin_qparams(
    graph: GraphModule, stored: dict[str, Any] | None = None, source: str = "checkpoint"
) -> dict[str, list[torch.Tensor]]:
    """Fix the quantization parameters that convert_pt2e reads from each observer (or fake
    quantizer) of `graph`: `stored` ones, or each computed here once. HistogramObserver
    searches for its range on every call (11 of the 11.3 s of converting a PANNs MobileNetV1),
    and an int8 checkpoint's load paid that again. Returns them, by observer name."""
    from torchao.quantization.pt2e import FakeQuantizeBase, ObserverBase

    # By node: an observer shared by two nodes is one module under two names.
    calls = [node.target for node in graph.graph.nodes if node.op == "call_module"]
    observers = {
        name: module
        for name in calls
        if isinstance(module := graph.get_submodule(name), ObserverBase | FakeQuantizeBase)
    }
    if stored is not None:
        missing, unexpected = (
            sorted(set(observers) - set(stored)),
            sorted(set(stored) - set(observers)),
        )
        if missing or unexpected:
            raise QuantizationError(
                f"{source}: its quantization parameters do not match the graph's observers: "
                f"missing {some_keys(missing)}, unexpected {some_keys(unexpected)}"
            )
    pinned = {}
    for name, observer in observers.items():
        if stored is None:
            scale, zero_point = observer.calculate_qparams()
        else:
            scale, zero_point = _checked_qparams(stored[name], observer, f"{source}: {name}")
        scale, zero_point = scale.detach().clone(), zero_point.detach().clone()
        pinned[name] = [scale, zero_point]
        # An instance attribute: convert_pt2e calls it (the class's method searched again).
        observer.calculate_qparams = functools.partial(_pinned, scale, zero_point)
    return pinned


def _pinned(scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scale, zero_point


def _checked_qparams(value: Any, observer: nn.Module, where: str) -> tuple[torch.Tensor, ...]:
    """A stored [scale, zero point] pair for `observer`, or a QuantizationError saying why not."""
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(item, torch.Tensor) for item in value)
    ):
        raise QuantizationError(f"{where}: quantization parameters must be [scale, zero point]")
    scale, zero_point = value
    # Per tensor one value, per channel one per channel, as the observer's own statistics.
    reference = getattr(observer, "min_val", getattr(observer, "scale", None))
    size = None if not isinstance(reference, torch.Tensor) else max(reference.numel(), 1)
    if (
        not scale.is_floating_point()
        or zero_point.is_floating_point()
        or scale.shape != zero_point.shape
        or (size is not None and scale.numel() != size)
        or not bool(torch.isfinite(scale).all() and (scale > 0).all())
    ):
        raise QuantizationError(
            f"{where}: quantization parameters out of range (scale {tuple(scale.shape)} "
            f"{scale.dtype}, zero point {tuple(zero_point.shape)} {zero_point.dtype})"
        )
    return scale, zero_point


def some_keys(keys: list[str]) -> str:
    """The first five of `keys` for an error message."""
    return "[]" if not keys else ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
