"""How closely onnxruntime reproduces what eval shows, for every scheme (PTQ on digits models).

    python benchmarks/parity.py [--models resnet18 mobilenet_v2 regnet_x_400mf mobilenet_v3_small]

For each model and preset: PTQ (128 calibration images, default recipe), export, then
on the 360 test images: top-1 agreement between the PTQModule's eval output and
onnxruntime on the file, the logit SQNR of onnxruntime against eval in dB (signal:
eval's logits; noise: the difference; inf when identical), the largest difference in
output steps, and how many logits differ at all.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import save, table

import edgequant as eq
from edgequant.demo.data import digits_loader, digits_tensors
from edgequant.demo.training import float_digits_model
from edgequant.export.parity import output_steps
from edgequant.export.runtime import run_onnx, session

DEFAULT_MODELS = ["resnet18", "mobilenet_v2", "regnet_x_400mf", "mobilenet_v3_small"]


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - other) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def measure(name: str, scheme: str, workdir: Path) -> dict:
    model = float_digits_model(name)
    calib = digits_loader("train", batch_size=32, limit=128, shuffle=False)
    x_test, _ = digits_tensors("test")
    qmodel = eq.PTQModule(model, (x_test[:32],), scheme).calibrate(calib, progress=False)
    path = workdir / f"{name}_{scheme}.onnx"
    qmodel.export(path)
    with torch.no_grad():
        seen = qmodel(x_test).numpy()
    ort_out = run_onnx(session(str(path)), (x_test,))[0]
    step = output_steps(qmodel.convert())[0] or float("nan")
    return {
        "model": name,
        "scheme": scheme,
        "top1_agreement": 100.0 * float((seen.argmax(1) == ort_out.argmax(1)).mean()),
        "sqnr_db": sqnr_db(seen, ort_out),
        "max_diff_steps": float(np.abs(seen - ort_out).max() / step),
        "logits_differing": int((seen != ort_out).sum()),
        "logits": int(seen.size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--schemes", nargs="+", default=list(eq.PRESETS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for scheme in args.schemes:
                rows.append(measure(name, scheme, Path(tmp)))
                print(rows[-1], flush=True)
    headers = ["model", "scheme", "eval = ORT top-1 %", "SQNR dB", "max diff (steps)", "logits differing"]
    keys = ["model", "scheme", "top1_agreement", "sqnr_db", "max_diff_steps", "logits_differing"]
    print("\nPTQ eval vs onnxruntime on the 360 digits test images")
    print(table(headers, [[r[k] for k in keys] for r in rows]))
    print(f"\nresults: {save('parity', ' '.join(['python', *sys.argv]), rows)}")


if __name__ == "__main__":
    main()
