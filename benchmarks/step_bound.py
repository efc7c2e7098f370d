"""How far the default model's training step could go on this CPU: a bound from its FLOPs.

    python benchmarks/step_bound.py [--model NAME] [--output FILE]

The training-speed target asks the default configuration for 2x the plain fp32 eager step.
This measures what stands between the default step and that target, on the machine it runs on:

- the step's convolution FLOPs: the forward's, counted per convolution from its output shape,
  and the backward's as twice those (input and weight gradients) less the input gradient the
  first convolution does not compute (torch's FlopCounterMode agrees on CNN14, whose
  convolutions are dense, but counts EfficientNetV2's grouped backward 6x higher: 48 GFLOP);
- the CPU's float32 GEMM rate: a 2048^3 matmul, the best of five in each round, which oneDNN's
  convolutions reach at best;
- the plain and the default step (`benchmarks/train_speed.py`'s loops, the same batches), in
  paired rounds, and a profile of each: the share of its CPU time in convolution kernels
  (forward and backward), the rest being BatchNorm, activations, the optimizer and glue.

The bound is the plain step's time over the default step's with its convolutions at the GEMM
rate and everything else as measured (the median over rounds of each round's figure): no
convolution kernel, however good, makes the default faster than that. Writes
benchmarks/results/step_bound.json (or `--output`, a run on another kind of CPU) and the
README's table, one row per results file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from machine import machine
from readme_table import write_table
from train_speed import (
    BATCH,
    PLAIN,
    RESULTS,
    STEPS,
    clips_per_second,
    default_switches,
    fresh_model,
    fsdd_batches,
    make_step,
    median_ratio,
)

ROUNDS = 5
PROFILED_STEPS = 4
GEMM_SIZE = 2048
TARGET = 2.0


def convolution_flops(name: str, features: torch.Tensor) -> dict[str, float]:
    """The forward and backward convolution FLOPs of one training step on a batch of
    `features` (multiply and add counted as two)."""
    model = fresh_model(name).train()
    forward: list[tuple[float, bool]] = []

    def count(module: nn.Conv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        kernel = module.kernel_size[0] * module.kernel_size[1]
        macs = output.numel() * (module.in_channels // module.groups) * kernel
        forward.append((2.0 * macs, inputs[0].requires_grad))

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    model(features[:BATCH])
    for hook in hooks:
        hook.remove()
    forward_flops = sum(flops for flops, _ in forward)
    # Each convolution's weight gradient costs its forward; its input gradient too, where the
    # input needs one (not the first convolution's: the features).
    backward_flops = sum(flops * (2 if needs_grad else 1) for flops, needs_grad in forward)
    return {"forward_gflop": forward_flops / 1e9, "backward_gflop": backward_flops / 1e9}


def gemm_gflops() -> float:
    """This CPU's float32 matmul rate, GFLOP/s: the best of five 2048^3 products."""
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    a @ b
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * GEMM_SIZE**3 / best / 1e9


def convolution_share(step: Callable[[int], None]) -> float:
    """The share of a step's CPU time (self time, per op) spent in convolution kernels."""
    for index in range(2):
        step(index)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for index in range(PROFILED_STEPS):
            step(index)
    events = profile.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    convolution = sum(
        event.self_cpu_time_total
        for event in events
        if event.key.startswith("aten::") and "conv" in event.key
    )
    return convolution / total


def measure(name: str) -> dict:
    features, labels = fsdd_batches()
    switches = {"plain": PLAIN, "default": default_switches()}
    steps = {label: make_step(name, s, features, labels)[0] for label, s in switches.items()}
    rounds: dict[str, list[float]] = {label: [] for label in [*steps, "gemm"]}
    for index in range(ROUNDS):
        order = list(steps) if index % 2 == 0 else list(steps)[::-1]  # order effects cancel
        for label in order:
            rounds[label].append(clips_per_second(steps[label]))
        rounds["gemm"].append(gemm_gflops())
    shares = {label: convolution_share(step) for label, step in steps.items()}
    flops = convolution_flops(name, features)
    convolution_gflop = flops["forward_gflop"] + flops["backward_gflop"]
    other = 1 - shares["default"]
    # Each round's bound from its own figures, as the speed-ups are: the machine is shared
    # and its speed drifts over a run.
    bounds = [
        (BATCH / plain) / (convolution_gflop / gflops + other * BATCH / default_rate)
        for plain, default_rate, gflops in zip(
            rounds["plain"], rounds["default"], rounds["gemm"], strict=True
        )
    ]
    seconds = {label: BATCH / statistics.median(rounds[label]) for label in steps}
    gflops = statistics.median(rounds["gemm"])
    default_convolution = shares["default"] * seconds["default"]
    return {
        "model": name,
        "machine": machine(),
        "batch": BATCH,
        "steps_per_round": STEPS,
        "rounds": ROUNDS,
        "plain_step_ms": round(1e3 * seconds["plain"], 1),
        "default_step_ms": round(1e3 * seconds["default"], 1),
        "default_speedup": round(median_ratio(rounds["default"], rounds["plain"]), 2),
        "target_step_ms": round(1e3 * seconds["plain"] / TARGET, 1),
        "convolution_forward_gflop": round(flops["forward_gflop"], 2),
        "convolution_backward_gflop": round(flops["backward_gflop"], 2),
        "gemm_gflops": round(gflops, 1),
        "plain_convolution_share": round(shares["plain"], 3),
        "default_convolution_share": round(shares["default"], 3),
        "default_convolution_ms": round(1e3 * default_convolution, 1),
        "default_convolution_gflops": round(convolution_gflop / default_convolution, 1),
        "convolutions_at_gemm_rate_ms": round(1e3 * convolution_gflop / gflops, 1),
        "other_ms": round(1e3 * other * seconds["default"], 1),
        "bound_step_ms": round(1e3 * (convolution_gflop / gflops + other * seconds["default"]), 1),
        "bound_speedup": round(statistics.median(bounds), 2),
    }


def table(results: list[dict]) -> list[str]:
    lines = [
        "| CPU | plain ms | default ms (speed-up) | 2x needs ms | convolutions ms (GFLOP/s) "
        "| at GEMM rate ms (GFLOP/s) | other ms | bound |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        lines.append(
            f"| {result['machine']['cpu']} | {result['plain_step_ms']:.0f} "
            f"| {result['default_step_ms']:.0f} ({result['default_speedup']:.2f}x) "
            f"| {result['target_step_ms']:.0f} "
            f"| {result['default_convolution_ms']:.0f} "
            f"({result['default_convolution_gflops']:.0f}) "
            f"| {result['convolutions_at_gemm_rate_ms']:.0f} ({result['gemm_gflops']:.0f}) "
            f"| {result['other_ms']:.0f} | {result['bound_speedup']:.2f}x |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_v2")
    parser.add_argument("--output", default="step_bound.json", help="the results file's name")
    arguments = parser.parse_args()
    result = measure(arguments.model)
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / arguments.output).write_text(json.dumps(result, indent=1) + "\n")
    files = sorted(RESULTS.glob("step_bound*.json"))
    write_table("step_bound", table([json.loads(Path(f).read_text()) for f in files]))


if __name__ == "__main__":
    main()
