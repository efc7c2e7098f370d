"""What a benchmark ran on: its figures move with the CPU model, not only with its core count
(sessions have landed on an AMD EPYC with AVX512-BF16, an Intel Xeon with AVX512 but no bf16,
and an AMD EPYC Milan with AVX2 only)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from audioclf.runtime import cpu_has_native_bf16


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it, with its family and model numbers (a
    virtual machine's name can be as bare as "Intel(R) Xeon(R) Processor"; family 6 model
    106 says Ice Lake), else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    family, model = fields.get("cpu family"), fields.get("model")
    return f"{fields.get('model name')} (family {family}, model {model})"


def machine() -> dict:
    """The machine's description for a results file."""
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
