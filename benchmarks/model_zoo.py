"""Size and CPU speed of every model in the zoo, unfused and fused.

    python benchmarks/model_zoo.py

Input: 1 s of 16 kHz audio as the default `librosa` preset frames it (101 frames x 64 mel
bins), 10 classes. MACs come from torch.utils.flop_counter (multiply-accumulates of
convolutions and matrix products, FLOPs / 2). Latency is the median of repeated batch-1 calls
in eval mode under torch.inference_mode, after warm-up, with torch's default thread count, best
of three rounds; throughput is clips per second at batch 32, measured the same way. Writes
benchmarks/results/model_zoo.json and the table in README.md.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from audioclf.features import num_frames, resolve_params
from audioclf.model import Model, create_model
from machine import machine
from readme_table import write_table

RESULTS = Path(__file__).resolve().parent / "results" / "model_zoo.json"
SAMPLE_RATE = 16000
NUM_CLASSES = 10
ROUNDS = 3
# (label, registered name, params). `efficientnet_v2` is `efficientnet_v2_mobile` by default;
# the Ghost rows sit next to the EfficientNetV2 rows of the same size, width and depth.
MODELS = [
    ("efficientnet_v2_mobile", "efficientnet_v2_mobile", {}),
    ("ghost_efficientnet_v2 (mobile)", "ghost_efficientnet_v2", {"size": "mobile"}),
    ("efficientnet_v2 (b0)", "efficientnet_v2", {"size": "b0"}),
    ("ghost_efficientnet_v2 (b0)", "ghost_efficientnet_v2", {"size": "b0"}),
    ("efficientnet_v2_s", "efficientnet_v2_s", {}),
    ("ghost_efficientnet_v2 (s)", "ghost_efficientnet_v2", {"size": "s"}),
    ("panns_cnn14", "panns_cnn14", {"n_mels": 64}),
    ("panns_mobilenetv1", "panns_mobilenetv1", {"n_mels": 64}),
    ("panns_mobilenetv2", "panns_mobilenetv2", {"n_mels": 64}),
]


def seconds_per_call(model: Model, x: torch.Tensor, min_calls: int, min_seconds: float) -> float:
    """Median seconds of model(x) over at least `min_calls` calls and `min_seconds`."""
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < min_calls or time.perf_counter() - started < min_seconds:
            call_started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - call_started)
    return statistics.median(times)


def measure(name: str, params: dict, frames: int, mels: int) -> dict:
    """Parameters, MACs, latency and throughput of one model, unfused and fused."""
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, **params).eval()
    fused = copy.deepcopy(model).fuse_model()
    single = torch.randn(1, 1, frames, mels)
    batch = torch.randn(32, 1, frames, mels)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(single)
    result = {
        "model": name,
        "params": sum(parameter.numel() for parameter in model.parameters()),
        "macs": counter.get_total_flops() // 2,
    }
    # Unfused and fused take turns, ROUNDS times; each keeps its best median, so a burst of
    # noise on the shared machine does not land on one side only.
    latency = {"": float("inf"), "_fused": float("inf")}
    per_batch = dict(latency)
    for _ in range(ROUNDS):
        for suffix, variant in (("", model), ("_fused", fused)):
            latency[suffix] = min(
                latency[suffix], seconds_per_call(variant, single, min_calls=20, min_seconds=1.0)
            )
            per_batch[suffix] = min(
                per_batch[suffix], seconds_per_call(variant, batch, min_calls=3, min_seconds=1.5)
            )
    for suffix in latency:
        result[f"latency_ms_b1{suffix}"] = round(latency[suffix] * 1000, 2)
        result[f"clips_per_s_b32{suffix}"] = round(32 / per_batch[suffix], 1)
    return result


def main() -> None:
    features = resolve_params("librosa", SAMPLE_RATE)
    frames, mels = num_frames(SAMPLE_RATE, features), features.n_mels
    rows = []
    for label, name, params in MODELS:
        row = {"label": label, **measure(name, params, frames, mels), "model_params": params}
        print(json.dumps(row))
        rows.append(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    meta = {
        "input": f"(1, 1, {frames}, {mels}): 1 s at {SAMPLE_RATE} Hz, librosa preset",
        **machine(),
    }
    (RESULTS.parent / "model_zoo_machine.json").write_text(json.dumps(meta, indent=1) + "\n")
    write_table("model_zoo", table(rows))


def table(rows: list[dict]) -> list[str]:
    """README rows: one per model."""
    lines = [
        "| model | params | MMACs | ms, batch 1 | ms, batch 1, fused | clips/s, batch 32 "
        "| clips/s, batch 32, fused |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['params'] / 1e6:.2f}M | {row['macs'] / 1e6:,.0f} "
            f"| {row['latency_ms_b1']:.2f} | {row['latency_ms_b1_fused']:.2f} "
            f"| {row['clips_per_s_b32']:,.0f} | {row['clips_per_s_b32_fused']:,.0f} |"
        )
    return lines


if __name__ == "__main__":
    main()
