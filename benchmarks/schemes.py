"""Accuracy of every scheme preset on digits-trained models, measured in onnxruntime.

    python benchmarks/schemes.py [--epochs 3] [--models resnet18 mobilenet_v2 regnet_x_400mf]

For each model and preset (plus int8_pow2 with the first and last layer in 16 bit):
float top-1; top-1 after PTQ (min/max ranges from 128 training images); and top-1
after QAT. Quantized numbers are measured on the exported ONNX in onnxruntime, on the
360 digits test images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import quantize_on_digits, save, table

import edgequant as eq

SCHEMES = [*eq.PRESETS, "int8_pow2+first_last"]
DEFAULT_MODELS = ["resnet18", "mobilenet_v2", "regnet_x_400mf"]


def scheme_for(name: str) -> eq.Scheme:
    if name.endswith("+first_last"):
        return eq.get_scheme(name.split("+")[0]).with_high_precision("first_last")
    return eq.get_scheme(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--schemes", nargs="+", default=SCHEMES)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for name in args.schemes:
                row = quantize_on_digits(model, scheme_for(name), args.epochs, args.lr, Path(tmp))
                row.pop("_qmodel"), row.pop("_path")
                row["scheme"] = name
                rows.append(row)
                print({k: v for k, v in row.items() if k != "parity"}, flush=True)
    headers = ["model", "scheme", "float", "PTQ (onnxruntime)", "QAT (onnxruntime)", "PTQ - float", "QAT - float"]
    body = [
        [
            r["model"],
            r["scheme"],
            r["float_top1"],
            r["ptq_onnxruntime_top1"],
            r["qat_onnxruntime_top1"],
            r["ptq_onnxruntime_top1"] - r["float_top1"],
            r["qat_onnxruntime_top1"] - r["float_top1"],
        ]
        for r in rows
    ]
    print(f"\nQAT {args.epochs} epochs at lr {args.lr}; top-1 % on the 360 digits test images")
    print(table(headers, body))
    name = "schemes" if args.models == DEFAULT_MODELS else "schemes_" + "_".join(args.models)
    print(f"\nresults: {save(name, ' '.join(['python', *sys.argv]), rows)}")


if __name__ == "__main__":
    main()
