"""Diagnosis and mixed-precision recommendation on a digits-trained mobilenet_v2, int8_pow2.

    python benchmarks/analyze.py [--html DIR]

Calibration: the first 384 training images; evaluation: the 360 test images with
labels. Two cases:
- "as trained": the cached float model with the default PTQ recipe;
- "dead channel, no CLE": the failure an earlier float recipe produced by itself, made
  on purpose here. One stem channel is switched off (its ReLU6 output is always 0), so
  the next BN saw zero variance for it and its fold factor gamma / sqrt(eps) (about 316
  gamma) blows that depthwise channel's weights up; cross-layer equalization (which would
  repair it) is off. PTQ zeroes those weights before folding (they only multiply zeros),
  so since then the 8-bit model no longer collapses here.
For each case the recommended 16-bit set is checked independently: a PTQModule with
`scheme.with_high_precision(recommended)` is calibrated on the same images, exported, and
its top-1 measured in onnxruntime; it must be within 0.6 points of float.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import save, table

import edgequant as eq
from edgequant.demo.data import digits_loader, digits_tensors
from edgequant.demo.training import accuracy, float_digits_model, onnx_accuracy
from edgequant.diagnose.analysis import analyze
from edgequant.diagnose.results import VERDICT_FINE, VERDICT_OUTSIDE, VERDICT_QUANTIZATION

SCHEME = "int8_pow2"
TOLERANCE_POINTS = 0.6
SHORT_VERDICT = {VERDICT_FINE: "both fine", VERDICT_QUANTIZATION: "quantization", VERDICT_OUTSIDE: "outside"}


def with_dead_channel(model: torch.nn.Module, channel: int = 0) -> torch.nn.Module:
    """Switch off one stem channel, and give the next BN the statistics a dead channel leaves behind."""
    dead = copy.deepcopy(model)
    stem_bn, depthwise_bn = dead.features[0][1], dead.features[1].conv[0][1]
    with torch.no_grad():
        stem_bn.weight[channel], stem_bn.bias[channel] = 0.0, -1.0  # ReLU6(-1) = 0 for every input
        depthwise_bn.running_mean[channel], depthwise_bn.running_var[channel] = 0.0, 0.0
    return dead.eval()


def run_case(
    case: str, model: torch.nn.Module, config: eq.PTQConfig, calib, test, example, workdir: Path, html: Path | None
) -> dict:
    start = time.perf_counter()
    report = analyze(model, calib, (example,), SCHEME, eval_data=test, config=config)
    seconds = time.perf_counter() - start
    print(f"\n== {case} ==\n{report}\n", flush=True)
    stem = case.replace(" ", "_").replace(",", "")
    if html is not None:
        report.save(html / f"analyze_{stem}.html")
    chosen = report.recommended_high_precision
    scheme = eq.get_scheme(SCHEME).with_high_precision(chosen or None)
    check = eq.PTQModule(model, (example,), scheme, config).calibrate(calib, progress=False)
    path = workdir / f"{stem}.onnx"
    check.export(path)
    float_top1 = accuracy(model, test)
    ort_top1 = onnx_accuracy(path, test)
    return {
        "case": case,
        "layers": len(report.layers),
        "float": float_top1,
        "int16 (analysis)": report.int16.top1_accuracy,
        "int8 (analysis)": report.int8.top1_accuracy,
        "int8 SQNR dB": report.int8.sqnr_db,
        "verdict": SHORT_VERDICT[report.verdict],
        "16-bit layers": len(chosen),
        "recommended": chosen,
        "recommended (analysis)": report.recommended.top1_accuracy if report.recommended else None,
        "recommended SQNR dB": report.recommended.sqnr_db if report.recommended else None,
        "recommended onnxruntime": ort_top1,
        "recommended - float": ort_top1 - float_top1,
        "within tolerance": abs(ort_top1 - float_top1) <= TOLERANCE_POINTS,
        "top ranked": [layer.name for layer in report.layers[:3]],
        "analysis s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--html", type=Path, help="also write each case's HTML report into this folder")
    args = parser.parse_args()
    if args.html is not None:
        args.html.mkdir(parents=True, exist_ok=True)
    calib = digits_loader("train", batch_size=64, limit=384, shuffle=False)
    test = digits_loader("test", batch_size=120)
    example = digits_tensors("train")[0][:32]
    model = float_digits_model("mobilenet_v2")
    cases = [
        ("as trained", model, eq.PTQConfig()),
        ("dead channel, no CLE", with_dead_channel(model), eq.PTQConfig(equalize=False)),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, case_model, config in cases:
            rows.append(run_case(case, case_model, config, calib, test, example, Path(tmp), args.html))
    headers = ["case", "float", "int16", "int8", "verdict", "16-bit layers", "recommended (ORT)", "- float", "s"]
    keys = ["case", "float", "int16 (analysis)", "int8 (analysis)", "verdict", "16-bit layers"]
    keys += ["recommended onnxruntime", "recommended - float", "analysis s"]
    print(f"\nmobilenet_v2 {SCHEME}, top-1 % on the 360 digits test images; 384 calibration images")
    print(table(headers, [[r[k] for k in keys] for r in rows]))
    for r in rows:
        print(f"{r['case']}: recommended {r['recommended']}; top ranked {r['top ranked']}")
    print(f"\nresults: {save('analyze', ' '.join(['python', *sys.argv]), rows)}")
    if not all(r["within tolerance"] for r in rows):
        sys.exit(f"a recommended scheme is more than {TOLERANCE_POINTS} points from float")


if __name__ == "__main__":
    main()
