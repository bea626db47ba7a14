"""Study, before building it: unsigned 8-bit grids for activations that cannot be negative.

Every 8-bit activation today is signed and symmetric (zero point 0), so a ReLU output uses
128 of the 256 codes. TIDL keeps such tensors unsigned (its element type 0, uint8; TI's own
torch toolkit quantizes activations as quint8), which halves their step at the same range.
This script measures what that would give, on the cached population checkpoints, without
changing the library: after our default `calibrate()`, every per-tensor activation quantizer
whose calibrated minimum is >= 0 is moved to the grid [0, 255] (same zero point 0) and the
eval (integer) model is rebuilt. Left signed: inputs of MatMul / bmm (TDA4VM refuses signed
x unsigned products) and, with `--keep-sigmoid` (the default), sigmoid outputs (squeeze-
excitation gates), where the first run of this study lost 36 points of top-1 on one
efficientnet checkpoint (see docs/ptq.md).

    .venv/bin/python benchmarks/unsigned_study.py --checkpoints resnet18@default mobilenet_v2@high_lr

Per checkpoint and scheme: top-1 and logit SQNR against float, signed (today) and unsigned,
on the 360 digits test images; measured in torch eval mode (the integer model the export
is held to). Results: benchmarks/results/unsigned_study.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import warnings

import torch
from _common import save, table

import edgequant as eq
from edgequant.demo.data import digits_tensors
from edgequant.demo.training import float_digits_model
from edgequant.graph.ops import activation_quantizer_nodes
from edgequant.numerics.observers import RangeObserver

SCHEMES = ["int8_pow2", "int8_pow2_dw", "int8"]
MATMUL = {torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}
CALIB_IMAGES = 128  # as benchmarks/ptq_population.py


def sqnr_db(q: torch.Tensor, f: torch.Tensor) -> float:
    noise = float(((q - f) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((f**2).sum()) / noise)


def make_unsigned(qmodel: eq.PTQModule, keep_sigmoid: bool) -> int:
    """Move non-negative per-tensor activation quantizers to [0, 255]; return how many moved."""
    moved = 0
    for node, obs in activation_quantizer_nodes(qmodel.model, RangeObserver):
        if not obs.symmetric or obs.ch_axis is not None or obs.quant_max != 127 or float(obs.min_val) < 0:
            continue
        if any(user.target in MATMUL for user in node.users):
            continue
        if keep_sigmoid and "sigmoid" in str(node.args[0].target):
            continue
        obs.dtype, obs.quant_min, obs.quant_max = torch.uint8, 0, 255
        moved += 1
    qmodel._drop_integer_model()  # eval rebuilds the integer model from the observers
    return moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", required=True, help="model@recipe, e.g. resnet18@default")
    parser.add_argument("--schemes", nargs="+", default=SCHEMES, choices=SCHEMES)
    parser.add_argument("--no-keep-sigmoid", dest="keep_sigmoid", action="store_false")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=eq.EdgequantWarning)
    images, labels = digits_tensors("test")
    calib = digits_tensors("train")[0][:CALIB_IMAGES]
    rows = []
    for spec in args.checkpoints:
        name, recipe = spec.split("@")
        model = float_digits_model(name, recipe=recipe, progress=False).eval()
        with torch.no_grad():
            reference = model(images)
        for scheme in args.schemes:
            qmodel = eq.PTQModule(model, (calib[:32],), scheme)
            qmodel.calibrate([(x,) for x in calib.split(32)], progress=False)
            with torch.no_grad():
                signed = qmodel(images)
            moved = make_unsigned(qmodel, args.keep_sigmoid)
            with torch.no_grad():
                unsigned = qmodel(images)
            row = {"checkpoint": spec, "scheme": scheme, "moved": moved}
            for key, y in (("float", reference), ("signed", signed), ("unsigned", unsigned)):
                row[f"{key}_top1"] = 100.0 * float((y.argmax(1) == labels).float().mean())
            row["signed_sqnr_db"], row["unsigned_sqnr_db"] = sqnr_db(signed, reference), sqnr_db(unsigned, reference)
            rows.append(row)
            print(f"{spec} {scheme}: {row['signed_sqnr_db']:.2f} -> {row['unsigned_sqnr_db']:.2f} dB", flush=True)
    print(
        table(
            ["checkpoint", "scheme", "moved", "float", "signed top-1 / dB", "unsigned top-1 / dB"],
            [
                [
                    r["checkpoint"],
                    r["scheme"],
                    r["moved"],
                    f"{r['float_top1']:.2f}",
                    f"{r['signed_top1']:.2f} / {r['signed_sqnr_db']:.1f}",
                    f"{r['unsigned_top1']:.2f} / {r['unsigned_sqnr_db']:.1f}",
                ]
                for r in rows
            ],
        )
    )
    gains = [r["unsigned_sqnr_db"] - r["signed_sqnr_db"] for r in rows if r["moved"]]
    top1 = [r["unsigned_top1"] - r["signed_top1"] for r in rows if r["moved"]]
    if gains:
        print(
            f"rows with a moved quantizer: {len(gains)}; SQNR change median {statistics.median(gains):+.2f} dB, "
            f"min {min(gains):+.2f}, max {max(gains):+.2f}; top-1 change min {min(top1):+.2f}, max {max(top1):+.2f}"
        )
    print("results:", save("unsigned_study", "python " + " ".join(sys.argv), rows))


if __name__ == "__main__":
    main()
