"""Quantization (PT2E PTQ and QAT) and the TFLite exports: round trips, full-int8 files, the
checks, int8 checkpoints through the main job and predict."""

from __future__ import annotations

import copy
import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audioclf import quant, quantizers, tflite
from audioclf.checkpoint import load_checkpoint
from audioclf.cli import run
from audioclf.export import ExportError, Int8Model, check_export, export_model, inference_model
from audioclf.export.checks import top1_margins
from audioclf.export.formats import MicroCheckRunner, export_tflite
from audioclf.features import resolve_params
from audioclf.model import create_model
from audioclf.model.heads import LinearHead
from audioclf.model.layers import ConvBnAct
from audioclf.normalization import FeatureNormalization
from audioclf.pipeline import build_model
from audioclf.predict import load_predictor
from audioclf.predict import main as predict_main
from audioclf.settings import ConfigError, load_settings
from conftest import fsdd_clip, tiny_split_manifest

pytest.importorskip("litert_torch", reason="the tflite extra is not installed")

PARAMS = resolve_params("librosa", 8000)


_TRAINED: dict[int, dict] = {}


def tiny_model(seed: int = 0):
    """A tiny model trained for a few steps on fixed random data: a fresh one's activations
    and logits (about 1e-3) are below int8 resolution, which proves nothing."""
    if seed not in _TRAINED:
        torch.manual_seed(seed)
        model = create_model("efficientnet_v2", 3, width_mult=0.25, depth_mult=0.25)
        generator = torch.Generator().manual_seed(1)
        _fit(model, torch.randn(24, 1, 40, 32, generator=generator) * 2.0)
        _TRAINED[seed] = model.state_dict()
    model = create_model("efficientnet_v2", 3, width_mult=0.25, depth_mult=0.25)
    model.load_state_dict(_TRAINED[seed])
    return model.eval()


def _fit(model: torch.nn.Module, inputs: torch.Tensor) -> None:
    """30 AdamW steps on `inputs` labelled 0, 1, 2, 0, ...: activations above int8 resolution."""
    labels = torch.arange(len(inputs)) % 3
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(24, 1, 40, 32, generator=generator) * 2.0


@pytest.mark.parametrize("backend", ["xnnpack", "x86"])
def test_ptq_round_trip_through_its_checkpoint_state(features, backend):
    int8 = quant.quantize_ptq(tiny_model(), [features[:12], features[12:]], features[:2], backend)
    ops = {str(node.target) for node in int8.network.graph.nodes}
    assert any("quantize_per_tensor" in op for op in ops)
    reloaded = quant.load_quantized(tiny_model(seed=5), int8.checkpoint_state())
    with torch.no_grad():
        assert torch.allclose(reloaded(features), int8(features), atol=1e-5)
        assert int8(features[:1]).shape == (1, 3)  # dynamic batch, batch 1 included


def test_an_int8_checkpoint_loads_with_its_quantization_parameters(features, monkeypatch):
    # HistogramObserver searched for its range again on every load (11 s for a PANNs model).
    int8 = quant.quantize_ptq(tiny_model(), [features], features[:2])
    state = int8.checkpoint_state()
    observers = {
        type(module)
        for module in quant.prepare(tiny_model(), features[:2]).network.modules()
        if hasattr(module, "calculate_qparams")
    }
    assert any(kind.__name__ == "HistogramObserver" for kind in observers)
    with monkeypatch.context() as patch:
        for kind in observers:
            patch.setattr(kind, "calculate_qparams", lambda self: pytest.fail("computed again"))
        reloaded = quant.load_quantized(tiny_model(seed=5), state)
    # The same int8 model as the one converted, and as an older checkpoint's (computed).
    older = quant.load_quantized(tiny_model(seed=5), {**state, "qparams": None})
    with torch.no_grad():
        assert torch.equal(reloaded(features), int8(features))
        assert torch.equal(older(features), int8(features))
    assert reloaded.network.code == int8.network.code
    # Parameters that do not fit the graph are named.
    name = sorted(state["qparams"])[0]
    qparams = dict(state["qparams"])
    del qparams[name]
    with pytest.raises(quant.QuantizationError, match=f"int8.pth: .*missing {name}"):
        quant.load_quantized(tiny_model(), {**state, "qparams": qparams}, "int8.pth")
    scale, zero_point = state["qparams"][name]
    for bad in ([-scale, zero_point], [scale, zero_point.float()], [scale.repeat(3), zero_point]):
        qparams[name] = bad
        with pytest.raises(quant.QuantizationError, match=f"int8.pth: {name}: .* out of range"):
            quant.load_quantized(tiny_model(), {**state, "qparams": qparams}, "int8.pth")


def clear_of_rounding(logits: np.ndarray, step: float, steps: int = 4) -> np.ndarray:
    """The clips whose top-1 margin is more than `steps` int8 output steps: rounding (1-2
    steps, and which way depends on the CPU's float kernels inside int8 PyTorch) cannot flip
    them, a converter fault (tens of steps) can. The tiny models have a few near-ties."""
    return top1_margins(logits) > steps * step


def _export(tmp_path, model, features, **options):
    """export_model with the tiny models' classes and features."""
    return export_model(
        model,
        options.pop("formats", ["tflite"]),
        tmp_path,
        classes=["a", "b", "c"],
        feature_params=PARAMS,
        clip_seconds=0.5,
        normalization=options.pop("normalization", None),
        check_features=features.numpy(),
        model_name="efficientnet_v2",
        **options,
    )


@pytest.fixture(scope="module")
def panns_model(features) -> torch.nn.Module:
    """A PANNs MobileNetV1 fitted to the features moved off zero, so bn0 has statistics and
    an affine transform of its own (a fresh model's outputs, about 1e-20, prove nothing)."""
    torch.manual_seed(0)
    model = create_model("panns_mobilenetv1", 3, n_mels=32)
    _fit(model, features + 3.0)
    return model.eval()


@pytest.fixture(scope="module")
def panns_int8(features, panns_model) -> quant.QuantizedModel:
    return quant.quantize_ptq(panns_model, [features + 3.0], features[:2])


def test_ptq_folds_every_batch_norm_of_panns_mobilenets_and_takes_bn0_out(
    features, panns_model, panns_int8
):
    # Conv, AvgPool, BatchNorm: torchao folds only a BatchNorm right after its convolution, so
    # each block kept a float BatchNorm between int8 ops (a DEQUANTIZE, float MUL and ADD and a
    # QUANTIZE in the TFLite file, 14 times). bn0, on the input mel bins, normalises before
    # the first convolution's zero padding, so it cannot fold: the int8 model takes it out of
    # the graph as its input normalisation, and the graph is int8 from its input.
    inputs, int8 = features + 3.0, panns_int8
    assert not any("batch_norm" in str(node.target) for node in int8.network.graph.nodes)
    bn0 = panns_model.bn0  # the float model untouched
    assert isinstance(bn0, torch.nn.BatchNorm2d)
    assert isinstance(panns_model.features[1][2], torch.nn.BatchNorm2d)
    std = torch.sqrt(bn0.running_var + bn0.eps) / bn0.weight
    mean = bn0.running_mean - bn0.bias * std
    normalization = int8.input_normalization
    np.testing.assert_allclose(normalization.std, std.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(normalization.mean, mean.detach().numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logits = panns_model(inputs)
        assert torch.equal(int8(inputs).argmax(1), logits.argmax(1))
        assert (int8(inputs) - logits).abs().max() < 0.05 * logits.abs().max()
    # A fresh model's bn0 differs: the checkpoint's normalisation is what the reload uses.
    fresh = create_model("panns_mobilenetv1", 3, n_mels=32)
    reloaded = quant.load_quantized(fresh, int8.checkpoint_state())
    with torch.no_grad():
        assert torch.equal(reloaded(inputs), int8(inputs))


def test_panns_int8_tflite_file_is_int8_from_its_input_with_bn0_in_the_sidecar(
    tmp_path, features, panns_int8
):
    from ai_edge_litert.interpreter import Interpreter

    inputs, int8 = features + 3.0, panns_int8
    check, micro = _export(tmp_path, None, inputs, quantized=int8)
    assert check.passed
    assert micro.passed
    path = tmp_path / "model_int8.tflite"
    interpreter = Interpreter(model_path=str(path))
    tensor_types = {str(t["dtype"].__name__) for t in interpreter.get_tensor_details()}
    assert tensor_types <= {"int8", "int32"}, tensor_types  # bn0's float MUL and ADD are gone
    info = json.loads((tmp_path / "model_int8.tflite.json").read_text())
    assert info["input"]["dtype"] == "int8"
    assert info["normalization"]["inside_model"] is False
    assert info["normalization"]["mean"] == int8.input_normalization.mean.tolist()
    # Fed raw features through its sidecar, the file gives the int8 PyTorch model's logits.
    with torch.no_grad():
        expected = int8(inputs).numpy()
    logits = load_predictor(path).logits(inputs.numpy())
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.95
    assert np.abs(logits - expected).max() < 0.1 * np.abs(expected).max()


def test_a_normalisation_after_another_is_the_two_in_turn():
    # What an int8 file of a model with an input BatchNorm and pipeline statistics takes.
    rng = np.random.default_rng(0)

    def random_normalization() -> FeatureNormalization:
        mean = rng.normal(size=8).astype(np.float32)
        return FeatureNormalization(mean, rng.uniform(0.5, 2.0, 8).astype(np.float32))

    first, second = random_normalization(), random_normalization()
    x = rng.normal(size=(3, 1, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(second.after(first)(x), second(first(x)), rtol=1e-5, atol=1e-5)
    assert second.after(None) is second


def test_an_input_normalisation_in_a_checkpoint_needs_a_model_with_an_input_batch_norm(
    features, panns_int8
):
    state = quant.quantize_ptq(tiny_model(), [features], features[:2]).checkpoint_state()
    assert "input_normalization" not in state  # EfficientNetV2 has no input BatchNorm
    state["input_normalization"] = {"mean": [0.0] * 32, "std": [1.0] * 32}
    with pytest.raises(quant.QuantizationError, match="int8.pth: .*no input BatchNorm"):
        quant.load_quantized(tiny_model(), state, "int8.pth")
    panns_state = panns_int8.checkpoint_state()
    panns_state["input_normalization"]["std"][3] = 0.0
    with pytest.raises(quant.QuantizationError, match="input normalisation is malformed"):
        quant.load_quantized(create_model("panns_mobilenetv1", 3, n_mels=32), panns_state)


def test_load_quantized_names_a_state_for_another_architecture(features):
    int8 = quant.quantize_ptq(tiny_model(), [features], features[:2])
    other = create_model("efficientnet_v2", 3, width_mult=0.5, depth_mult=0.25)
    with pytest.raises(quant.QuantizationError, match="does not"):
        quant.load_quantized(other, int8.checkpoint_state(), "int8.pth")


def test_an_int8_checkpoint_of_the_earlier_rules_is_refused_saying_what_to_do(features):
    state = quant.quantize_ptq(tiny_model(), [features], features[:2]).checkpoint_state()
    assert state["spec"]["rules"] == quant.RULES
    del state["spec"]["rules"]  # as written before the field
    with pytest.raises(quant.QuantizationError, match="earlier version's rules .*quantise"):
        quant.load_quantized(tiny_model(), state, "int8.pth")
    state["spec"]["rules"] = 2  # rules 3 changed only ArcFace heads
    quant.load_quantized(tiny_model(), state, "int8.pth")


def test_qat_trains_freezes_batch_norm_then_ranges_and_converts(features):
    labels = (torch.arange(len(features)) + 1) % 3  # not what tiny_model learnt
    prepared = quant.prepare(tiny_model().train(), features[:4], "xnnpack", "qat")
    optimizer = torch.optim.AdamW(prepared.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        prepared.train()
        loss = F.cross_entropy(prepared(features, labels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    def running_means():
        state = prepared.network.state_dict()
        return {k: v.clone() for k, v in state.items() if k.endswith("running_mean")}

    before = running_means()
    prepared.start_epoch(1, freeze_bn_epoch=1, freeze_observer_epoch=5)
    prepared.train()
    prepared(features)
    assert all(torch.equal(before[k], v) for k, v in running_means().items())
    scales = {k: v.clone() for k, v in prepared.network.state_dict().items() if "scale" in k}
    prepared.start_epoch(5, freeze_bn_epoch=1, freeze_observer_epoch=5)
    prepared(features * 10)  # ranges would widen if the observers still ran
    after = prepared.network.state_dict()
    assert all(torch.equal(scales[k], after[k]) for k in scales)
    int8 = prepared.convert()
    with torch.no_grad():
        agreement = (int8(features).argmax(1) == prepared.eval()(features).argmax(1)).float()
    assert agreement.mean() >= 0.9


class DropoutNet(torch.nn.Module):
    """Conv-BN-ReLU, Dropout2d, a mean pool, dropout and a linear layer; BatchNorm arguments
    of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3),
            torch.nn.BatchNorm2d(8, eps=1e-3, momentum=0.01),
            torch.nn.ReLU(),
            torch.nn.Dropout2d(0.2),
        )
        self.dropout = torch.nn.Dropout(0.1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.blocks(x).mean((2, 3))))


def _dropouts(module) -> list[tuple]:
    return [
        (str(node.target), *node.args[1:])
        for node in module.network.graph.nodes
        if "dropout" in str(node.target)
    ]


def test_qat_switches_dropout_keeping_its_rate_and_dropout2d_too(features, caplog):
    # torchao's train/eval switch put p=0.5 in every dropout and never switched Dropout2d:
    # QAT fine-tuned at 0.5 and the int8 model dropped channels at random.
    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="audioclf.quant"):
        prepared = quant.prepare(DropoutNet().train(), features[:2], "xnnpack", "qat")
    assert "instead of these layers' own: blocks.1 (eps 0.001, momentum 0.01)" in caplog.text
    training = [("aten.feature_dropout.default", 0.2, True), ("aten.dropout.default", 0.1, True)]
    assert _dropouts(prepared) == training
    prepared(features)
    assert _dropouts(prepared.eval()) == [(op, p, False) for op, p, _ in training]
    assert _dropouts(prepared.train()) == training
    int8 = prepared.convert()
    with torch.no_grad():
        assert torch.equal(int8(features), int8(features))
    for node in int8.network.graph.nodes:
        if "dropout" in str(node.target):  # no requantization at either (see below)
            (after,) = node.users
            assert node.args[0].args[0].args[1:] == after.args[1:], node.target
    caplog.clear()
    with caplog.at_level("WARNING", logger="audioclf.quant"):
        quant.prepare(tiny_model().train(), features[:2], "xnnpack", "qat")
    assert not caplog.records  # the zoo's BatchNorm layers use torchao's values


class NoisyNet(torch.nn.Module):
    """Adds noise in training by a Python branch, which torch.export fixes as taken."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.training:
            y = y + 0.1 * torch.randn_like(y)
        return self.fc(y.mean((2, 3)))


def test_qat_turns_stochastic_depth_off_and_refuses_other_random_branches(features):
    # A captured DropPath dropped residual branches in evaluation and in the int8 model:
    # `model.quantization.qat=true` on the default model (drop_path_rate 0.1) gave a random one.
    model = create_model("efficientnet_v2", 3, width_mult=0.25, depth_mult=0.5, drop_path_rate=0.5)
    assert any(getattr(layer, "drop_prob", 0) > 0 for layer in model.modules())
    prepared = quant.prepare(model.train(), features[:2], "xnnpack", "qat")
    prepared(features)
    int8 = prepared.convert()
    with torch.no_grad():
        assert torch.equal(int8(features), int8(features))
    assert model.training  # the float model keeps its stochastic depth
    with pytest.raises(quant.QuantizationError, match=r"random ops outside dropout \(aten\.randn"):
        quant.prepare(NoisyNet().train(), features[:2], "xnnpack", "qat")


def test_qat_conversion_traces_torchaos_patterns_once_and_converts_the_same(features, monkeypatch):
    quant.load_torchao()
    from torchao.quantization.pt2e import qat_utils, utils

    traced_once = utils._get_aten_graph_module_for_pattern
    traced_once.traces.clear()  # every pattern is traced in this test
    # Traced by torch.export's non-strict tracer (torchao's strict one took twice as long).
    export, calls = torch.export.export, []

    def recording(*args, strict: bool = False, **kwargs):
        calls.append((args, strict))
        return export(*args, strict=strict, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.export, "export", recording)
        prepared = quant.prepare(tiny_model().train(), features[:4], "xnnpack", "qat")
        torch.manual_seed(0)  # the same dropout as the reference's, below
        F.cross_entropy(prepared(features), torch.arange(len(features)) % 3).backward()
        first = prepared.convert()
    patterns = [args for args, _ in calls[1:]]  # the first is the model's capture
    assert len(patterns) > 30
    assert not any(strict for _, strict in calls)
    known = len(traced_once.traces)
    assert known > 30  # the conv-BN patterns, kept
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = prepared.convert()
    assert len(traced_once.traces) == known  # nothing traced a second time
    # Copying graphs used to print torch's pytree FutureWarning to the user's console.
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    # The same pattern graphs as torchao's own (strict) tracing gives: each fifth.
    torchaos = traced_once.original
    for pattern, example_inputs, kwargs in patterns[::5]:
        ours = quantizers._trace_pattern(torchaos, pattern, example_inputs, False, kwargs)
        theirs = torchaos(pattern, example_inputs, False, **kwargs)
        assert str(ours.graph) == str(theirs.graph)
    # The same QAT and int8 graphs as torchao's conv-BN passes give when they also run for
    # the convolution kinds the model has none of (conv1d, the transposed ones).
    for name in ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper"):
        monkeypatch.setattr(qat_utils, name, getattr(qat_utils, name).original)
    reference_prepared = quant.prepare(tiny_model().train(), features[:4], "xnnpack", "qat")
    assert len(traced_once.traces) > known  # the other kinds' patterns
    assert prepared.network.code == reference_prepared.network.code
    torch.manual_seed(0)
    F.cross_entropy(reference_prepared(features), torch.arange(len(features)) % 3).backward()
    reference = reference_prepared.convert()
    assert first.network.code == reference.network.code
    with torch.no_grad():
        assert torch.equal(first(features), reference(features))
        assert torch.equal(again(features), reference(features))


def test_ptq_conversion_skips_qat_folding_and_converts_the_same(features, monkeypatch):
    # A PANNs model's input BatchNorm follows no convolution, and made convert_pt2e trace its
    # ~100 QAT conv-BN patterns on every load of a PTQ int8 checkpoint (20 s of 30).
    from torchao.quantization.pt2e import quantize_pt2e

    calls = []
    folding = quantize_pt2e._fold_conv_bn_qat
    monkeypatch.setattr(
        quantize_pt2e, "_fold_conv_bn_qat", lambda graph: calls.append(1) or folding(graph)
    )
    torch.manual_seed(0)
    model = create_model("panns_mobilenetv1", 3, n_mels=32).eval()
    # bn0 kept in the graph, as int8 checkpoints before rules 4 have it.
    prepared = quant.prepare(model, features[:2], "xnnpack", "ptq", take_input_norm=False)
    quant.calibrate(prepared, [features])
    assert any(
        node.target == torch.ops.aten.batch_norm.default or "batch_norm" in str(node.target)
        for node in prepared.network.graph.nodes
    )
    int8 = prepared.convert()
    assert calls == []
    reference = quant.copy_graph(prepared.network)
    quant.pin_qparams(reference, int8.qparams)  # as converted (the histograms' search: 11 s)
    reference = quantize_pt2e.convert_pt2e(reference, fold_quantize=False)
    assert calls == [1]  # torchao's own conversion folds
    # The same operations in the same order (node names may differ), the same outputs.
    assert [(n.op, str(n.target)) for n in int8.network.graph.nodes] == [
        (n.op, str(n.target)) for n in reference.graph.nodes
    ]
    with torch.no_grad():
        assert torch.equal(int8(features), reference(features))
    state = int8.checkpoint_state()
    assert "input_normalization" not in state  # such a checkpoint loads with bn0 in the graph
    fresh = create_model("panns_mobilenetv1", 3, n_mels=32)
    with torch.no_grad():
        assert torch.equal(quant.load_quantized(fresh, state)(features), int8(features))
    qat = quant.prepare(tiny_model().train(), features[:4], "xnnpack", "qat")
    qat.convert()
    assert calls == [1, 1]  # QAT keeps it


def test_qat_fine_tuning_leaves_the_float_model_as_it_was(features):
    model = tiny_model().train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    prepared = quant.prepare(model, features[:4], "xnnpack", "qat")
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    F.cross_entropy(prepared(features), torch.arange(len(features)) % 3).backward()
    optimizer.step()
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert model.training  # nor its mode


def test_silu_becomes_int8_so_the_tflite_file_is_full_int8(tmp_path, features):
    from ai_edge_litert.interpreter import Interpreter

    normalization = FeatureNormalization(np.zeros(32, np.float32), np.full(32, 2, np.float32))
    normalised = torch.from_numpy(normalization(features.numpy()))
    int8 = quant.quantize_ptq(tiny_model(), [normalised], normalised[:2])
    check, micro = _export(
        tmp_path, None, features, normalization=normalization, quantized=int8, tflite_layout="nhwc"
    )
    assert check.passed
    assert check.precision == "int8"
    assert check.top1_agreement >= 0.99
    # The same file as a microcontroller runs it: TFLite Micro's kernels, channel-last int8.
    assert (micro.format, micro.path, micro.precision) == ("tflite-micro", check.path, "int8")
    assert micro.passed
    assert micro.arena_bytes > 0  # the RAM it needs there, in the report
    assert check.arena_bytes is None
    interpreter = Interpreter(model_path=str(tmp_path / "model_int8.tflite"))
    tensor_types = {str(t["dtype"].__name__) for t in interpreter.get_tensor_details()}
    assert tensor_types <= {"int8", "int32"}, tensor_types  # no float op left
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "LOGISTIC" in ops
    assert "DEQUANTIZE" not in ops
    info = json.loads((tmp_path / "model_int8.tflite.json").read_text())
    assert info["input"]["shape"] == [1, 40, 32, 1]  # one clip, as TFLite Micro takes it
    assert info["input"]["dtype"] == "int8"
    source = interpreter.get_input_details()[0]
    assert info["input"]["quantization"]["scale"] == pytest.approx(source["quantization"][0])
    assert info["normalization"]["inside_model"] is False


def test_float_tflite_agrees_and_a_corrupted_one_fails_its_check(tmp_path, features, capfd):
    from ai_edge_litert.tools import flatbuffer_utils

    model = tiny_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks = _export(tmp_path, model, features)
    out, err = capfd.readouterr()
    assert "LiteRT-Torch" not in out  # litert-torch's progress lines are kept quiet
    assert "XNNPACK" not in err  # and the interpreter's delegate announcing itself
    assert not [w for w in caught if "LeafSpec" in str(w.message)]  # torch's, per copy
    assert checks[0].passed
    assert checks[0].max_abs_diff <= 1e-4
    assert checks[1].format == "tflite-micro"  # TFLite Micro's float kernels agree as well
    assert checks[1].passed
    assert checks[1].max_abs_diff <= 1e-4
    path = tmp_path / "model.tflite"
    flat = flatbuffer_utils.read_model(str(path))
    largest = max(flat.buffers, key=lambda b: 0 if b.data is None else len(b.data))
    largest.data = np.zeros_like(largest.data)  # one weight tensor zeroed
    flatbuffer_utils.write_model(flat, str(path))
    check = check_export("tflite", path, inference_model(model, None), features.numpy())
    assert not check.passed
    assert "delta logit" in check.failure


def test_tflite_of_an_x86_quantized_model_stops_saying_why(tmp_path, features):
    int8 = quant.quantize_ptq(tiny_model(), [features], features[:2], "x86")
    with pytest.raises(ExportError, match="crashes the TFLite interpreter"):
        _export(tmp_path, None, features, quantized=int8)


def test_config_refuses_x86_with_tflite_at_start(compose_config):
    config = compose_config(
        "run.quantise=true",
        "model.quantization.backend=x86",
        "run.export=true",
        "run.export_formats=[tflite]",
    )
    with pytest.raises(ConfigError, match="backend=xnnpack"):
        run(config)


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_main_job_quantises_tests_both_and_exports_int8(compose_config, tmp_path, mode, capsys):
    common = [
        *tiny_split_manifest(tmp_path),
        "model.params.width_mult=0.25",
        "model.params.depth_mult=0.25",
        "training.batch_size=4",
    ]
    summary = run(
        compose_config(
            *common,
            "run.train=true",
            "run.test=true",
            "training.epochs=2",
            "run.quantise=true",
            f"model.quantization.mode={mode}",
            "model.quantization.epochs=2",
            "model.quantization.freeze_bn_epoch=1",
            "model.quantization.freeze_observer_epoch=1",
            "run.export=true",
            # Each format and input once: PTQ's waveform files here; QAT's log-mel ONNX here,
            # and its log-mel TFLite from the int8 checkpoint alone (below). The float
            # log-mel files are test_export's.
            f"run.export_formats={'[onnx,tflite]' if mode == 'ptq' else '[onnx]'}",
            f"run.export_inputs={'[waveform]' if mode == 'ptq' else '[log_mel]'}",
        )
    )
    outputs = tmp_path / "outputs"
    metrics = json.loads((outputs / "metrics.json").read_text())
    assert {"test", "test_int8"} <= set(metrics)
    # Float and int8 of each.
    exported = {
        (check["format"], check["precision"], check["input"]) for check in summary["export"]
    }
    assert exported == {
        (fmt, precision, kind)
        for fmt in (("onnx", "tflite", "tflite-micro") if mode == "ptq" else ("onnx",))
        for precision in ("float32", "int8")
        for kind in (("waveform",) if mode == "ptq" else ("log_mel",))
    }
    assert all(check["passed"] for check in summary["export"])
    if mode == "qat":
        assert (outputs / "qat" / "checkpoints" / "last.pth").exists()
    # The int8 checkpoint alone: tested (and, QAT's, exported to TFLite), and predicted with.
    int8 = tmp_path / "int8.pth"
    shutil.copy(outputs / "checkpoints" / "int8.pth", int8)
    again = run(
        compose_config(
            *common,
            "run.test=true",
            f"run.export={mode == 'qat'}",
            "run.export_formats=[tflite]",
            "run.export_inputs=[log_mel]",
            f"run.checkpoint_path={int8}",
            f"system.output_dir={tmp_path / 'again'}",
        )
    )
    assert again["test"]["accuracy"] == pytest.approx(summary["test_int8"]["accuracy"])
    capsys.readouterr()
    clip = str(fsdd_clip(1))
    if mode == "ptq":
        export = outputs / "export"
        models = [int8, export / "model_int8_waveform.tflite", export / "model_int8_waveform.onnx"]
    else:
        assert [(check["format"], check["precision"]) for check in again["export"]] == [
            ("tflite", "int8"),
            ("tflite-micro", "int8"),
        ]
        assert all(check["passed"] for check in again["export"])
        models = [int8, tmp_path / "again" / "export" / "model_int8.tflite"]
    for model_file in models:
        assert predict_main([str(model_file), clip, "--format", "json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result[0]["top"][0]["label"] in {"1", "2"}
    with pytest.raises(ConfigError, match="int8 checkpoint"):
        run(compose_config(*common, "run.train=true", f"run.checkpoint_path={int8}"))


def test_microcontroller_config_fits_256_kb_as_full_int8_tflite(compose_config, tmp_path):
    """The size is the architecture's, not the training's: calibrated on noise is enough."""
    settings = load_settings(compose_config("model=efficientnet_v2_micro"))
    model = build_model(settings.model, num_classes=10, n_mels=64).eval()
    inputs = torch.randn(16, 1, 101, 64)
    int8 = quant.quantize_ptq(model, [inputs], inputs[:2], settings.model.quantization.backend)
    path = tmp_path / "micro.tflite"
    export_tflite(Int8Model(int8), inputs[:2], path)
    assert path.stat().st_size <= 256 * 1024
    assert tflite.io_quantization(path)["input"]["dtype"] == "int8"
    # And TFLite Micro runs it, as LiteRT does (a file with a dynamic batch did not load), in
    # a tensor arena a microcontroller has (about 80 KB).
    micro = tflite.MicroRunner(path)
    np.testing.assert_array_equal(
        micro(inputs[:4].numpy()), tflite.runner(path)(inputs[:4].numpy())
    )
    assert 32 * 1024 < micro.arena_bytes <= 128 * 1024


@pytest.mark.parametrize(
    ("int8", "reason"),
    [
        (False, r"TFLite Micro: 2 outputs for one clip \(input shape \[1, 1"),
        # TFLite Micro's own message, which it prints rather than raises.
        (True, r"TFLite Micro: TFLM failed to allocate tensors \(.*PAD.*failed to prepare"),
    ],
)
def test_a_file_that_tflite_micro_cannot_run_fails_its_check_with_the_reason(
    tmp_path, features, int8, reason
):
    # What every TFLite file was before: a dynamic batch, traced on 2 clips, whose stored
    # shapes TFLite Micro runs as they are.
    model = inference_model(tiny_model(), None)
    if int8:
        model = Int8Model(quant.quantize_ptq(tiny_model(), [features], features[:2]))
    path = tmp_path / "dynamic.tflite"
    tflite.convert(model, features[:2], path, int8=int8, batch=torch.export.Dim("batch", max=64))
    clips = features.numpy()
    if int8:
        with torch.no_grad():
            logits = model(features).numpy()
        clips = clips[clear_of_rounding(logits, tflite.io_quantization(path)["output"]["scale"])]
        assert len(clips) >= 12
    check = check_export("tflite", path, model, clips, int8=int8)
    assert check.passed, check.failure  # LiteRT resizes it
    micro = check_export("tflite-micro", path, model, clips, int8=int8, runner=MicroCheckRunner)
    assert not micro.passed
    assert re.match(reason, micro.failure), micro.failure


def test_interrupted_qat_resumes_to_the_uninterrupted_result(compose_config, tmp_path):
    """QAT for 2 epochs in one go equals QAT stopped after epoch 1 and resumed (a constant
    LR, so that epoch 1 does not depend on the planned length)."""

    def job(name, qat_epochs, *extra):
        return run(
            compose_config(
                *tiny_split_manifest(tmp_path),
                "model.params.width_mult=0.25",
                "model.params.depth_mult=0.25",
                "training.batch_size=4",
                "training.epochs=1",
                "training.lr_schedule=constant",
                "system.deterministic=true",
                "run.quantise=true",
                "run.test=true",
                "run.export=false",
                "model.quantization.mode=qat",
                f"model.quantization.epochs={qat_epochs}",
                "model.quantization.freeze_bn_epoch=1",
                "model.quantization.freeze_observer_epoch=1",
                f"system.output_dir={tmp_path / name}",
                *extra,
            )
        )

    whole = job("whole", 2)
    job("stopped", 1)
    stopped_qat = tmp_path / "stopped" / "qat" / "checkpoints" / "last.pth"
    resumed = job("resumed", 2, f"run.resume={stopped_qat}")
    qat_states = [
        load_checkpoint(tmp_path / name / "qat" / "checkpoints" / "last.pth")
        for name in ("whole", "resumed")
    ]
    assert [state["epoch"] for state in qat_states] == [2, 2]
    for key, value in qat_states[0]["model"].items():
        assert torch.equal(value, qat_states[1]["model"][key]), key
    assert resumed["test_int8"] == whole["test_int8"]


def test_per_tensor_weights_round_trip_and_shrink_the_tflite_file(tmp_path, features):
    from ai_edge_litert.interpreter import Interpreter

    # A small plain network: the EfficientNetV2 converts to TFLite in about 10 s, twice here.
    torch.manual_seed(0)
    model = PoolDropoutNet()
    _fit(model, features)
    sizes = {}
    for per_channel in (True, False):
        prepared = quant.prepare(
            copy.deepcopy(model).eval(), features[:2], "xnnpack", "ptq", per_channel
        )
        quant.calibrate(prepared, [features])
        int8 = prepared.convert()
        reloaded = quant.load_quantized(PoolDropoutNet().eval(), int8.checkpoint_state())
        assert reloaded.spec.per_channel is per_channel
        with torch.no_grad():
            assert torch.allclose(reloaded(features), int8(features), atol=1e-5)
        path = tmp_path / f"per_channel_{per_channel}.tflite"
        export_tflite(Int8Model(int8), features[:2], path)
        sizes[per_channel] = path.stat().st_size
        scales = [
            len(t["quantization_parameters"]["scales"])
            for t in Interpreter(model_path=str(path)).get_tensor_details()
        ]
        assert (max(scales) == 1) is not per_channel
    assert sizes[False] < sizes[True]


class PoolDropoutNet(torch.nn.Module):
    """The README's custom model: Conv-BN-ReLU twice, a mean pool, dropout, a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.Sequential(
            ConvBnAct(1, 16, 3, stride=2, act_layer=torch.nn.ReLU),
            ConvBnAct(16, 16, 3, stride=2, act_layer=torch.nn.ReLU),
        )
        self.classifier = LinearHead(16, 3, dropout=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(x).mean((2, 3)))


def test_dropout_before_the_classifier_does_not_requantize_so_tflite_matches(tmp_path, features):
    # The linear layer's input used to get its own int8 range after dropout, a requantization
    # that litert-torch drops with the eval-mode dropout: 71% top-1 agreement here, a median
    # 66 output steps off.
    torch.manual_seed(0)
    model = PoolDropoutNet()
    _fit(model, features)
    int8 = quant.quantize_ptq(model.eval(), [features], features[:2])
    nodes = list(int8.network.graph.nodes)
    (dropout,) = [node for node in nodes if node.target == torch.ops.aten.dropout.default]
    before, (after,) = dropout.args[0].args[0], dropout.users
    assert before.args[1:] == after.args[1:]  # the same scale and zero point
    path = export_tflite(Int8Model(int8), features[:2], tmp_path / "m.tflite")
    with torch.no_grad():
        expected = int8(features).numpy()
    exported = tflite.runner(path)(features.numpy())
    step = tflite.io_quantization(path)["output"]["scale"]
    assert np.abs(exported - expected).max() <= 1.01 * step
    assert (exported.argmax(1) == expected.argmax(1)).all()


def test_an_arcface_model_converts_to_tflite_and_agrees(tmp_path, features):
    # F.normalize's expand_as over a dynamic batch did not lower in litert-torch, and a
    # keepdim norm became a RESHAPE to the traced batch of 2 that failed at any other batch
    # (files now have a batch of 1). QAT's int8 class centres, normalised in the graph,
    # converted 6.5 output steps off.
    torch.manual_seed(0)
    model = create_model("efficientnet_v2", 3, width_mult=0.25, depth_mult=0.25, arcface=True)
    _fit(model, features)
    checks = _export(tmp_path, model.eval(), features)
    assert [check.format for check in checks] == ["tflite", "tflite-micro"]
    check = checks[0]
    assert all(check.passed for check in checks), [c.failure for c in checks]
    assert check.max_abs_diff <= 1e-4
    ptq = quant.quantize_ptq(model, [features], features[:2])
    prepared = quant.prepare(model, features[:2], "xnnpack", "qat").train()
    with torch.no_grad():
        prepared(features)
    qat = prepared.convert()
    for int8 in (ptq, qat):  # the class centres folded: the only norm left is the embedding's
        nodes = int8.network.graph.nodes
        assert [n.target for n in nodes].count(torch.ops.aten.linalg_vector_norm.default) == 1
    path = export_tflite(Int8Model(qat), features[:2], tmp_path / "m_int8.tflite")
    run_file = tflite.runner(path)
    exported = run_file(features.numpy())
    np.testing.assert_array_equal(run_file(features[:1].numpy()), exported[:1])
    with torch.no_grad():
        expected = qat(features).numpy()
        reference = model(features).numpy()
    # The two int8 implementations round differently (up to 3 steps in the pooled embedding
    # here), and the normalisation amplifies that: the embedding uses a few dozen of its
    # int8 levels, so one level moves the normalised embedding by several of its own steps,
    # and the logits by up to ~20 output steps (AMD EPYC Milan). So each is judged against
    # the float model: the file adds no error of its own beyond int8 PyTorch's (measured 0.96
    # of it), and misses the float model's top-1 on at most one clip more. Faults raise the
    # error ratio: noise of 6.5 output steps (the class centres once converted that far off)
    # to 1.44, logits scaled by 1.2 to 1.64 (measured on the same model).
    file_error = np.abs(exported - reference).mean()
    assert file_error <= 1.25 * np.abs(expected - reference).mean()
    # That mean misses a constant offset of one class's logit, which can even cancel int8
    # PyTorch's own bias (1.0 on one class gave a ratio of 1.06). Rounding differences have no
    # direction: each class's mean difference from int8 PyTorch was within 0.7 of its standard
    # error here, where an offset of 1.0 (twice the mean error) is 5.8 or more.
    difference = exported - expected
    standard_error = difference.std(0) / np.sqrt(len(difference))
    bias = np.abs(difference.mean(0))
    assert (bias <= 4 * standard_error + 0.01).all(), (bias, standard_error)
    agree = (exported.argmax(1) == reference.argmax(1)).sum()
    assert agree >= (expected.argmax(1) == reference.argmax(1)).sum() - 1


def test_an_arcface_int8_checkpoint_from_before_the_folded_head_is_refused(features):
    torch.manual_seed(0)
    model = create_model("efficientnet_v2", 3, width_mult=0.25, depth_mult=0.25, arcface=True)
    state = quant.quantize_ptq(model.eval(), [features], features[:2]).checkpoint_state()
    quant.load_quantized(model, state)
    state["spec"]["rules"] = 2
    with pytest.raises(quant.QuantizationError, match=r"earlier version's rules \(2, now 4\)"):
        quant.load_quantized(model, state)
    state["spec"]["rules"] = 5
    with pytest.raises(quant.QuantizationError, match=r"newer version's rules \(5, now 4\)"):
        quant.load_quantized(model, state)


def test_per_tensor_weights_with_x86_are_refused_at_start(compose_config):
    config = compose_config(
        "run.quantise=true",
        "model.quantization.backend=x86",
        "model.quantization.per_channel=false",
    )
    with pytest.raises(ConfigError, match="per_channel=false needs backend=xnnpack"):
        run(config)


def test_quantising_a_float_checkpoint_follows_the_command_line(compose_config, tmp_path):
    """The checkpoint gives the architecture; how to quantise it is this run's choice."""
    common = [*tiny_split_manifest(tmp_path), "model.params.width_mult=0.25"]
    common.append("model.params.depth_mult=0.25")
    run(compose_config(*common, "run.train=true", "training.epochs=1"))
    best = tmp_path / "outputs" / "checkpoints" / "best.pth"
    run(
        compose_config(
            *common,
            "run.quantise=true",
            "model.quantization.per_channel=false",
            "model.quantization.calibration_clips=4",
            f"run.checkpoint_path={best}",
            f"system.output_dir={tmp_path / 'int8'}",
        )
    )
    spec = load_checkpoint(tmp_path / "int8" / "checkpoints" / "int8.pth")["quantized"]["spec"]
    assert spec["per_channel"] is False


def test_qat_fine_tuning_distils_from_the_teacher(compose_config, tmp_path):
    """A distilled QAT student: from the same float checkpoint, QAT with a teacher trains on
    another loss (and so to other weights) than QAT without one."""
    common = [
        *tiny_split_manifest(tmp_path),
        "model.params.width_mult=0.25",
        "model.params.depth_mult=0.25",
        "training.batch_size=4",
    ]
    run(compose_config(*common, "run.train=true", "training.epochs=1"))
    best = tmp_path / "outputs" / "checkpoints" / "best.pth"
    qat = [*common, "run.quantise=true", "model.quantization.mode=qat"]
    qat += ["model.quantization.epochs=1", f"run.checkpoint_path={best}"]
    teacher = ["teacher_model=efficientnet_v2", f"teacher_model.checkpoint_path={best}"]
    teacher += ["teacher_model.params.width_mult=0.25", "teacher_model.params.depth_mult=0.25"]
    losses = {}
    for name, extra in (("alone", []), ("distilled", teacher)):
        summary = run(compose_config(*qat, *extra, f"system.output_dir={tmp_path / name}"))
        history = load_checkpoint(tmp_path / name / "qat" / "checkpoints" / "last.pth")["history"]
        losses[name] = history[0]["train_loss"]
        assert ("distillation" in summary) is (name == "distilled")
    assert losses["alone"] != pytest.approx(losses["distilled"], rel=1e-3)


def test_qat_fine_tuning_weighs_the_loss_as_training_did(compose_config, tmp_path, monkeypatch):
    # training.class_balance=weights applied to training and was dropped from the QAT
    # fine-tuning, which trained the int8 model on the unweighted loss.
    from audioclf import deploy
    from audioclf.pipeline import build_datasets, build_loaders, class_weights

    settings = load_settings(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "model.params.width_mult=0.25",
            "model.params.depth_mult=0.25",
            "training.class_balance=weights",
            "run.quantise=true",
            "model.quantization.mode=qat",
        )
    )
    _, datasets, _ = build_datasets(settings)
    given = {}

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        given.update(kwargs)
        raise Stop

    monkeypatch.setattr(deploy, "Trainer", spy)
    model = build_model(settings.model, 2, datasets["train"].feature_shape[-1])
    loaders = build_loaders(settings, datasets, torch.device("cpu"))
    with pytest.raises(Stop):
        deploy.quantise_run(settings, model, datasets, loaders, tmp_path, {})
    torch.testing.assert_close(given["class_weights"], class_weights(datasets["train"]))
