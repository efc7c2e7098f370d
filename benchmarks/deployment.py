"""Deployment on FSDD: accuracy, file size and batch-1 CPU latency of every runtime, float and
int8, for a mobile model and the microcontroller-class one.

    python benchmarks/deployment.py [--runs 300]

Each model is trained, quantised (PTQ, 512 calibration clips) and exported to ONNX, TorchScript
and TFLite by the main job (`python main.py model=NAME run.quantise=true
run.export_formats=[onnx,torchscript,tflite]`), with every export's own check. Then, in one
process and on the 300 official FSDD test clips, each of PyTorch fp32 eager, fused fp32 (BatchNorm
folded), PyTorch int8 (the PT2E graph), TorchScript, ONNX Runtime fp32 and int8, TFLite fp32
and int8 is timed on one clip at a time (median of `--runs` calls after a warm-up, the
machine's threads) and scored on all clips. Ratios are to PyTorch fp32 eager. Writes
benchmarks/results/deployment.json and the table in README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from audioclf.checkpoint import load_checkpoint, stored_normalization
from audioclf.cli import CONFIG_DIR, run
from audioclf.export import ExportError, InferenceModel, inference_model
from audioclf.model import load_state
from audioclf.pipeline import build_datasets, build_model
from audioclf.predict import load_predictor
from audioclf.quant import load_quantized
from audioclf.settings import load_settings
from readme_table import write_table

log = logging.getLogger("deployment")
RESULTS = Path(__file__).resolve().parent / "results" / "deployment.json"
RUNS = Path(__file__).resolve().parents[1] / "outputs" / "benchmarks" / "deployment"
MODELS = [("efficientnet_v2 (mobile)", "efficientnet_v2"), ("micro", "efficientnet_v2_micro")]
#: The issue's targets: int8 TFLite size and speed against PyTorch fp32 eager, its accuracy
#: loss, and the microcontroller-class file.
MAX_INT8_SIZE_RATIO = 1 / 3.5
MIN_INT8_SPEEDUP = 2.0
MAX_INT8_ACCURACY_DROP = 0.5
MICRO_MAX_BYTES = 256 * 1024
MICRO_MIN_ACCURACY = 0.97


def train_quantise_export(option: str) -> tuple[Path, str]:
    """The main job for model option `option`: its run directory and the exports' check
    ("passed", or the failure: the files are written and measured all the same)."""
    return main_job(
        RUNS / option,
        [f"model={option}", "run.quantise=true", "run.export_formats=[onnx,torchscript,tflite]"],
    )


def per_tensor_variant(option: str, float_checkpoint: Path) -> tuple[Path, str]:
    """The same trained float model quantised with one weight scale per tensor
    (`model.quantization.per_channel=false`), exported to TFLite."""
    return main_job(
        RUNS / f"{option}_per_tensor",
        [
            f"model={option}",
            "run.train=false",
            "run.test=false",
            "run.quantise=true",
            "model.quantization.per_channel=false",
            f"run.checkpoint_path={float_checkpoint}",
            "run.export_formats=[tflite]",
        ],
    )


def main_job(directory: Path, overrides: list[str]) -> tuple[Path, str]:
    """One main-job run into `directory`; the directory and its exports' check."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        config = compose(
            "config",
            overrides=[*overrides, "run.export_inputs=[log_mel]", f"system.output_dir={directory}"],
        )
    try:
        run(config)
    except ExportError as error:
        log.warning("%s", error)
        return directory, str(error)
    return directory, "passed"


def _state_bytes(module: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _torch_runner(module: torch.nn.Module, normalise: Callable | None = None) -> Callable:
    def run_module(features: np.ndarray) -> np.ndarray:
        if normalise is not None:
            features = normalise(features)
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(features))).numpy()

    return run_module


def _file_runner(path: Path) -> Callable:
    """features -> logits for an exported file, normalised first where its sidecar says so."""
    return load_predictor(path).logits


def runtimes(directory: Path) -> tuple[list[tuple[str, str, Callable, int | None]], dict]:
    """(format, precision, features -> logits, size in bytes) for every runtime of a run."""
    content = load_checkpoint(directory / "checkpoints" / "best.pth")
    settings = load_settings(OmegaConf.create(content["config"]))
    classes, n_mels = len(content["classes"]), content["features"]["n_mels"]
    model = build_model(settings.model, classes, n_mels)
    load_state(model, content["model"], "best.pth", strict=True)
    model.eval()
    normalization = stored_normalization(content, "best.pth")
    int8_content = load_checkpoint(directory / "checkpoints" / "int8.pth")
    fresh = build_model(settings.model, classes, n_mels)
    # The int8 model as PyTorch runs it: its graph behind the input normalisation a PANNs
    # model's int8 graph takes out of it (bn0), if any.
    int8 = load_quantized(fresh, int8_content["quantized"]).eval()
    export = directory / "export"
    rows = [
        ("pytorch", "float32", _torch_runner(InferenceModel(model, normalization).eval())),
        ("pytorch_fused", "float32", _torch_runner(inference_model(model, normalization))),
        ("pytorch_pt2e", "int8", _torch_runner(int8, normalization)),
        ("torchscript", "float32", _file_runner(export / "model.pt")),
        ("onnxruntime", "float32", _file_runner(export / "model.onnx")),
        ("onnxruntime", "int8", _file_runner(export / "model_int8.onnx")),
        ("tflite", "float32", _file_runner(export / "model.tflite")),
        ("tflite", "int8", _file_runner(export / "model_int8.tflite")),
    ]
    sizes = [
        _state_bytes(model),
        _state_bytes(inference_model(model, None)),
        # The PT2E graph keeps float weights with quantize ops (fold_quantize=False): there
        # is no int8 PyTorch file to measure.
        None,
        *(
            (export / name).stat().st_size
            for name in (
                "model.pt",
                "model.onnx",
                "model_int8.onnx",
                "model.tflite",
                "model_int8.tflite",
            )
        ),
    ]
    return [(*row, size) for row, size in zip(rows, sizes, strict=True)], {
        "settings": settings,
        "params": sum(p.numel() for p in model.parameters()),
    }


def test_set(settings) -> tuple[np.ndarray, np.ndarray]:
    """The test clips' log-mel (N, 1, frames, mels, not normalised) and labels."""
    _, datasets, _ = build_datasets(settings)
    test = datasets["test"]
    items = test.__getitems__(list(range(len(test))))
    features = np.stack([item[0].numpy() for item in items]).astype(np.float32)
    return features, np.array([int(item[1]) for item in items])


def latency_ms(runner: Callable, clip: np.ndarray, runs: int) -> float:
    """Median milliseconds of one batch-1 call, after a warm-up."""
    for _ in range(max(10, runs // 10)):
        runner(clip)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        runner(clip)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def measure(label: str, option: str, runs: int) -> list[dict]:
    directory, export_check = train_quantise_export(option)
    rows, info = runtimes(directory)
    best = directory / "checkpoints" / "best.pth"
    per_tensor, per_tensor_check = per_tensor_variant(option, best)
    per_tensor_file = per_tensor / "export" / "model_int8.tflite"
    rows.append(
        ("tflite", "int8 per-tensor", _file_runner(per_tensor_file), per_tensor_file.stat().st_size)
    )
    features, labels = test_set(info["settings"])
    results = []
    for fmt, precision, runner, size in rows:
        logits = np.concatenate([runner(features[i : i + 50]) for i in range(0, len(features), 50)])
        results.append(
            {
                "model": label,
                "model_option": option,
                "params": info["params"],
                "format": fmt,
                "precision": precision,
                "test_accuracy": float((logits.argmax(1) == labels).mean()),
                "size_bytes": size,
                "latency_ms_b1": round(latency_ms(runner, features[:1], runs), 4),
                "threads": torch.get_num_threads(),
                "export_check": per_tensor_check if "per-tensor" in precision else export_check,
            }
        )
    eager = results[0]
    for row in results:
        row["latency_ratio_vs_fp32"] = round(row["latency_ms_b1"] / eager["latency_ms_b1"], 4)
        row["speedup_vs_fp32"] = round(eager["latency_ms_b1"] / row["latency_ms_b1"], 3)
        row["size_ratio_vs_fp32"] = (
            None if row["size_bytes"] is None else round(row["size_bytes"] / eager["size_bytes"], 4)
        )
        row["accuracy_points_vs_fp32"] = round(
            100 * (row["test_accuracy"] - eager["test_accuracy"]), 2
        )
    return results


def add_targets(rows: list[dict]) -> None:
    """The issue's targets, met or not, on each int8 TFLite row (`targets`)."""
    for row in rows:
        if row["format"] != "tflite" or not row["precision"].startswith("int8"):
            continue
        checks = {
            "size_ratio_vs_fp32 <= 1/3.5": row["size_ratio_vs_fp32"] <= MAX_INT8_SIZE_RATIO,
            "speedup_vs_fp32 >= 2": row["speedup_vs_fp32"] >= MIN_INT8_SPEEDUP,
            "accuracy within 0.5 points": -row["accuracy_points_vs_fp32"] <= MAX_INT8_ACCURACY_DROP,
        }
        if row["model_option"].endswith("_micro"):
            checks["size_bytes <= 256 KB"] = row["size_bytes"] <= MICRO_MAX_BYTES
            checks["test_accuracy >= 97%"] = row["test_accuracy"] >= MICRO_MIN_ACCURACY
        row["targets"] = checks


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | runtime | precision | test accuracy | size | size vs fp32 "
        "| latency b1 (ms) | speed-up vs fp32 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        size = "-" if row["size_bytes"] is None else f"{row['size_bytes'] / 1024:,.0f} KB"
        ratio = "-" if row["size_ratio_vs_fp32"] is None else f"{row['size_ratio_vs_fp32']:.2f}"
        lines.append(
            f"| {row['model']} | {row['format']} | {row['precision']} "
            f"| {row['test_accuracy'] * 100:.2f}% | {size} | {ratio} "
            f"| {row['latency_ms_b1']:.2f} | {row['speedup_vs_fp32']:.2f}x |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="timed batch-1 calls per runtime")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = [row for label, option in MODELS for row in measure(label, option, arguments.runs)]
    add_targets(rows)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    write_table("deployment", table(rows))
    print("\n".join(table(rows)))
    for row in rows:
        if "targets" in row:
            print(row["model"], json.dumps(row["targets"]))


if __name__ == "__main__":
    main()
