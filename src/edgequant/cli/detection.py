"""`edgequant ptq` and `edgequant qat` for detectors, on the bundled digits canvases.

`--data canvases` is the detection task of `edgequant.demo.canvases`; MODEL is
`canvas:ssdlite|retinanet|fcos` (without --weights: the detector trained on the
canvases, trained once and cached) or any torchvision SSD / RetinaNet / FCOS with
`--weights`. Accuracy is COCO mAP, in torch (eval mode, which is the exported file's).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from torch import nn

from ..core.errors import UsageError
from ..core.files import check_writable
from ..demo.canvases import NUM_CLASSES, canvas_loader, digit_canvases
from ..demo.detection import CANVAS_SIZE, DETECTORS, build_detector, detection_map, float_canvas_detector
from ..demo.detection import train_detector as train_canvas_detector
from ..demo.training import cache_dir
from ..wrappers.detection import detector_family
from ..wrappers.ptq import PTQConfig, PTQModule
from ..wrappers.qat import QATConfig, QATModule
from ..wrappers.schedule import FreezeSchedule
from .common import export_summary, indented, note, print_summary, scheme_of
from .loading import load_weights, resolve_model

CANVASES = "canvases"
CANVAS_MODEL = "canvas:"
EXAMPLE_BATCH = 8
CALIBRATION_BATCH = 16


def is_detection(args: argparse.Namespace) -> bool:
    """Whether the command line names the detection task (the canvases, or a canvas detector)."""
    return getattr(args, "data", None) == CANVASES or args.model.startswith(CANVAS_MODEL)


def _detector(args: argparse.Namespace) -> nn.Module:
    if getattr(args, "data", None) != CANVASES:
        raise UsageError(
            f"{args.model} is a detector: the command line evaluates detectors on `--data canvases` (the bundled "
            "digits canvases); for your own detection data use eq.PTQModule / eq.QATModule (docs/detection.md)"
        )
    if args.model.startswith(CANVAS_MODEL):
        family = args.model[len(CANVAS_MODEL) :]
        if family not in DETECTORS:
            raise UsageError(f"unknown canvas detector {family!r}; choose canvas:{', canvas:'.join(DETECTORS)}")
        if args.weights is None:
            note(f"no --weights: using {family} trained on the canvases (trained once, cached in {cache_dir()})")
            return float_canvas_detector(family)
        return load_weights(build_detector(family, args.input_size or CANVAS_SIZE), args.weights)
    if args.weights is None:
        raise UsageError(f"--weights is required for {args.model}: quantizing random weights tells nothing")
    model = load_weights(resolve_model(args.model, args.num_classes or NUM_CLASSES), args.weights)
    if detector_family(model) is None:
        raise UsageError(
            f"--data canvases is a detection task, and {args.model} is not a torchvision SSD, RetinaNet or FCOS; "
            "use canvas:ssdlite, canvas:retinanet or canvas:fcos, or your own detector with --weights"
        )
    return model


def _calibration(args: argparse.Namespace, samples: int) -> list[tuple[Any, Any]]:
    images, targets = digit_canvases("calibration", samples, args.input_size or CANVAS_SIZE)
    return [
        (images[i : i + CALIBRATION_BATCH], targets[i : i + CALIBRATION_BATCH])
        for i in range(0, len(targets), CALIBRATION_BATCH)
    ]


def _map_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"  {'':<{width}}{'mAP':>8}{'mAP@.5':>9}{'vs float':>10}"]
    reference = rows[0][1]["map"]
    for i, (label, value) in enumerate(rows):
        delta = f"{value['map'] - reference:+10.2f}" if i else ""
        lines.append(f"  {label:<{width}}{value['map']:>8.2f}{value['map50']:>9.2f}{delta}")
    return "\n".join(lines)


def analyze(args: argparse.Namespace) -> dict[str, Any]:
    """`edgequant analyze` for a detector: float, 16-bit and 8-bit mAP on the canvases (no per-layer search)."""
    from ..diagnose.analysis import analyze as analyze_model

    start = time.perf_counter()
    if args.html:
        raise UsageError("--html reports are for classifiers; a detector's analysis prints its mAP table")
    detector = _detector(args)
    calibration = _calibration(args, min(args.calib_samples, 128))
    test = canvas_loader("test", batch_size=CALIBRATION_BATCH, count=args.limit, size=args.input_size or CANVAS_SIZE)
    example = (calibration[0][0][:EXAMPLE_BATCH],)
    report = analyze_model(detector, calibration, example, args.scheme, eval_data=test, tolerance=args.tolerance)
    print_summary(args, [str(report), f"time {time.perf_counter() - start:.1f} s"])
    return {
        "command": "analyze",
        "task": "detection",
        "model": args.model,
        "weights": args.weights,
        "report": report.to_dict(),
    }


def ptq(args: argparse.Namespace) -> dict[str, Any]:
    """`edgequant ptq` for a detector: calibrate on canvases, mAP float vs quantized, export with the prototxt."""
    start = time.perf_counter()
    check_writable(args.output)
    scheme = scheme_of(args)
    detector = _detector(args)
    calibration = _calibration(args, min(args.calib_samples, 128))
    test = canvas_loader("test", batch_size=CALIBRATION_BATCH, count=args.limit, size=args.input_size or CANVAS_SIZE)
    float_map = detection_map(detector, test)
    example = (calibration[0][0][:EXAMPLE_BATCH],)
    qmodel = PTQModule(detector, example, scheme, PTQConfig(range_estimator=args.range_estimator), device=args.device)
    qmodel.calibrate(calibration)
    quant_map = detection_map(qmodel, test)
    result = qmodel.export(args.output)
    seconds = time.perf_counter() - start
    samples = sum(len(t) for _, t in calibration)
    body = [
        f"  calibration: digits canvases, calibration split ({samples} images)",
        f"  evaluation:  digits canvases, test split ({len(test.dataset)} images)",
        "",
        _map_table([("float (torch)", float_map), (f"{scheme.name} (torch)", quant_map)]),
        "",
        *indented(result),
        f"  time {seconds:.1f} s",
    ]
    print_summary(args, [f"edgequant ptq: {args.model}, scheme {scheme.name}", *body])
    return {
        "command": "ptq",
        "task": "detection",
        "model": args.model,
        "weights": args.weights,
        "scheme": scheme.name,
        "calibration_samples": samples,
        "map": {"float": float_map, "quantized": quant_map},
        **export_summary(result),
        "seconds": seconds,
    }


def qat(args: argparse.Namespace) -> dict[str, Any]:
    """`edgequant qat` for a detector: torchvision's losses on the quantized heads, then mAP and export."""
    start = time.perf_counter()
    check_writable(args.output)
    scheme = scheme_of(args)
    detector = _detector(args)
    size = args.input_size or CANVAS_SIZE
    calibration = _calibration(args, 128)
    test = canvas_loader("test", batch_size=CALIBRATION_BATCH, count=args.limit, size=size)
    train = canvas_loader("train", batch_size=CALIBRATION_BATCH, count=args.limit, size=size)
    float_map = detection_map(detector, test)
    config = QATConfig(FreezeSchedule(args.epochs))
    example = (calibration[0][0][:EXAMPLE_BATCH],)
    qmodel = QATModule(detector, example, scheme, config, calibration_data=calibration, device=args.device)
    train_canvas_detector(qmodel, train, args.epochs, args.lr)
    quant_map = detection_map(qmodel, test)
    result = qmodel.export(args.output)
    seconds = time.perf_counter() - start
    body = [
        f"  training:   digits canvases, train split ({len(train.dataset)} images), {args.epochs} epochs, "
        f"SGD lr {args.lr:g} (one cycle)",
        f"  evaluation: digits canvases, test split ({len(test.dataset)} images)",
        "",
        _map_table([("float (torch)", float_map), (f"QAT {scheme.name} (integer, torch)", quant_map)]),
        "",
        *indented(result),
        f"  time {seconds:.1f} s",
    ]
    print_summary(args, [f"edgequant qat: {args.model}, scheme {scheme.name}", *body])
    return {
        "command": "qat",
        "task": "detection",
        "model": args.model,
        "weights": args.weights,
        "scheme": scheme.name,
        "epochs": args.epochs,
        "lr": args.lr,
        "map": {"float": float_map, "quantized": quant_map},
        **export_summary(result),
        "seconds": seconds,
    }
