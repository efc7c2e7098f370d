"""The model zoo: every registered model trains, fuses, traces and exports; PANNs checkpoints
load with the official names; ArcFace, freezing and gradient checkpointing do what they say."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from torch import nn

import audioclf.model.base as model_base
from audioclf.cli import run
from audioclf.features import compute_log_mel
from audioclf.model import (
    CheckpointError,
    Model,
    ModelError,
    create_model,
    list_models,
    register_model,
    registry,
)
from audioclf.model.ghost_effv2 import GhostModule
from audioclf.model.heads import ArcFaceHead
from audioclf.model.layers import SqueezeExcite, spatial_mean
from conftest import REPO, TEST_DATA, fsdd_clip, tiny_split_manifest

PANNS = {
    "panns_cnn14": "Cnn14",
    "panns_mobilenetv1": "MobileNetV1",
    "panns_mobilenetv2": "MobileNetV2",
}
FRAMES, MELS = 40, 32


def tiny_params(name: str) -> dict:
    """Small settings: EfficientNetV2 family at quarter width and depth; PANNs as they are."""
    return (
        {"n_mels": MELS} if name.startswith("panns_") else {"width_mult": 0.25, "depth_mult": 0.25}
    )


def tiny_model(name: str, num_classes: int = 3, **params) -> Model:
    torch.manual_seed(0)
    return create_model(name, num_classes, **{**tiny_params(name), **params})


def features(batch: int = 2, frames: int = FRAMES, mels: int = MELS) -> torch.Tensor:
    return torch.randn(batch, 1, frames, mels, generator=torch.Generator().manual_seed(1))


def randomise_batch_norms(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine terms, so fusion has work to do."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_var.copy_(0.75 + 0.5 * torch.rand(size, generator=generator))
                module.weight.copy_(0.75 + 0.5 * torch.rand(size, generator=generator))
                module.bias.copy_(0.1 * torch.randn(size, generator=generator))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_list_models_names_every_architecture():
    assert {
        "efficientnet_v2",
        "ghost_efficientnet_v2",
        "panns_cnn14",
        "panns_mobilenetv1",
        "panns_mobilenetv2",
    } <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_and_backward_give_logits_and_gradients(name):
    model = tiny_model(name).train()
    logits = model(features(), labels=torch.tensor([0, 2]))
    assert logits.shape == (2, 3)
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without_grad == []


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize(("num_classes", "frames"), [(1, 33), (37, 71)])
def test_any_class_count_and_frame_count(name, num_classes, frames):
    model = tiny_model(name, num_classes).eval()
    assert model(features(frames=frames)).shape == (2, num_classes)


@pytest.mark.parametrize("name", list_models())
def test_three_dimensional_input_is_taken_as_one_channel(name):
    model = tiny_model(name).eval()
    x = features()
    torch.testing.assert_close(model(x[:, 0]), model(x))


@pytest.mark.parametrize("mels", [23, 80])
def test_efficientnet_takes_any_number_of_mel_bins(mels):
    model = tiny_model("efficientnet_v2").eval()
    assert model(features(mels=mels)).shape == (2, 3)


def test_input_that_is_not_log_mel_features_names_its_shape():
    model = tiny_model("efficientnet_v2").eval()
    with pytest.raises(ValueError, match=r"not shape \(2, 3, 40, 32\)"):
        model(torch.randn(2, 3, FRAMES, MELS))


def test_panns_input_with_other_mel_bins_than_built_for_is_an_error():
    model = tiny_model("panns_mobilenetv1").eval()
    with pytest.raises(ValueError, match="built for 32 mel bins"):
        model(features(mels=64))


def test_panns_input_shorter_than_its_downsampling_is_an_error():
    model = tiny_model("panns_mobilenetv2").eval()
    with pytest.raises(ValueError, match="at least 32 frames"):
        model(features(frames=20))


@pytest.mark.parametrize("name", list_models())
def test_fused_model_gives_the_same_outputs(name):
    model = tiny_model(name)
    randomise_batch_norms(model)
    model.eval()
    x = features()
    expected = model(x)
    model.fuse_model()
    batch_norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # PANNs' bn0 normalises mel bins before zero padding: it cannot fold into a convolution.
    assert batch_norms == (["bn0"] if name in PANNS else [])
    assert relative_error(model(x), expected) < 1e-5


def test_fusing_in_training_mode_is_refused():
    model = tiny_model("efficientnet_v2").train()
    with pytest.raises(RuntimeError, match="model.eval"):
        model.fuse_model()


# TorchScript is deprecated in favour of torch.export, but phones' PyTorch Mobile still loads it.
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
@pytest.mark.parametrize("name", list_models())
def test_model_traces_and_exports_with_dynamic_batch_and_frames(name):
    model = tiny_model(name).eval()
    x = features(frames=80)
    traced = torch.jit.trace(model, (x,))
    torch.testing.assert_close(traced(x), model(x))
    # From 64 frames up, every architecture's downsampled time axis keeps at least 2 steps, so
    # torch.export need not specialise on a size of 1.
    dynamic = {0: torch.export.Dim("batch", max=1024), 2: torch.export.Dim("frames", min=64)}
    exported = torch.export.export(model, (x,), dynamic_shapes=(dynamic,))
    other = features(batch=3, frames=150)
    torch.testing.assert_close(exported.module()(other), model(other))


def test_spatial_mean_is_the_mean_and_export_captures_it_as_mean():
    x = torch.randn(3, 8, 7, 5, requires_grad=True)
    pooled = spatial_mean(x)
    torch.testing.assert_close(pooled, x.mean((2, 3), keepdim=True))
    torch.testing.assert_close(spatial_mean(x, keepdim=False), x.mean((2, 3)))
    (pooled.square().sum()).backward()
    expected = torch.autograd.grad(x.mean((2, 3), keepdim=True).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
    # Quantizers know mean as an int8 pool; a sum would leave a float op in the int8 graph.
    se = SqueezeExcite(8, 2).eval()
    graph = torch.export.export(se, (x.detach(),)).graph
    targets = {node.target for node in graph.nodes if node.op == "call_function"}
    assert torch.ops.aten.mean.dim in targets
    assert torch.ops.aten.sum.dim_IntList not in targets


# --- ArcFace -------------------------------------------------------------------------------


def test_arcface_margin_lowers_only_the_true_class_logit_in_training():
    torch.manual_seed(0)
    head = ArcFaceHead(16, 4, margin=0.3, scale=10.0).train()
    embedding, labels = torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    plain, with_margin = head(embedding), head(embedding, labels)
    target = F.one_hot(labels, 4).bool()
    cosine = plain[target] / 10.0
    expected = 10.0 * torch.cos(torch.acos(cosine) + 0.3)
    torch.testing.assert_close(with_margin[target], expected)
    assert (with_margin[target] < plain[target]).all()
    torch.testing.assert_close(with_margin[~target], plain[~target])


def test_arcface_returns_scaled_cosines_without_labels_or_in_evaluation():
    torch.manual_seed(0)
    head = ArcFaceHead(16, 4, margin=0.3, scale=10.0)
    embedding, labels = torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    cosines = F.normalize(embedding) @ F.normalize(head.weight).T
    torch.testing.assert_close(head.train()(embedding), 10.0 * cosines)
    torch.testing.assert_close(head.eval()(embedding, labels), 10.0 * cosines)


def test_efficientnet_with_arcface_applies_the_margin_through_forward():
    model = tiny_model("efficientnet_v2", 4, arcface=True, dropout=0.0).train()
    x, labels = features(), torch.tensor([1, 3])
    plain, with_margin = model(x), model(x, labels)
    assert (with_margin.gather(1, labels[:, None]) < plain.gather(1, labels[:, None])).all()
    assert plain.abs().max() <= 30.0  # scaled cosines: |logit| <= arcface_scale


def test_fuse_model_folds_the_arcface_class_centres_and_keeps_the_logits():
    model = tiny_model("efficientnet_v2", 4, arcface=True).eval()
    x = features()
    with torch.no_grad():
        expected = model(x)
        fused = model.fuse_model()
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)
    # One linear layer now: its rows are the unit class centres times arcface_scale.
    norms = fused.classifier.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 30.0))
    fused.fuse_model()  # folding again changes nothing
    torch.testing.assert_close(fused.classifier.weight.norm(dim=1), norms)


# --- Ghost-EfficientNetV2 --------------------------------------------------------------------


@pytest.mark.parametrize("out_channels", [7, 16])
def test_ghost_module_makes_exactly_the_channels_asked_for(out_channels):
    module = GhostModule(8, out_channels, nn.ReLU, ratio=3).eval()
    assert module(torch.randn(1, 8, 5, 5)).shape == (1, out_channels, 5, 5)


def test_ghost_efficientnet_is_smaller_than_efficientnet_of_the_same_size():
    sizes = {
        name: sum(p.numel() for p in create_model(name, 10).parameters())
        for name in ("efficientnet_v2", "ghost_efficientnet_v2")
    }
    assert sizes["ghost_efficientnet_v2"] < 0.8 * sizes["efficientnet_v2"]


# --- PANNs: official names, shapes and forward ---------------------------------------------


@pytest.mark.parametrize(("name", "official"), PANNS.items())
def test_panns_state_dict_names_and_shapes_are_the_official_ones(name, official):
    reference = json.loads((TEST_DATA / "panns_state_dict" / f"{official}.json").read_text())
    expected = {
        key: shape
        for key, shape in reference["state_dict"].items()
        if not key.startswith(("spectrogram_extractor.", "logmel_extractor."))
    }
    model = create_model(name, reference["constructor_args"]["classes_num"])
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == expected
    # The official count without the front end's frozen STFT and mel matrices.
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters_trainable"]


def _bn(x, state, prefix):
    return F.batch_norm(
        x,
        state[f"{prefix}.running_mean"],
        state[f"{prefix}.running_var"],
        state[f"{prefix}.weight"],
        state[f"{prefix}.bias"],
        training=False,
        eps=1e-5,
    )


def _official_head(x, state):
    """PANNs' outputs from the last feature map: mean over mels, max + mean over time, fc1."""
    x = x.mean(dim=3)
    x = x.max(dim=2).values + x.mean(dim=2)
    x = F.relu(F.linear(x, state["fc1.weight"], state["fc1.bias"]))
    scores = torch.sigmoid(F.linear(x, state["fc_audioset.weight"], state["fc_audioset.bias"]))
    return {"clipwise_output": scores, "embedding": x}


def official_cnn14(state, log_mel):
    """CNN14's evaluation forward written from the paper's recipe, on raw state_dict tensors."""
    x = _bn(log_mel.transpose(1, 3), state, "bn0").transpose(1, 3)
    for block in range(1, 7):
        for conv in (1, 2):
            weight = state[f"conv_block{block}.conv{conv}.weight"]
            x = F.relu(_bn(F.conv2d(x, weight, padding=1), state, f"conv_block{block}.bn{conv}"))
        x = F.avg_pool2d(x, 2 if block < 6 else 1)
    return _official_head(x, state)


def official_mobilenet_v1(state, log_mel):
    """MobileNetV1 as PANNs run it: stride-1 convolutions, AvgPool2d(stride) to downsample."""
    strides = [2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    x = _bn(log_mel.transpose(1, 3), state, "bn0").transpose(1, 3)
    for index, stride in enumerate(strides):
        layer = f"features.{index}"
        groups = 1 if index == 0 else x.shape[1]
        x = F.conv2d(x, state[f"{layer}.0.weight"], padding=1, groups=groups)
        x = F.relu(_bn(F.avg_pool2d(x, stride), state, f"{layer}.2"))
        if index > 0:
            x = F.relu(_bn(F.conv2d(x, state[f"{layer}.4.weight"]), state, f"{layer}.5"))
    return _official_head(x, state)


@pytest.fixture(scope="module")
def panns_log_mel() -> torch.Tensor:
    """Log-mel of FSDD speech at 32 kHz with the PANNs preset, as a (1, 1, T, 64) batch.

    Six clips in a row (about 2.5 s): long enough that the time axis keeps several frames after
    the five 2x poolings, so max-over-time and mean-over-time differ."""
    clips = [sf.read(fsdd_clip(digit), dtype="float32") for digit in range(6)]
    waveform = np.concatenate([soxr.resample(wave, rate, 32000) for wave, rate in clips])
    log_mel = compute_log_mel(waveform, 32000, "panns")
    return torch.from_numpy(np.ascontiguousarray(log_mel))[None, None]


@pytest.mark.parametrize(
    ("name", "official_forward"),
    [("panns_cnn14", official_cnn14), ("panns_mobilenetv1", official_mobilenet_v1)],
)
def test_panns_outputs_equal_the_official_forward(name, official_forward, panns_log_mel):
    model = tiny_model(name, 527, n_mels=64)
    randomise_batch_norms(model)
    model.eval()
    with torch.no_grad():
        ours = model.panns_output(panns_log_mel)
        official = official_forward(model.state_dict(), panns_log_mel)
        torch.testing.assert_close(torch.sigmoid(model(panns_log_mel)), ours["clipwise_output"])
    torch.testing.assert_close(
        ours["clipwise_output"], official["clipwise_output"], rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(ours["embedding"], official["embedding"], rtol=1e-5, atol=1e-6)


# --- Pretrained checkpoints ----------------------------------------------------------------


def save_official_style(model: nn.Module, path, with_batch_counters: bool = False):
    """A file shaped like the official PANNs releases: weights under "model", with the
    waveform front end, optionally without `num_batches_tracked`."""
    state = {
        key: value
        for key, value in model.state_dict().items()
        if with_batch_counters or not key.endswith("num_batches_tracked")
    }
    state["spectrogram_extractor.stft.conv_real.weight"] = torch.zeros(9, 1, 16)
    state["logmel_extractor.melW"] = torch.zeros(9, 64)
    torch.save({"model": state}, path)
    return path


@pytest.fixture
def audioset_mobilenet(tmp_path):
    """A randomised 527-class PANNs MobileNetV1 and its official-style checkpoint file."""
    source = tiny_model("panns_mobilenetv1", 527, n_mels=64)
    randomise_batch_norms(source)
    return source.eval(), save_official_style(source, tmp_path / "MobileNetV1_mAP=0.389.pth")


def test_official_checkpoint_loads_with_the_same_outputs(audioset_mobilenet):
    source, path = audioset_mobilenet
    loaded = create_model("panns_mobilenetv1", 527, n_mels=64, pretrained_path=path).eval()
    x = features(mels=64)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_other_class_count_keeps_the_backbone_and_gets_a_new_classifier(audioset_mobilenet):
    source, path = audioset_mobilenet
    loaded = create_model("panns_mobilenetv1", 5, n_mels=64, pretrained_path=path).eval()
    assert loaded.fc_audioset.weight.shape == (5, 1024)
    x = features(mels=64)
    torch.testing.assert_close(loaded.forward_features(x), source.forward_features(x))


def test_checkpoint_with_batch_counters_also_loads(tmp_path):
    source = tiny_model("panns_mobilenetv2", 527, n_mels=64).eval()
    path = save_official_style(source, tmp_path / "v2.pth", with_batch_counters=True)
    loaded = create_model("panns_mobilenetv2", 527, n_mels=64, pretrained_path=path).eval()
    x = features(mels=64)
    torch.testing.assert_close(loaded(x), source(x))


def test_ddp_prefixed_state_dict_loads(tmp_path):
    source = tiny_model("efficientnet_v2").eval()
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    loaded = tiny_model("efficientnet_v2", pretrained_path=path).eval()
    torch.testing.assert_close(loaded(features()), source(features()))


def test_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    path = tmp_path / "effv2.pth"
    torch.save({"model": tiny_model("efficientnet_v2").state_dict()}, path)
    with pytest.raises(CheckpointError) as error:
        tiny_model("panns_mobilenetv1", pretrained_path=path)
    message = str(error.value)
    assert str(path) in message
    assert "missing: bn0.weight" in message
    assert "unexpected: stem.conv.weight" in message


def test_checkpoint_with_other_mel_bins_names_the_differing_shape(audioset_mobilenet):
    _, path = audioset_mobilenet
    with pytest.raises(CheckpointError, match=r"bn0.weight \(64,\) vs model \(32,\)"):
        tiny_model("panns_mobilenetv1", 527, pretrained_path=path)


@pytest.mark.parametrize(
    "content", [b"", b"certainly not a checkpoint", "truncated"], ids=["empty", "junk", "truncated"]
)
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, audioset_mobilenet, content):
    _, good = audioset_mobilenet
    path = tmp_path / "broken.pth"
    data = good.read_bytes()[: good.stat().st_size // 2] if content == "truncated" else content
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"{path}: not a (readable )?PyTorch checkpoint"):
        tiny_model("panns_mobilenetv1", 527, n_mels=64, pretrained_path=path)


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        tiny_model("efficientnet_v2", pretrained_path=tmp_path / "absent.pth")


def test_a_folder_given_as_a_checkpoint_names_the_checkpoints_below_it(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for name in ("last.pth", "best.pth"):
        (tmp_path / "run" / "checkpoints" / name).write_bytes(b"")
    with pytest.raises(
        CheckpointError,
        match=rf"run: a folder, not a checkpoint file; the checkpoints below it include "
        rf"{tmp_path}/run/checkpoints/best.pth, {tmp_path}/run/checkpoints/last.pth$",
    ):
        tiny_model("efficientnet_v2", pretrained_path=tmp_path / "run")


# --- Fine-tuning switches ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "classifier"),
    [("panns_mobilenetv1", "fc_audioset"), ("efficientnet_v2", "classifier.fc")],
)
def test_frozen_backbone_trains_only_the_classifier(name, classifier):
    model = tiny_model(name, freeze_backbone=True).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{classifier}.weight", f"{classifier}.bias"}
    statistics = {n: b.clone() for n, b in model.named_buffers() if "running_mean" in n}
    model(features()).sum().backward()
    for buffer_name, before in statistics.items():
        torch.testing.assert_close(model.get_buffer(buffer_name), before)


@pytest.mark.parametrize("name", ["efficientnet_v2", "panns_mobilenetv2"])
def test_gradient_checkpointing_recomputes_blocks_and_keeps_gradients(name, monkeypatch):
    plain = tiny_model(name, dropout=0.0).train()
    checkpointed = tiny_model(name, dropout=0.0, gradient_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    calls = []
    original = model_base.checkpoint
    monkeypatch.setattr(
        model_base, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    x = features()
    for model in (plain, checkpointed):
        model(x).square().sum().backward()
    assert calls
    for (name_, p), (_, q) in zip(
        plain.named_parameters(), checkpointed.named_parameters(), strict=True
    ):
        torch.testing.assert_close(q.grad, p.grad, msg=name_)


# --- Registry ------------------------------------------------------------------------------


def test_registering_a_taken_name_raises():
    with pytest.raises(ValueError, match="registered twice"):
        register_model("efficientnet_v2")(Model)


def test_unknown_model_name_lists_the_registered_ones():
    with pytest.raises(ModelError, match="unknown model 'effnet'.*panns_cnn14"):
        create_model("effnet", 3)


@pytest.mark.parametrize(
    ("name", "param", "hint"),
    [
        ("efficientnet_v2", "widht_mult", "; did you mean 'width_mult'?"),
        ("panns_cnn14", "pretrained_pth", "; did you mean 'pretrained_path'?"),
        ("panns_cnn14", "arcface", ""),
    ],
)
def test_unknown_model_parameter_is_named_with_the_close_one(name, param, hint):
    # It was Python's "__init__() got an unexpected keyword argument".
    with pytest.raises(ModelError) as raised:
        create_model(name, 3, **{param: 1})
    message = str(raised.value)
    assert message.startswith(f"model {name!r} has no parameter {param!r}{hint} (its parameters: ")
    assert "dropout" in message
    assert "freeze_backbone)" in message


def test_a_builders_own_keyword_error_is_not_blamed_on_the_callers_parameters(monkeypatch):
    def broken(num_classes: int, width: int = 8) -> Model:
        return torch.nn.Linear(width, num_classes, bias_init=0)  # a bug inside the builder

    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))  # unregistered after
    register_model("broken_for_test")(broken)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bias_init'"):
        create_model("broken_for_test", 3, width=4)


def test_the_readmes_example_model_trains_in_the_main_job_and_fuses(
    compose_config, tmp_path, monkeypatch
):
    """README, "Adding a model": its code and yaml, as printed, give a model that registers,
    runs the main job, learns, and fuses to the same outputs."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Adding a model") : readme.index("## Training and eval")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model_yaml = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))  # unregistered after
    exec(compile(code, "README.md: my_net.py", "exec"), {"__name__": "my_net"})  # noqa: S102
    config = compose_config(
        *tiny_split_manifest(tmp_path), "run.train=true", "run.test=true", "training.epochs=3"
    )
    with open_dict(config):
        config.model = OmegaConf.create(model_yaml)
    summary = run(config)
    assert summary["model"]["name"] == "my_net"
    history = summary["training"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    model = create_model("my_net", 2, **OmegaConf.to_container(config.model.params))
    model.eval()
    inputs = torch.randn(3, 1, FRAMES, MELS)
    with torch.no_grad():
        expected = model(inputs)
        model.fuse_model()
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert torch.allclose(model(inputs), expected, atol=1e-5)
