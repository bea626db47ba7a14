"""The main job on bundled data: float model -> QAT -> QDQ ONNX -> onnxruntime.

Run with `make demo` or `python -m edgequant.demo.job`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from ..wrappers.qat import QATConfig, QATModule
from ..wrappers.schedule import FreezeSchedule
from .data import digits_loader
from .training import DEFAULT_RECIPE, accuracy, cache_dir, float_digits_model, onnx_accuracy, train_epochs

T = TypeVar("T")


def _timed(times: dict[str, float], stage: str, fn: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = fn()
    times[stage] = time.perf_counter() - start
    print(f"  {stage:<28} {times[stage]:7.1f} s", flush=True)
    return result


def run(model_name: str, qat_epochs: int, lr: float, out_dir: Path) -> dict[str, float]:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out_dir.mkdir(parents=True, exist_ok=True)
    train = digits_loader("train", batch_size=64)
    test = digits_loader("test", batch_size=128)
    times: dict[str, float] = {}
    print(f"edgequant demo: {model_name} on scikit-learn digits (32x32), scheme int8_pow2")
    cached = (cache_dir() / DEFAULT_RECIPE.cache_name(model_name)).exists()
    stage = "float model (cached)" if cached else "float training (once, then cached)"
    model = _timed(times, stage, lambda: float_digits_model(model_name))
    float_top1 = _timed(times, "float evaluation", lambda: accuracy(model, test))
    example = (next(iter(train))[0][:16],)
    calib = digits_loader("train", batch_size=64, limit=256, shuffle=False)
    qmodel = _timed(
        times,
        "QAT wrap (from PTQ)",
        lambda: QATModule(model, example, "int8_pow2", QATConfig(FreezeSchedule(qat_epochs)), calibration_data=calib),
    )
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    _timed(
        times, f"QAT training ({qat_epochs} epochs)", lambda: train_epochs(qmodel, train, qat_epochs, optimizer, "QAT")
    )
    qat_top1 = _timed(times, "QAT evaluation (torch)", lambda: accuracy(qmodel, test))
    int_top1 = _timed(times, "integer model evaluation", lambda: accuracy(qmodel.convert(), test))
    onnx_path = out_dir / f"{model_name}_int8_pow2.onnx"
    result = _timed(times, "export + parity check", lambda: qmodel.export(onnx_path))
    ort_top1 = _timed(times, "evaluation (onnxruntime)", lambda: onnx_accuracy(onnx_path, test))
    rows = [
        ("float (torch)", float_top1),
        ("QAT wrapper, eval (torch)", qat_top1),
        ("converted int model (torch)", int_top1),
        ("exported ONNX (onnxruntime)", ort_top1),
    ]
    print()
    print(f"{'':<32}{'top-1 %':>9}")
    for label, value in rows:
        print(f"{label:<32}{value:>9.2f}")
    print("(eval runs the integer model itself: the wrapper, the converted model and onnxruntime")
    print(" agree bit for bit)")
    print()
    print(result)
    print(f"total {sum(times.values()):.1f} s")
    return {"float": float_top1, "qat_torch": qat_top1, "int_torch": int_top1, "onnxruntime": ort_top1, **times}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgequant.demo.job", description=__doc__)
    parser.add_argument("--model", default="resnet18", help="torchvision classifier name (default: resnet18)")
    parser.add_argument("--epochs", type=int, default=3, help="QAT epochs (default: 3)")
    parser.add_argument("--lr", type=float, default=5e-3, help="QAT learning rate (default: 5e-3)")
    parser.add_argument("--out", type=Path, default=Path("build/demo"), help="output folder (default: build/demo)")
    args = parser.parse_args(argv)
    run(args.model, args.epochs, args.lr, args.out)


if __name__ == "__main__":
    main()
