"""Where and how a training step runs: device, processes, compiler and mixed precision.

Mixed precision, as measured on a 2-core AVX512-BF16 CPU (benchmarks/train_speed.py): bf16
autocast speeds every model of the zoo up on top of channels_last (PANNs CNN14 about 2x, the
MobileNets about 1.5x, EfficientNetV2 about 1.3x), except for one kernel. oneDNN computes the
input gradient of a strided grouped (depthwise) convolution in bf16 with a generic strided
kernel: 27 ms against 0.1-0.5 ms in float32 for EfficientNetV2's 480-channel stride-2
depthwise convolution, which made the whole step slower than float32.
`keep_strided_grouped_convs_fp32` runs those few layers in float32 under CPU autocast, and the
rest stays bf16.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator
from datetime import timedelta
from types import MethodType
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from audioclf.settings import ConfigError

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when there is one, else the CPU. A device this machine lacks is a
    ConfigError naming `system.device`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"system.device={device}: no CUDA device here; use auto or cpu")
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"system.device={device}: this machine has {count} CUDA device(s)")
        if dist.is_initialized():
            return torch.device("cuda", torch.cuda.current_device())
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"system.device={device}: MPS is not available here; use auto or cpu")
    return resolved


def is_main_process() -> bool:
    """Rank 0 of a distributed run, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def set_log_level(level: str) -> None:
    """`level` for the root logger in the main process; WARNING in the other DDP ranks, so
    that each line is logged once."""
    logging.getLogger().setLevel(level if is_main_process() else "WARNING")


def has_compiler() -> bool:
    """Whether torch.compile's CPU backend finds a C++ compiler."""
    return any(shutil.which(name) for name in ("c++", "g++", "clang++", "cl"))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is
    emulated and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def int8_products_saturate() -> bool:
    """Whether onnxruntime's default int8 kernels can saturate on this CPU: x86 with AVX2 or
    AVX512 but no VNNI, where its u8 x s8 kernels add pairs of products in int16
    (VPMADDUBSW)."""
    return (
        getattr(torch.cpu, "_is_avx2_supported", lambda: False)()
        and not getattr(torch.cpu, "_is_vnni_supported", lambda: True)()
    )


def autocast_dtype(
    amp: bool | Literal["auto"], device: torch.device, amp_dtype: str = "float16"
) -> torch.dtype | None:
    """The autocast dtype of a run on `device`, or None for float32.

    `amp=True` is fp16 on CUDA (bf16 where `amp_dtype` says so) and bf16 on the CPU. `auto` is
    on for CUDA, and on the CPU where it computes bf16 in hardware; it stays off elsewhere
    (MPS, emulated bf16), where nothing was measured.
    """
    if amp == "auto":
        amp = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    if not amp:
        return None
    if device.type == "cpu" or amp_dtype == "bfloat16":
        return torch.bfloat16
    return torch.float16


def _float32_under_cpu_autocast(self: nn.Conv2d, features: torch.Tensor) -> torch.Tensor:
    forward = type(self).forward
    if features.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return forward(self, features)
    with torch.autocast("cpu", enabled=False):
        return forward(self, features.float())


def keep_strided_grouped_convs_fp32(model: nn.Module) -> int:
    """Make every strided grouped Conv2d of `model` run in float32 under CPU autocast (see the
    module docstring); return how many. Outside CPU autocast they run as before, and the
    state_dict does not change."""
    kept = 0
    for module in model.modules():
        if (
            isinstance(module, nn.Conv2d)
            and module.groups > 1
            and any(stride > 1 for stride in module.stride)
        ):
            if "forward" not in module.__dict__:
                module.forward = MethodType(_float32_under_cpu_autocast, module)
            kept += 1
    return kept


class StepModel:
    """What a training step calls: the model, compiled (torch.compile) when asked, and
    wrapped in DistributedDataParallel under torchrun once `distribute` is called. Without a
    C++ compiler, or when compiling fails, it runs eagerly, with one warning. The labels go
    to a forward with a `labels` parameter (the zoo's, for ArcFace heads); any other module
    gets the features alone."""

    def __init__(self, model: nn.Module, device: torch.device, compile: bool) -> None:
        self.takes_labels = "labels" in inspect.signature(model.forward).parameters
        self.device = device
        self.eager = model
        self.compiled: nn.Module | None = None
        if compile and has_compiler():
            self.compiled = torch.compile(self.eager)
        elif compile:
            log.warning("training.compile: no C++ compiler found; training runs eagerly")

    def distribute(self) -> None:
        """Under torchrun, wrap the model in DistributedDataParallel, whose construction every
        rank must join: training calls it, on every rank. Evaluating never does, so one rank
        may evaluate alone (rank 0 tests the int8 model while the others wait)."""
        if not dist.is_initialized() or isinstance(self.eager, nn.parallel.DistributedDataParallel):
            return
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.eager = nn.parallel.DistributedDataParallel(self.eager, device_ids=ids)
        if self.compiled is not None:
            self.compiled = torch.compile(self.eager)

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Around a forward and backward: under DDP, without `sync` the gradients stay in
        this process (`no_sync`: a batch of an accumulation that does not step yet)."""
        if sync or not isinstance(self.eager, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.eager.no_sync()

    def __call__(self, features: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        inputs = (features, labels) if self.takes_labels else (features,)
        if self.compiled is None:
            return self.eager(*inputs)
        try:
            return self.compiled(*inputs)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
            log.warning(
                "training.compile: torch.compile failed (%s: %s); training runs eagerly",
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
            self.compiled = None
            return self.eager(*inputs)


#: How long a rank waits for work rank 0 does alone (filling the feature cache, quantising,
#: testing and exporting): as long as that takes.
RANK_ZERO_WAIT = timedelta(days=7)
_rank_zero_waits: dist.ProcessGroup | None = None  # the group those waits use


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """Under torchrun (WORLD_SIZE > 1): a process group for DDP, gloo on the CPU and nccl on
    CUDA, torn down after a barrier; otherwise nothing."""
    global _rank_zero_waits
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    nccl = torch.cuda.is_available() and device != "cpu"
    dist.init_process_group("nccl" if nccl else "gloo")
    if nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _rank_zero_waits = dist.new_group(backend="gloo", timeout=RANK_ZERO_WAIT)
    yield
    # Without this barrier, gloo aborted at exit in about 1 run in 4 ("terminate called
    # without an active exception"): a rank tore down while another still talked to it.
    wait_for_rank_zero()
    _rank_zero_waits = None
    dist.destroy_process_group()


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `docker stop`, a scheduler's preemption, torchrun stopping its workers),
    raised where Ctrl-C raises KeyboardInterrupt, so that the job stops the same way."""


_sigterm_received = False


def sigterm_received() -> bool:
    """Whether SIGTERM arrived in `sigterm_stops_like_ctrl_c`. Python drops an exception that
    a signal handler raises inside a weakref callback or `__del__` ("Exception ignored in"):
    the job then failed at its next step (loader workers that SIGTERM had ended), and that
    error is reported as the SIGTERM it follows from."""
    return _sigterm_received


@contextlib.contextmanager
def sigterm_stops_like_ctrl_c() -> Iterator[None]:
    """SIGTERM raises Terminated in the block: checkpoint writes finish first, and the job ends
    with its resume hint (by default SIGTERM ended the process at once, without a word).
    Off the main thread nothing changes (Python handles signals in the main thread only)."""
    global _sigterm_received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _sigterm_received = False

    def terminate(signum: int, frame: object) -> None:
        global _sigterm_received
        _sigterm_received = True
        raise Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_rank_zero() -> None:
    """Under torchrun, a barrier after work rank 0 did alone, however long it took. In the
    default group the other ranks gave up after its timeout (30 minutes on gloo), and
    torchrun then stopped rank 0 in the middle of that work."""
    if dist.is_initialized():
        dist.barrier(group=_rank_zero_waits)


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks after it (a shared cache is then filled
    once); without a process group, just the block."""
    if not dist.is_initialized():
        yield
        return
    if dist.get_rank() != 0:
        wait_for_rank_zero()
    yield
    if dist.get_rank() == 0:
        wait_for_rank_zero()


def shared_output_dir(path: str) -> str:
    """Rank 0's output folder for every rank (each torchrun process has its own Hydra run
    folder for its log; checkpoints, events and metrics go to rank 0's)."""
    if not dist.is_initialized():
        return path
    shared = [path]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


@contextlib.contextmanager
def quiet_pytree_warnings() -> Iterator[None]:
    """Without the FutureWarning torch's pytree gives for each tree spec a graph copy or an
    export copies (`isinstance(treespec, LeafSpec)` is deprecated): dozens a conversion, which
    reached users' consoles and warning capture (pytest's, a notebook's)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        yield
