"""PTQ accuracy and calibration time: ours vs torchao PT2E and onnxruntime quantize_static.

    python benchmarks/ptq.py [--models resnet18 mobilenet_v2 regnet_x_400mf mobilenet_v3_small]

Digits-trained models, 128 calibration images, top-1 % on the 360 test images, every
quantized number measured in onnxruntime on the exported file. Two times per tool,
after a warm-up that pays torch's one-time export start-up:
- calibrate: running the calibration data (ours: `calibrate()`, with its whole recipe;
  torchao: the observer loop; onnxruntime: `quantize_static`);
- total: float PyTorch model to quantized model (ours and torchao: capture, prepare,
  calibrate, convert; onnxruntime: the float ONNX export plus `quantize_static`).
Ratios are taken within this run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime.quantization as ortq
import torch
from _common import save, table
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

import edgequant as eq
from edgequant.demo.data import digits_loader, digits_tensors
from edgequant.demo.training import accuracy, float_digits_model, onnx_accuracy

DYNAMIC = ({0: torch.export.Dim("batch")},)


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=DYNAMIC, verbose=False)


def ours(model, scheme, calib, example, path) -> tuple[float, float]:
    start = time.perf_counter()
    qmodel = eq.PTQModule(model, (example,), scheme)
    calib_start = time.perf_counter()
    qmodel.calibrate(calib, progress=False)
    calib_seconds = time.perf_counter() - calib_start
    qmodel.convert()
    total = time.perf_counter() - start
    qmodel.export(path)
    return calib_seconds, total


def torchao_pt2e(model, per_channel, calib, example, path) -> tuple[float, float]:
    start = time.perf_counter()
    graph = torch.export.export(model.eval(), (example,), dynamic_shapes=DYNAMIC).module()
    config = get_symmetric_quantization_config(is_per_channel=per_channel)
    prepared = prepare_pt2e(graph, XNNPACKQuantizer().set_global(config))
    calib_start = time.perf_counter()
    with torch.no_grad():
        for x, _ in calib:
            prepared(x)
    calib_seconds = time.perf_counter() - calib_start
    converted = convert_pt2e(prepared)
    total = time.perf_counter() - start
    _export(converted, example, path)
    return calib_seconds, total


class _Reader(ortq.CalibrationDataReader):
    def __init__(self, name: str, calib) -> None:
        self.batches = iter([{name: x.numpy()} for x, _ in calib])

    def get_next(self):
        return next(self.batches, None)


def ort_static(float_path, method, calib, path, export_seconds: float) -> tuple[float, float]:
    import onnx

    name = onnx.load(str(float_path)).graph.input[0].name
    start = time.perf_counter()
    ortq.quantize_static(
        str(float_path),
        str(path),
        _Reader(name, calib),
        quant_format=ortq.QuantFormat.QDQ,
        activation_type=ortq.QuantType.QInt8,
        weight_type=ortq.QuantType.QInt8,
        calibrate_method=method,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    seconds = time.perf_counter() - start
    return seconds, seconds + export_seconds


LABELS = ["ours int8_pow2", "ours int8", "torchao per-tensor", "torchao per-channel", "ort MinMax", "ort Percentile"]


def run_model(name: str, calib, example: torch.Tensor, test, work: Path) -> dict:
    model = float_digits_model(name)
    float_path = work / f"{name}_float.onnx"
    start = time.perf_counter()
    _export(model.eval(), example, float_path)
    export_seconds = time.perf_counter() - start  # onnxruntime's tool starts from ONNX
    row = {"model": name, "float": accuracy(model, test)}
    runs = {
        "ours int8_pow2": lambda p: ours(model, "int8_pow2", calib, example, p),
        "ours int8": lambda p: ours(model, "int8", calib, example, p),
        "torchao per-tensor": lambda p: torchao_pt2e(model, False, calib, example, p),
        "torchao per-channel": lambda p: torchao_pt2e(model, True, calib, example, p),
        "ort MinMax": lambda p: ort_static(float_path, ortq.CalibrationMethod.MinMax, calib, p, export_seconds),
        "ort Percentile": lambda p: ort_static(float_path, ortq.CalibrationMethod.Percentile, calib, p, export_seconds),
    }
    for label, run in runs.items():
        path = work / f"{name}_{label.replace(' ', '_')}.onnx"
        try:
            row[f"{label} calibrate s"], row[f"{label} total s"] = run(path)
            row[label] = onnx_accuracy(path, test)
        except Exception as error:  # a peer failing is a result to report, not a crash
            row[label] = float("nan")
            row[f"{label} error"] = str(error).splitlines()[0][:200]
    ours_key, ort_key = "ours int8_pow2", "ort MinMax"
    row["calibrate ratio"] = row.get(f"{ours_key} calibrate s", np.nan) / row.get(f"{ort_key} calibrate s", np.nan)
    row["total ratio"] = row.get(f"{ours_key} total s", np.nan) / row.get(f"{ort_key} total s", np.nan)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", default=["resnet18", "mobilenet_v2", "regnet_x_400mf", "mobilenet_v3_small"]
    )
    args = parser.parse_args()
    test = digits_loader("test", batch_size=120)
    calib = digits_loader("train", batch_size=32, limit=128, shuffle=False)
    example = digits_tensors("train")[0][:32]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # torch.export / dynamo pay a one-time start-up of several seconds in a fresh
        # process; pay it here so that no tool's first timing includes it.
        eq.PTQModule(float_digits_model(args.models[0]), (example,)).calibrate(calib, progress=False)
        for name in args.models:
            rows.append(run_model(name, calib, example, test, Path(tmp)))
            print(rows[-1], flush=True)
    print("\ntop-1 % in onnxruntime (360 digits test images), 128 calibration images")
    print(table(["model", "float", *LABELS], [[r["model"], r["float"], *[r[k] for k in LABELS]] for r in rows]))
    for kind in ("calibrate", "total"):
        print(f"\n{kind} time, seconds; ratio = ours int8_pow2 / onnxruntime MinMax")
        timing = [
            [r["model"], *[r.get(f"{k} {kind} s", float("nan")) for k in LABELS], r[f"{kind} ratio"]] for r in rows
        ]
        print(table(["model", *LABELS, "ratio"], timing))
    print(f"\nresults: {save('ptq', ' '.join(['python', *sys.argv]), rows)}")


if __name__ == "__main__":
    main()
