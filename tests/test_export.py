"""Exports: ONNX and TorchScript with their checks against PyTorch, sidecars, corrupted exports
caught, and the main job exporting after training and from a checkpoint alone."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from audioclf.cli import run
from audioclf.export import ExportError, check_export, export_model, inference_model, load_runner
from audioclf.features import compute_log_mel, resolve_params
from audioclf.model import create_model
from audioclf.normalization import FeatureNormalization
from conftest import fsdd_clip, tiny_split_manifest

PARAMS = resolve_params("librosa", 8000)


@pytest.fixture(scope="module")
def clips_features() -> np.ndarray:
    """Log-mel of six real FSDD clips, (6, 1, 51, 64), as compute_log_mel returns them."""
    from audioclf.audio import fix_length, load_audio

    features = [
        compute_log_mel(fix_length(load_audio(fsdd_clip(d), 8000), 4000), 8000, "librosa")
        for d in range(6)
    ]
    return np.stack(features)[:, np.newaxis].astype(np.float32)


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    model = create_model("efficientnet_v2", 6, width_mult=0.25, depth_mult=0.25)
    # Non-trivial BatchNorm statistics, so that folding them is exercised.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def normalization(clips_features) -> FeatureNormalization:
    return FeatureNormalization.fit(clips_features[:, 0])


def _export(tmp_path, model, features, normalization, formats=("onnx", "torchscript")):
    return export_model(
        model,
        formats,
        tmp_path / "export",
        classes=[str(d) for d in range(6)],
        feature_params=PARAMS,
        clip_seconds=0.5,
        normalization=normalization,
        check_features=features,
        model_name="efficientnet_v2",
    )


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_agrees_with_pytorch_and_passes_its_check(
    tmp_path, small_model, clips_features, normalization, fmt
):
    (check,) = _export(tmp_path, small_model, clips_features, normalization, [fmt])
    assert check.passed
    assert check.max_abs_diff <= 1e-4
    assert check.top1_agreement == 1.0
    # The file runs on its own, at batch 1 too, and equals the unfused model behind the
    # normalisation.
    runner = load_runner(check.path)
    expected = small_model(
        torch.from_numpy((clips_features[:1] - normalization.mean) / normalization.std)
    )
    np.testing.assert_allclose(runner(clips_features[:1]), expected.detach().numpy(), atol=1e-4)


def test_sidecar_says_how_to_build_the_input(tmp_path, small_model, clips_features, normalization):
    _export(tmp_path, small_model, clips_features, normalization, ["onnx"])
    info = json.loads((tmp_path / "export" / "model.onnx.json").read_text())
    assert info["classes"] == [str(d) for d in range(6)]
    assert (info["sample_rate"], info["clip_seconds"], info["clip_samples"]) == (8000, 0.5, 4000)
    assert info["features"] == PARAMS.as_dict()
    assert info["normalization"]["inside_model"] is True
    np.testing.assert_allclose(info["normalization"]["mean"], normalization.mean, rtol=1e-6)
    assert info["input"]["name"] == "log_mel"
    assert info["input"]["shape"] == ["batch", 1, 51, 64]
    assert info["output"]["shape"] == ["batch", 6]
    report = json.loads((tmp_path / "export" / "export_report.json").read_text())
    assert report[0]["passed"] is True


def test_a_corrupted_onnx_export_fails_its_check(tmp_path, small_model, clips_features):
    (check,) = _export(tmp_path, small_model, clips_features, None, ["onnx"])
    graph = onnx.load(check.path)
    first = max(graph.graph.initializer, key=lambda tensor: np.prod(tensor.dims))
    weights = numpy_helper.to_array(first).copy()
    weights *= 1.01
    first.CopyFrom(numpy_helper.from_array(weights, first.name))
    onnx.save(graph, check.path)
    reference = inference_model(small_model, None)
    failed = check_export("onnx", check.path, reference, clips_features)
    assert not failed.passed
    assert "max |delta logit|" in failed.failure


def test_a_failed_int8_check_tells_rounding_from_a_converter_fault(tmp_path, monkeypatch):
    # int8 PyTorch's logits on a grid of 0.1 (the output step) with top-1 margins of 2 steps.
    from audioclf.export import checks

    logits = np.zeros((100, 3), np.float32)
    logits[:, 0], logits[:, 1] = 0.5, 0.3
    rounded = logits.copy()
    rounded[:20, 1] += 0.3  # 20 near-ties flipped by 3 steps of rounding
    fault = logits + np.random.default_rng(0).normal(0, 3.0, logits.shape).astype(np.float32)
    for exported, expected in [
        (rounded, "median |dlogit| 0.0 output steps, int8 PyTorch's median top-1 margin 2.0"),
        (fault, "median |dlogit| 20.9 output steps, int8 PyTorch's median top-1 margin 2.0"),
    ]:
        monkeypatch.setattr(checks, "load_runner", lambda path, out=exported: lambda batch: out)
        check = check_export(
            "tflite",
            tmp_path / "m.tflite",
            torch.nn.Identity(),
            logits,
            int8=True,
            batch_size=100,
            output_step=0.1,
        )
        assert check.failure.startswith("top-1 agreement with int8 PyTorch")
        assert expected in check.failure
    monkeypatch.setattr(checks, "load_runner", lambda path: lambda batch: rounded)
    check = check_export(
        "onnx", tmp_path / "m.onnx", torch.nn.Identity(), logits, int8=True, batch_size=100
    )
    assert "(median |dlogit| 0, int8 PyTorch's median top-1 margin 0.2)" in check.failure


def test_an_int8_accuracy_loss_says_whether_quantising_or_the_conversion_lost_it(
    tmp_path, monkeypatch
):
    # The float model was right on all 100 clips; int8 PyTorch on 98 of them.
    from audioclf.export import checks

    labels = np.zeros(100, np.int64)
    int8_logits = np.tile(np.array([[1.0, 0.0]], np.float32), (100, 1))
    int8_logits[:2] = [0.0, 1.0]
    arguments = ("tflite", tmp_path / "m.tflite", torch.nn.Identity(), int8_logits)
    options = {"int8": True, "batch_size": 100, "labels": labels, "float_accuracy": 1.0}
    monkeypatch.setattr(checks, "load_runner", lambda path: lambda batch: int8_logits)
    same = check_export(*arguments, **options)
    assert same.top1_agreement == 1.0
    assert same.failure == (
        "test accuracy 98.00% is more than 0.5 points below the float model's 100.00% "
        "(int8 PyTorch: 98.00%, so quantising lost it, not the conversion: more QAT "
        "fine-tuning, model.quantization.epochs, or QAT instead of PTQ may win it back)"
    )
    worse = int8_logits.copy()
    worse[2] = [0.0, 1.0]  # the file flips one more clip: 99% agreement still passes
    monkeypatch.setattr(checks, "load_runner", lambda path: lambda batch: worse)
    lost = check_export(*arguments, **options)
    assert lost.top1_agreement == 0.99
    assert lost.failure.endswith("(int8 PyTorch: 98.00%: the conversion lost the rest)")
    # Within 0.5 points of the float model it passes.
    monkeypatch.setattr(checks, "load_runner", lambda path: lambda batch: int8_logits)
    assert check_export(*arguments, **{**options, "float_accuracy": 0.984}).passed


def test_a_multi_label_export_is_checked_on_its_predicted_labels(tmp_path, monkeypatch):
    # A label that crosses the threshold (logit 0) leaves the top label where it was.
    from audioclf.export import checks

    logits = np.tile(np.array([[2.0, 0.05, -1.0]], np.float32), (100, 1))
    crossed = logits.copy()
    crossed[:5, 1] = -0.05  # 5 clips lose their second label; the top one stays
    monkeypatch.setattr(checks, "load_runner", lambda path: lambda batch: crossed)
    arguments = ("onnx", tmp_path / "m.onnx", torch.nn.Identity(), logits)
    int8 = check_export(*arguments, int8=True, batch_size=100, multi_label=True)
    assert int8.top1_agreement == 1.0
    assert int8.label_set_agreement == 0.95
    assert int8.failure.startswith("label-set agreement (logit >= 0) with int8 PyTorch 95.00%")
    # A multi-class model of the same logits predicts its top class only: it passes.
    assert check_export(*arguments, int8=True, batch_size=100).passed
    monkeypatch.setattr(checks, "load_runner", lambda path: lambda batch: logits + 1e-6)
    floating = check_export(*arguments, batch_size=100, multi_label=True)
    assert floating.passed
    assert floating.label_set_agreement == 1.0


def test_a_failed_check_raises_naming_the_format_and_check(
    tmp_path, small_model, clips_features, monkeypatch
):
    import audioclf.export as export

    def corrupt_torchscript(module, example, path):
        # A copy: the traced module shares its tensors with the one it traced.
        traced = torch.jit.trace(copy.deepcopy(module), (example,), check_trace=False)
        with torch.no_grad():
            next(traced.parameters()).mul_(3.0)
        traced.save(str(path))
        return path

    monkeypatch.setitem(export.EXPORTERS, "torchscript", corrupt_torchscript)
    with pytest.raises(ExportError, match=r"torchscript .*model.pt\): max \|delta logit\|"):
        _export(tmp_path, small_model, clips_features, None, ["torchscript"])
    assert (tmp_path / "export" / "export_report.json").exists()


def test_unknown_format_is_named(tmp_path, small_model, clips_features):
    with pytest.raises(ExportError, match=r"unknown export format\(s\) \['coreml'\]"):
        _export(tmp_path, small_model, clips_features, None, ["coreml"])


def test_main_job_exports_after_training_and_from_a_checkpoint_alone(compose_config, tmp_path):
    summary = run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "run.train=true",
            "training.epochs=1",
            "run.export=true",
            "run.export_formats=[onnx,torchscript]",
        )
    )
    # Both inputs by default: log-mel and raw audio.
    assert [(check["format"], check["input"]) for check in summary["export"]] == [
        ("onnx", "log_mel"),
        ("onnx", "waveform"),
        ("torchscript", "log_mel"),
        ("torchscript", "waveform"),
    ]
    assert all(check["passed"] for check in summary["export"])
    for name in ("model.onnx", "model.pt", "model_waveform.onnx", "model_waveform.pt"):
        assert (tmp_path / "outputs" / "export" / name).exists()
        assert (tmp_path / "outputs" / "export" / f"{name}.json").exists()
    best = tmp_path / "best.pth"
    shutil.copy(tmp_path / "outputs" / "checkpoints" / "best.pth", best)
    again = run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "run.export=true",
            "run.export_formats=[onnx]",
            "run.export_inputs=[log_mel]",
            f"run.checkpoint_path={best}",
            f"system.output_dir={tmp_path / 'again'}",
        )
    )
    assert [check["passed"] for check in again["export"]] == [True]
    info = json.loads((tmp_path / "again" / "export" / "model.onnx.json").read_text())
    assert info["normalization"]["inside_model"] is True
    assert info["classes"] == ["1", "2"]


def test_an_int8_onnx_file_runs_without_onnxruntimes_saturating_int8_products(tmp_path):
    # One int8 convolution whose products are large: onnxruntime's default session turns its
    # int8 input into uint8 for u8 x s8 kernels, which on x86 CPUs without VNNI add pairs of
    # products in int16 and saturate (this gave 18,000 instead of 2.32 million on an AVX2
    # EPYC). The runner (checks, predict) computes what the file says, as the reference
    # QDQ semantics (no graph optimisation) does.
    import onnxruntime
    from onnx import TensorProto, helper

    channels, out_scale = 16, 20000.0
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "one", "zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["y", "y_scale", "zero"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "zero"], ["logits"]),
    ]
    constants = {
        "one": np.array(1.0, np.float32),
        "zero": np.array(0, np.int8),
        "w": np.full((4, channels, 3, 3), 127, np.int8),
        "w_scale": np.ones(4, np.float32),
        "w_zero": np.zeros(4, np.int8),
        "y_scale": np.array(out_scale, np.float32),
    }
    graph = helper.make_graph(
        nodes,
        "int8_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    path = tmp_path / "int8_conv.onnx"
    onnx.save(model, path)
    x = np.full((1, channels, 6, 6), 127, np.float32)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = onnxruntime.InferenceSession(str(path), options).run(None, {"x": x})[0]
    assert reference[0, 0, 2, 2] == round(127 * 127 * 9 * channels / out_scale) * out_scale
    np.testing.assert_array_equal(load_runner(path)(x), reference)
