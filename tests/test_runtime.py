"""Devices and torchrun processes; mixed precision: the `auto` rule, and strided grouped
convolutions kept in float32."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from audioclf import runtime
from audioclf.cli import run
from audioclf.model import create_model
from audioclf.runtime import autocast_dtype, keep_strided_grouped_convs_fp32, resolve_device
from audioclf.schedules import make_optimizer
from audioclf.settings import ConfigError
from conftest import torchrun

CPU = torch.device("cpu")


class Block(nn.Module):
    """A full conv, a stride-2 depthwise conv and a stride-1 depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.full = nn.Conv2d(1, 8, 3, padding=1)
        self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(self.strided(self.full(x)))


def _dtypes(model: nn.Module, x: torch.Tensor) -> dict[str, torch.dtype]:
    seen = {}
    for name, module in model.named_children():
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    return seen


@pytest.mark.parametrize(
    ("amp", "device", "native", "expected"),
    [
        ("auto", "cpu", True, torch.bfloat16),
        ("auto", "cpu", False, None),
        (True, "cpu", False, torch.bfloat16),
        (False, "cpu", True, None),
        ("auto", "cuda", False, torch.float16),
        ("auto", "mps", True, None),
    ],
)
def test_autocast_dtype(monkeypatch, amp, device, native, expected):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert autocast_dtype(amp, torch.device(device)) == expected


def test_cuda_bf16_where_asked():
    assert autocast_dtype(True, torch.device("cuda"), "bfloat16") == torch.bfloat16


def test_only_strided_grouped_convs_run_in_float32_under_cpu_autocast():
    torch.manual_seed(0)
    model, x = Block(), torch.randn(2, 1, 16, 16)
    assert _dtypes(copy.deepcopy(model), x) == dict.fromkeys(
        ("full", "strided", "depthwise"), torch.bfloat16
    )
    keys = list(model.state_dict())
    assert keep_strided_grouped_convs_fp32(model) == 1
    assert keep_strided_grouped_convs_fp32(model) == 1  # twice: no second wrapper
    assert _dtypes(model, x) == {
        "full": torch.bfloat16,
        "strided": torch.float32,
        "depthwise": torch.bfloat16,
    }
    assert model.strided.weight.grad is not None
    assert list(model.state_dict()) == keys


def test_kept_convs_are_unchanged_outside_autocast_and_survive_copies_and_tracing():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 1, 16, 16)
    expected = model(x)
    keep_strided_grouped_convs_fp32(model)
    assert torch.equal(model(x), expected)
    clone = copy.deepcopy(model)
    assert clone.strided.forward.__self__ is clone.strided
    assert torch.equal(clone(x), expected)
    traced = torch.jit.trace(model, (x,))
    assert torch.equal(traced(x), expected)


def test_the_default_model_keeps_its_two_strided_depthwise_convs():
    model = create_model("efficientnet_v2", 10)
    strided = [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.stride[0] > 1
    ]
    assert keep_strided_grouped_convs_fp32(model) == len(strided) == 2


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizers_are_fused_on_the_cpu_and_step_like_the_loop_kernels(name):
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    reference = copy.deepcopy(model)
    fused = make_optimizer(model.parameters(), name, 1e-2, 0.01)
    assert fused.defaults["fused"] is True
    options = {"lr": 1e-2, "weight_decay": 0.01, "foreach": False}
    if name == "adamw":
        loop = torch.optim.AdamW(reference.parameters(), **options)
    else:
        loop = torch.optim.SGD(reference.parameters(), momentum=0.9, nesterov=True, **options)
    x = torch.randn(16, 8)
    for _ in range(3):
        for net, optimizer in ((model, fused), (reference, loop)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- devices


def test_auto_and_cpu_resolve_on_this_machine():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_device_this_machine_lacks_names_the_key(device):
    with pytest.raises(ConfigError, match=rf"system.device={device}: no CUDA device here"):
        resolve_device(device)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_on_a_machine_without_it_names_the_key():
    with pytest.raises(ConfigError, match="system.device=mps: MPS is not available"):
        resolve_device("mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_main_job_on_a_missing_device_stops_before_reading_data(compose_config, tmp_path):
    # data.root does not exist: the device error must come first.
    with pytest.raises(ConfigError, match="system.device=cuda"):
        run(compose_config("system.device=cuda", f"data.root={tmp_path / 'nowhere'}"))


def test_ranks_wait_for_rank_zeros_own_work_past_the_groups_timeout(tmp_path):
    # Rank 0 fills the feature cache before the others read it, and quantises and exports
    # alone after training. The others waited for it in the default group, gave up after its
    # timeout (30 minutes; 3 s here), and torchrun then stopped rank 0 in the middle of it.
    script = tmp_path / "slow_rank_zero.py"
    script.write_text(
        "import functools, time\n"
        "from datetime import timedelta\n"
        "import torch.distributed as dist\n"
        "dist.init_process_group = functools.partial(\n"
        "    dist.init_process_group, timeout=timedelta(seconds=3)\n"
        ")\n"
        "from audioclf.runtime import process_group, rank_zero_first\n"
        "with process_group('cpu'):\n"
        "    rank = dist.get_rank()\n"
        "    with rank_zero_first():  # as rank 0 fills the feature cache\n"
        "        if rank == 0:\n"
        "            time.sleep(5)\n"
        "    if rank == 0:  # as rank 0 exports\n"
        "        time.sleep(5)\n"
        "print(f'rank {rank} finished', flush=True)\n"
    )
    output = torchrun([str(script)], tmp_path, timeout=120)
    assert "rank 0 finished" in output
    assert "rank 1 finished" in output
