"""Model surgery on digits-trained models: what `eq.adapt` costs in float, what distillation wins back,
what the adapted model gives in 8 bit, and which nodes TIDL still runs on the ARM core.

    python benchmarks/surgery.py [--models mobilenet_v3_small efficientnet_b0 ...] [--epochs 5]

For each model (torchvision names, `timm:NAME` for timm's):
- float top-1 (360 test images, torch) of the original, of the TDA4VM-adapted model before
  fine-tuning, and after `--epochs` epochs of `eq.finetune_adapted` (default DistillConfig:
  distillation from the original plus the labels, on the 1437 training images in batches of
  32, randomly shifted by up to 2 pixels as in float training), with its wall time;
- int8_pow2 PTQ top-1 in onnxruntime (128 calibration images, exported for TDA4VM) of the
  original and of the adapted, fine-tuned model; int8 PTQ (exported for AM68A) of the original
  and of the AM68A-adapted model (exact replacements only: no fine-tuning);
- the TIDL import check of each export: nodes falling back to the ARM core, and advice
  (nodes TI's model surgery would replace).
`--sweep adamw:2e-3 sgd:0.01 ...` also fine-tunes with each of those optimizer:lr settings (the
rest of DistillConfig at its defaults) and reports their float top-1: how the defaults were chosen.
`--detector ssdlite` (the default; `none` skips it) does the same for the canvas detector of
benchmarks/detection.py: COCO mAP on the 128 test canvases, distillation of the head outputs
plus torchvision's losses on the 512 training canvases, int8_pow2 PTQ (128 calibration
canvases) with the file's head outputs computed by onnxruntime.
Results: benchmarks/results/surgery.json (surgery_sweep.json with --sweep).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import save, table

import edgequant as eq
from edgequant.demo.data import digits_loader, digits_tensors
from edgequant.demo.training import Shifted, accuracy, float_digits_model, onnx_accuracy

DEFAULT_MODELS = ["mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "timm:convnext_atto"]


def ptq(model: torch.nn.Module, device: str, calib, example: torch.Tensor, test, path: Path) -> dict:
    """PTQ with the device's default scheme; onnxruntime top-1 and the TIDL import check of the export."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = eq.PTQModule(model, (example,), device=device).calibrate(calib, progress=False)
        result = qmodel.export(path)
    check = result.tidl_check
    return {
        "top1": onnx_accuracy(path, test),
        "fallback": len(check.fallback),
        "fallback_ops": sorted({f.op_type for f in check.findings if f.node in check.fallback}),
        "advice": len({f.node for f in check.advice}),
    }


def sweep(original: torch.nn.Module, settings: list[str], epochs: int, train, test, example: torch.Tensor) -> dict:
    """Float top-1 after fine-tuning with each optimizer:lr setting (same adaptation, same seed)."""
    found = {}
    for setting in settings:
        optimizer, _, lr = setting.partition(":")
        adapted, _ = eq.adapt(original, "TDA4VM", (example[:2],))
        torch.manual_seed(0)
        config = eq.DistillConfig(epochs=epochs, optimizer=optimizer, lr=float(lr))
        eq.finetune_adapted(adapted, original, train, config, progress=False)
        found[setting] = accuracy(adapted, test)
    return found


def run_model(
    name: str, epochs: int, calib, train, test, example: torch.Tensor, work: Path, settings: list[str]
) -> dict:
    original = float_digits_model(name)
    row: dict = {"model": name, "float": accuracy(original, test)}
    adapted, report = eq.adapt(original, "TDA4VM", (example[:2],))
    row["changes"] = len(report.changes)
    row["kinds"] = sorted({c.replacement for c in report.changes})
    row["adapted"] = accuracy(adapted, test)
    start = time.perf_counter()
    torch.manual_seed(0)
    eq.finetune_adapted(adapted, original, train, eq.DistillConfig(epochs=epochs), progress=False)
    row["finetune_s"] = time.perf_counter() - start
    row["epochs"] = epochs
    row["finetuned"] = accuracy(adapted, test)
    row["sweep"] = sweep(original, settings, epochs, train, test, example)
    exact, exact_report = eq.adapt(original, "AM68A", (example[:2],))
    row["am68a_exact"] = exact_report.exact
    for tag, model, device in (
        ("original TDA4VM", original, "TDA4VM"),
        ("adapted TDA4VM", adapted, "TDA4VM"),
        ("original AM68A", original, "AM68A"),
        ("adapted AM68A", exact, "AM68A"),
    ):
        row[tag] = ptq(
            model, device, calib, example, test, work / f"{name.replace(':', '_')}_{tag.replace(' ', '_')}.onnx"
        )
    return row


def run_detector(family: str, epochs: int, work: Path) -> dict:
    from detection import heads_map, onnx_run

    from edgequant.demo.canvases import canvas_loader, digit_canvases
    from edgequant.demo.detection import detection_map, float_canvas_detector

    original = float_canvas_detector(family)
    test = canvas_loader("test", batch_size=16)
    images, targets = digit_canvases("calibration")
    calibration = [(images[i : i + 16], targets[i : i + 16]) for i in range(0, len(targets), 16)]
    row: dict = {"model": f"canvas:{family}", "float": detection_map(original, test)["map"]}
    adapted, report = eq.adapt(original, "TDA4VM", (images[:2],))
    row["changes"] = len(report.changes)
    row["kinds"] = sorted({c.replacement for c in report.changes})
    row["adapted"] = detection_map(adapted, test)["map"]
    start = time.perf_counter()
    torch.manual_seed(0)
    eq.finetune_adapted(adapted, original, canvas_loader("train"), eq.DistillConfig(epochs=epochs), progress=False)
    row["finetune_s"] = time.perf_counter() - start
    row["epochs"] = epochs
    row["finetuned"] = detection_map(adapted, test)["map"]
    for tag, model in (("original TDA4VM", original), ("adapted TDA4VM", adapted)):
        path = work / f"{family}_{tag.replace(' ', '_')}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = eq.PTQModule(model, (images[:8],), device="TDA4VM").calibrate(calibration, progress=False)
            result = qmodel.export(path)
        check = result.tidl_check
        row[tag] = {
            "top1": heads_map(qmodel, onnx_run(path), test)["map"],  # mAP here
            "fallback": len(check.fallback),
            "fallback_ops": sorted({f.op_type for f in check.findings if f.node in check.fallback}),
            "advice": len({f.node for f in check.advice}),
            "meta arch": result.detection_check,
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--epochs", type=int, default=5, help="distillation epochs (default: 5)")
    parser.add_argument("--sweep", nargs="*", default=[], help="optimizer:lr settings to compare (e.g. sgd:0.01)")
    parser.add_argument("--detector", default="ssdlite", help="canvas detector family, or none (default: ssdlite)")
    args = parser.parse_args()
    test = digits_loader("test", batch_size=120)
    train = Shifted(digits_loader("train", batch_size=32))
    calib = digits_loader("train", batch_size=32, limit=128, shuffle=False)
    example = digits_tensors("train")[0][:32]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(run_model(name, args.epochs, calib, train, test, example, Path(tmp), args.sweep))
            print(rows[-1], flush=True)
        if args.detector != "none":
            detector = run_detector(args.detector, args.epochs, Path(tmp))
            print(detector, flush=True)
    print("\nfloat top-1 % (360 digits test images, torch); adapted for TDA4VM")
    print(
        table(
            ["model", "original", "adapted", "fine-tuned", "epochs", "fine-tune s", "changes"],
            [
                [r["model"], r["float"], r["adapted"], r["finetuned"], r["epochs"], r["finetune_s"], r["changes"]]
                for r in rows
            ],
        )
    )
    if args.sweep:
        default = eq.DistillConfig()
        print(f"\nfloat top-1 % after fine-tuning: the default ({default.optimizer}:{default.lr:g}), then --sweep")
        print(
            table(["model", "default", *args.sweep], [[r["model"], r["finetuned"], *r["sweep"].values()] for r in rows])
        )
    print("\nPTQ top-1 % in onnxruntime (128 calibration images); TIDL ARM fallbacks / advice nodes of each export")
    tags = ("original TDA4VM", "adapted TDA4VM", "original AM68A", "adapted AM68A")
    headers = ["model", "int8_pow2 orig", "int8_pow2 adapted", "int8 orig", "int8 adapted (exact)"]
    print(table(headers, [[r["model"], *[r[t]["top1"] for t in tags]] for r in rows]))
    print(
        table(
            ["model", *[f"{t} fallback/advice" for t in tags]],
            [[r["model"], *[f"{r[t]['fallback']}/{r[t]['advice']}" for t in tags]] for r in rows],
        )
    )
    if args.detector != "none":
        tags = ("original TDA4VM", "adapted TDA4VM")
        print("\ndetector: COCO mAP % (128 test canvases); int8_pow2 PTQ in onnxruntime; TIDL fallback/advice")
        print(
            table(
                [
                    "model",
                    "float",
                    "adapted",
                    "fine-tuned",
                    "fine-tune s",
                    "int8_pow2 orig",
                    "int8_pow2 adapted",
                    "fallback/advice orig",
                    "fallback/advice adapted",
                ],
                [
                    [
                        detector["model"],
                        detector["float"],
                        detector["adapted"],
                        detector["finetuned"],
                        detector["finetune_s"],
                        *[detector[t]["top1"] for t in tags],
                        *[f"{detector[t]['fallback']}/{detector[t]['advice']}" for t in tags],
                    ]
                ],
            )
        )
        rows.append(detector)
    name = "surgery_sweep" if args.sweep else "surgery"  # a sweep keeps the main results as they are
    print(f"\nresults: {save(name, ' '.join(['python', *sys.argv]), rows)}")


if __name__ == "__main__":
    main()
