"""Helpers shared by the benchmark scripts: timing, tables, result files."""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from edgequant.core.files import write_atomic

RESULTS = Path(__file__).resolve().parent / "results"
# Quiet torchao's import-time pytree deprecation warning, as edgequant itself does.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Step times of several variants, run in turn: variant A, B, C, then A, B, C again ...

    On a shared machine the load changes over seconds; interleaving exposes every
    variant to the same load, so ratios taken round by round stay meaningful.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-round ratios of two interleaved timing series."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join([line, rule, *body])


def save(name: str, command: str, rows: list[dict]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "rows": rows,
    }
    # Atomic: a benchmark killed while saving leaves the previous results whole.
    return write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def warm_bn(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """BN statistics from the calibration images, as a trained model would have.

    Only BN runs in train mode, as in capture: auxiliary heads and stochastic depth stay in eval form.
    """
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.train()
        bn.momentum = None
    with torch.no_grad():
        for x in batches:
            model(x)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def quantize_on_digits(name: str, scheme: object, epochs: int, lr: float, workdir: Path) -> dict:
    """PTQ and QAT of a digits-trained model, both measured in onnxruntime.

    Returns top-1 % of the float model, of PTQ (min/max ranges from 128 training
    images), and of QAT for `epochs`, the quantized ones measured on the exported
    ONNX in onnxruntime; plus the QAT wrapper and its file under "_qmodel" / "_path".
    """
    import edgequant as eq
    from edgequant.demo.data import digits_loader, digits_tensors
    from edgequant.demo.training import accuracy, float_digits_model, onnx_accuracy, train_epochs

    torch.manual_seed(0)
    train = digits_loader("train", batch_size=64)
    test = digits_loader("test", batch_size=120)
    calib = digits_loader("train", batch_size=32, limit=128, shuffle=False)
    example = digits_tensors("train")[0][:32]
    model = float_digits_model(name)
    tag = eq.get_scheme(scheme).name
    start = time.perf_counter()
    ptq = eq.PTQModule(model, (example,), scheme).calibrate(calib, progress=False)
    ptq_seconds = time.perf_counter() - start
    ptq_path = workdir / f"{name}_{tag}_ptq.onnx"
    ptq.export(ptq_path)
    qmodel = eq.QATModule(model, (example,), scheme, eq.QATConfig(eq.FreezeSchedule(epochs)))
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    start = time.perf_counter()
    train_epochs(qmodel, train, epochs, optimizer, desc=f"QAT {name} {tag}")
    seconds = time.perf_counter() - start
    path = workdir / f"{name}_{tag}.onnx"
    result = qmodel.export(path)
    return {
        "model": name,
        "scheme": tag,
        "float_top1": accuracy(model, test),
        "ptq_onnxruntime_top1": onnx_accuracy(ptq_path, test),
        "ptq_seconds": ptq_seconds,
        "qat_torch_top1": accuracy(qmodel, test),
        "qat_onnxruntime_top1": onnx_accuracy(path, test),
        "qat_epochs": epochs,
        "qat_seconds": seconds,
        "parity": str(result.parity),
        "_qmodel": qmodel,
        "_path": path,
    }
