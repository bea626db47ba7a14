"""The `edgequant` command line: try quantization on a checkpoint before touching training code.

Each subcommand prints a summary table (or JSON with --json) and exits 0 on success;
on failure it prints one line to stderr saying what went wrong and exits 1 (2 for a
usage error), with the traceback only under --debug.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import EdgequantError, TidlFallbackWarning, UsageError
from ..core.files import atomic_path, check_writable
from ..core.version import __version__
from ..demo.training import accuracy, cache_dir, float_digits_model, train_epochs
from ..export.devices import DEVICES
from ..export.tidl_check import tidl_check
from ..numerics.scheme import PRESETS
from ..surgery.distill import DistillConfig, finetune_adapted
from ..surgery.replacements import BY_NAME
from ..wrappers.ptq import ESTIMATORS, PTQConfig, PTQModule
from ..wrappers.qat import QATConfig, QATModule
from ..wrappers.schedule import FreezeSchedule
from . import detection
from .common import export_summary, indented, note, print_summary, scheme_of
from .detection import is_detection
from .loading import DIGITS, RESIZE_MODES, ImageData, is_model_file, load_data, load_weights, resolve_model

EXAMPLE_BATCH = 16
# What the user can fix (every error edgequant raises on purpose, files) prints one line; anything
# else is a bug and says how to get its traceback.
EXPECTED_ERRORS = (OSError, EdgequantError)

Command = Callable[[argparse.Namespace], dict[str, Any]]


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def _is_torchvision(spec: str) -> bool:
    return spec.startswith("torchvision:")


def _model(args: argparse.Namespace, data: ImageData | None, weights_required: bool) -> nn.Module:
    """The float model with its weights; digits + torchvision + no weights uses the cached digits model."""
    num_classes = args.num_classes
    if num_classes is None and data is not None and _is_torchvision(args.model):
        num_classes = data.num_classes
    if args.weights is None and weights_required and not is_model_file(args.model):
        if getattr(args, "data", None) == DIGITS and _is_torchvision(args.model) and num_classes in (None, 10):
            name = args.model.partition(":")[2]
            resolve_model(args.model, 10)  # a clear error for unknown names before any training
            note(f"no --weights: using {name} trained on the digits (trained once, cached in {cache_dir()})")
            return float_digits_model(name)
        raise UsageError(
            f"--weights is required for `{args.command}`: quantizing random weights tells nothing about your model "
            "(only `--data digits` with a torchvision model has a built-in trained model)"
        )
    model = resolve_model(args.model, num_classes)
    if args.weights is not None:
        load_weights(model, args.weights)
    return model


def _data(args: argparse.Namespace, split: str, limit: int | None, shuffle: bool = False) -> ImageData:
    return load_data(
        args.data, split, args.input_size, args.mean, args.std, args.batch_size, limit, shuffle, args.resize
    )


def _eval_data(args: argparse.Namespace) -> ImageData:
    source = args.eval_data or args.data
    if args.eval_data is None and args.data != DIGITS:
        note(f"evaluating on {args.data} itself; pass --eval-data for a held-out folder")
    return load_data(
        source, "test", args.input_size, args.mean, args.std, args.batch_size, args.limit, resize=args.resize
    )


def _example_inputs(data: ImageData) -> tuple[torch.Tensor, ...]:
    batch = next(iter(data.loader))
    return (batch[0][:EXAMPLE_BATCH],)


def _run_once(model: nn.Module, example: tuple[torch.Tensor, ...], spec: str) -> object:
    """One forward pass, so that a model built for another input size fails here, in CLI terms."""
    try:
        with torch.no_grad():
            return model(*example)
    except Exception as error:
        shape = "x".join(str(d) for d in example[0].shape[1:])
        raise UsageError(
            f"{spec} does not run on {shape} inputs ({_one_line(error)}); set --input-size "
            "(and --channels for `check`) to what the model was built for"
        ) from None


def _classes_out(model: nn.Module, example: tuple[torch.Tensor, ...], spec: str) -> int | None:
    """The number of classes a classifier predicts, or None when the output is not (N, classes) logits."""
    out = _run_once(model, example, spec)
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return out.shape[1]
    return None


def _check_labels(classes: int, data: ImageData, spec: str) -> None:
    if classes != data.num_classes:
        fix = "pass --num-classes" if _is_torchvision(spec) else "build the model with as many outputs"
        raise UsageError(
            f"the model predicts {classes} classes but {data.description} has {data.num_classes}; "
            f"{fix} {data.num_classes}, or evaluate on matching data"
        )


def _top1(model: nn.Module, data: ImageData, desc: str) -> float:
    return accuracy(model, tqdm(data.loader, desc=desc, leave=False, disable=None))


def _float_top1(model: nn.Module, data: ImageData, classes: int) -> float:
    """Float top-1, with a loud note when it is near chance: then the preprocessing is the suspect."""
    top1 = _top1(model, data, "evaluate float")
    chance = 100.0 / classes
    if classes > 1 and top1 < 2 * chance:
        note(
            f"WARNING: the float model's top-1 is {top1:.1f} %, near chance ({chance:.1f} % for {classes} classes). "
            "The data probably does not reach the model as it did in training: check --input-size, --mean, "
            "--std and --channels (and --weights). Quantizing anyway; the result will mean little"
        )
    return top1


def _table(rows: Sequence[tuple[str, float]]) -> str:
    """Top-1 rows, the first being float, each later one with its change against float."""
    width = max(len(label) for label, _ in rows) + 2
    reference = rows[0][1]
    lines = [f"  {'':<{width}}{'top-1 %':>9}{'vs float':>10}"]
    for i, (label, value) in enumerate(rows):
        delta = f"{value - reference:+10.2f}" if i else ""
        lines.append(f"  {label:<{width}}{value:>9.2f}{delta}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    """`edgequant demo`: the `make demo` run, for users who installed the package only."""
    from ..demo.job import run

    if not args.json:
        return run(args.model, args.epochs, args.lr, args.out)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
        return run(args.model, args.epochs, args.lr, args.out)


def cmd_check(args: argparse.Namespace) -> dict[str, Any]:
    """`edgequant check`: guideline findings before any quantization is tried."""
    from ..diagnose.guidelines import check, checked_codes, format_findings

    model = _model(args, None, weights_required=False)
    if args.weights is None:
        note("no --weights: checking the architecture of a randomly initialised model")
    example = (torch.randn(2, args.channels, args.input_size, args.input_size),)
    _run_once(model, example, args.model)
    findings = check(model, example_inputs=example, device=args.device)
    if not args.json:
        print(format_findings(findings, checked_codes(optimizer=False, example_inputs=True, device=bool(args.device))))
    report = None
    if args.device is not None:
        report = _tidl_import_check(model, example, args.device)
        if not args.json:
            print()
            print(report)
    return {
        "command": "check",
        "model": args.model,
        "weights": args.weights,
        "findings": [f.to_dict() for f in findings],
        "tidl_check": report.to_dict() if report else None,
    }


def _tidl_import_check(model: nn.Module, example: tuple[torch.Tensor, ...], device: str) -> Any:
    """TIDL's import rules on the model as edgequant would export it (random inputs calibrate it)."""
    import tempfile

    qmodel = PTQModule(model, example, device=device).calibrate([example], progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        return qmodel.export(Path(tmp) / "model.onnx").tidl_check


def cmd_adapt(args: argparse.Namespace) -> dict[str, Any]:
    """`edgequant adapt`: model surgery for a device, distillation from the original, the adapted model saved."""
    from ..surgery.adapt import adapt, default_replacements

    if is_detection(args):
        raise UsageError("`edgequant adapt` takes classifiers; adapt a detector in Python: eq.adapt(detector, ...)")
    start = time.perf_counter()
    check_writable(args.output)
    report_path = args.report or args.output.with_suffix(".adapt.json")
    check_writable(report_path)
    train = _data(args, "train", args.limit, shuffle=True)
    evaluation = _eval_data(args)
    model = _model(args, evaluation, weights_required=True)
    example = _example_inputs(train)
    classes = _classes_out(model, example, args.model)
    chosen = None if args.replacements is None else [r for r in args.replacements.split(",") if r]
    if args.add:
        chosen = sorted(default_replacements(args.device) | set(args.add.split(",")))
    adapted, report = adapt(model, args.device, example, chosen)
    top1: list[tuple[str, float]] = []
    if classes is not None:
        _check_labels(classes, evaluation, args.model)
        top1 += [
            ("original", _float_top1(model, evaluation, classes)),
            ("adapted", _top1(adapted, evaluation, "adapted")),
        ]
    if args.epochs and not report.exact:
        config = DistillConfig(epochs=args.epochs, **({} if args.lr is None else {"lr": args.lr}))
        finetune_adapted(adapted, model, train.loader, config)
        if classes is not None:
            top1.append((f"fine-tuned ({args.epochs} epochs)", _top1(adapted, evaluation, "fine-tuned")))
    with atomic_path(args.output) as tmp:
        torch.save(adapted, tmp)
    report.save(report_path)
    seconds = time.perf_counter() - start
    body = [str(report), ""]
    if top1:
        body += [f"  evaluation: {evaluation.description}", _table(top1), ""]
    body += [
        f"  wrote {args.output} (the whole model: edgequant ptq {args.output} ..., or torch.load(path, "
        "weights_only=False)) and the report "
        f"{report_path}",
        f"  time {seconds:.1f} s",
    ]
    print_summary(args, [f"edgequant adapt: {args.model} for {args.device}", *body])
    return {
        "command": "adapt",
        "model": args.model,
        "device": args.device,
        "report": report.to_dict(),
        "top1": dict(top1) or None,
        "output": str(args.output),
        "report_path": str(report_path),
        "seconds": seconds,
    }


def cmd_tidl_check(args: argparse.Namespace) -> dict[str, Any]:
    """`edgequant tidl-check`: which nodes of an ONNX file TIDL runs on the accelerator, and why not the others."""
    report = tidl_check(args.onnx, args.device)
    if not args.json:
        print(report)
    return {"command": "tidl-check", "onnx": str(args.onnx), **report.to_dict()}


def _ptq_command(args: argparse.Namespace, high_precision: Sequence[str]) -> str:
    """The `edgequant ptq` line that applies an analysis' recommendation to the same model and data."""
    words = ["edgequant", "ptq", args.model]
    options = {
        "--weights": args.weights,
        "--num-classes": args.num_classes,
        "--data": args.data,
        "--eval-data": args.eval_data,
        "--input-size": args.input_size,
        "--mean": ",".join(map(str, args.mean)) if args.mean else None,
        "--std": ",".join(map(str, args.std)) if args.std else None,
        "--resize": args.resize if args.resize != "crop" else None,
    }
    for flag, value in options.items():
        if value is not None:
            words += [flag, str(value)]
    words += ["--scheme", args.scheme, "--high-precision", ",".join(high_precision), "-o", "model.onnx"]
    return shlex.join(words)


def cmd_analyze(args: argparse.Namespace) -> dict[str, Any]:
    """`edgequant analyze`: whether the 8-bit loss is quantization, and which layers to keep in 16 bit."""
    from ..diagnose.analysis import analyze

    if is_detection(args):
        return detection.analyze(args)
    start = time.perf_counter()
    if args.html:
        check_writable(args.html)
    calib = _data(args, "train", args.calib_samples)
    evaluation = _eval_data(args)
    model = _model(args, evaluation, weights_required=True)  # the labelled set decides the class count
    example = _example_inputs(calib)
    classes = _classes_out(model, example, args.model)
    if classes is not None:
        _check_labels(classes, evaluation, args.model)
    report = analyze(
        model, calib.loader, example, scheme=args.scheme, eval_data=evaluation.loader, tolerance=args.tolerance
    )
    if args.html:
        report.save(args.html)
    body = [str(report)]
    recommended = list(report.recommended_high_precision)
    if recommended:
        body += ["", "to export with these layers in 16 bit:", f"  {_ptq_command(args, recommended)}"]
    if args.html:
        body.append(f"wrote {args.html}")
    body.append(f"time {time.perf_counter() - start:.1f} s")
    print_summary(args, body)  # the report names the scheme and the data itself
    return {
        "command": "analyze",
        "model": args.model,
        "weights": args.weights,
        "html": str(args.html) if args.html else None,
        "report": report.to_dict(),
    }


def cmd_ptq(args: argparse.Namespace) -> dict[str, Any]:
    """`edgequant ptq`: calibrate, evaluate, export; the quickest way to a deployable file."""
    if is_detection(args):
        return detection.ptq(args)
    start = time.perf_counter()
    check_writable(args.output)
    scheme = scheme_of(args)
    calib = _data(args, "train", args.calib_samples)
    evaluation = _eval_data(args)
    model = _model(args, evaluation, weights_required=True)  # the labelled set decides the class count
    example = _example_inputs(calib)
    classes = _classes_out(model, example, args.model)
    top1: dict[str, float] = {}
    if classes is None:
        note("the model's output is not (N, classes) logits; skipping the accuracy evaluation")
    else:
        _check_labels(classes, evaluation, args.model)
        top1["float"] = _float_top1(model, evaluation, classes)
    qmodel = PTQModule(model, example, scheme, PTQConfig(range_estimator=args.range_estimator), device=args.device)
    qmodel.calibrate(calib.loader)
    if classes is not None:
        top1["quantized"] = _top1(qmodel, evaluation, f"evaluate {scheme.name}")
    result = qmodel.export(args.output)
    seconds = time.perf_counter() - start
    body = [f"  calibration: {calib.description}"]
    if top1:
        body += [f"  evaluation:  {evaluation.description}", ""]
        body.append(_table([("float (torch)", top1["float"]), (f"{scheme.name} (torch)", top1["quantized"])]))
    body += ["", *indented(result), f"  time {seconds:.1f} s"]
    print_summary(args, [f"edgequant ptq: {args.model}, scheme {scheme.name}", *body])
    return {
        "command": "ptq",
        "model": args.model,
        "weights": args.weights,
        "scheme": scheme.name,
        "calibration_samples": calib.size,
        "evaluation_samples": evaluation.size if top1 else 0,
        "top1": top1 or None,
        **export_summary(result),
        "seconds": seconds,
    }


def cmd_qat(args: argparse.Namespace) -> dict[str, Any]:
    """`edgequant qat`: QAT of a classifier (or a detector, on the canvases) without writing a training loop."""
    if is_detection(args):
        return detection.qat(args)
    start = time.perf_counter()
    check_writable(args.output)
    scheme = scheme_of(args)
    train = _data(args, "train", args.limit, shuffle=True)
    evaluation = _eval_data(args)
    model = _model(args, train, weights_required=True)
    example = _example_inputs(train)
    classes = _classes_out(model, example, args.model)
    if classes is None:
        raise UsageError(
            "the built-in QAT loop trains classifiers (output: N x classes logits); for other models "
            "wrap them with eq.QATModule in your own training loop (docs/qat.md)"
        )
    _check_labels(classes, train, args.model)
    _check_labels(classes, evaluation, args.model)
    float_top1 = _float_top1(model, evaluation, classes)
    # QAT starts from the PTQ recipe, calibrated on the first 256 training images.
    calib = list(itertools.islice(train.loader, max(1, 256 // (train.loader.batch_size or 1))))
    config = QATConfig(FreezeSchedule(args.epochs))
    qmodel = QATModule(model, example, scheme, config, calibration_data=calib, device=args.device)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    train_epochs(qmodel, train.loader, args.epochs, optimizer, "QAT")
    quant_top1 = _top1(qmodel.convert(), evaluation, f"evaluate {scheme.name}")
    result = qmodel.export(args.output)
    seconds = time.perf_counter() - start
    body = [
        f"  training:   {train.description}, {args.epochs} epochs, SGD lr {args.lr:g}, momentum {args.momentum:g}, "
        f"weight decay {args.weight_decay:g}",
        f"  evaluation: {evaluation.description}",
        "",
        _table([("float (torch)", float_top1), (f"QAT {scheme.name} (integer, torch)", quant_top1)]),
        "",
        *indented(result),
        f"  time {seconds:.1f} s",
    ]
    print_summary(args, [f"edgequant qat: {args.model}, scheme {scheme.name}", *body])
    return {
        "command": "qat",
        "model": args.model,
        "weights": args.weights,
        "scheme": scheme.name,
        "epochs": args.epochs,
        "lr": args.lr,
        "training_samples": train.size,
        "evaluation_samples": evaluation.size,
        "top1": {"float": float_top1, "quantized": quant_top1},
        **export_summary(result),
        "seconds": seconds,
    }


MODEL_HELP = """\
MODEL is torchvision:NAME (random init, --num-classes outputs; weights are never
downloaded) or package.module:factory / path/to/file.py:factory for your own code
(factory() is called, with num_classes=N only when --num-classes is given), or a
.pt file holding a whole model (as `edgequant adapt` writes it).
"""

DATA_HELP = """\
--data is an image folder in torchvision's ImageFolder layout (DATA/<class>/<image>),
resized so the short side is 8/7 of --input-size (--resize none: not resized),
center-cropped and normalized with --mean / --std; or the word `digits` for the bundled 8x8 digits, upsampled to
--input-size (default 32) and normalized to [-1, 1]. With digits, calibration and
training use its train split and evaluation its test split. `canvases` is the bundled
detection task (digits on 128x128 canvases, docs/detection.md) for detectors: MODEL
canvas:ssdlite|retinanet|fcos (trained once and cached without --weights) or a
torchvision SSD / RetinaNet / FCOS with --weights; accuracy is then COCO mAP.
"""

SCHEMES = ", ".join(PRESETS)

EPILOGS = {
    "demo": """\
examples:
  edgequant demo                      # resnet18, 3 QAT epochs, files in build/demo
  edgequant demo --model mobilenet_v2 --epochs 5 --out /tmp/demo
""",
    "check": f"""\
{MODEL_HELP}
examples:
  edgequant check torchvision:mobilenet_v2
  edgequant check mypackage.models:build_net --weights net.pt --input-size 320
  edgequant check torchvision:resnet18 --json > findings.json
  edgequant check torchvision:mobilenet_v3_small --device AM62A   # + TIDL's import rules
""",
    "adapt": f"""\
{MODEL_HELP}
{DATA_HELP}
Replacements (docs/surgery.md): {", ".join(BY_NAME)}. Without --replacements, the
device's: all of them on TDA4VM (as TI's lite models), the exact ones elsewhere (and on
AM62A the activations it has no look-up tables for). Approximate replacements are then
distilled from the original for --epochs on the --data images. OUTPUT holds the whole
adapted model; pass it as MODEL to `edgequant ptq` / `qat`.

examples:
  edgequant adapt torchvision:mobilenet_v3_small --data digits --device TDA4VM -o mnv3_lite.pt
  edgequant ptq mnv3_lite.pt --data digits --device TDA4VM -o mnv3_lite.onnx
  edgequant adapt torchvision:efficientnet_b0 --weights b0.pt --data train/ --device AM68A \
      --add silu -o b0_am68a.pt
""",
    "tidl-check": """\
Rules from TI's docs/supported_ops_rts_versions.md (edgeai-tidl-tools): supported ops,
conv kernel / stride / depthwise limits, ConvTranspose, Resize, Reshape, Gather, Q/DQ
axis, dynamic dimensions, dimension counts, and the device-specific ones. A node that
breaks one runs on the ARM core instead of the accelerator.

examples:
  edgequant tidl-check model.tidl.onnx --device AM62A
  edgequant tidl-check model.onnx --device TDA4VM --json
""",
    "analyze": f"""\
{MODEL_HELP}
{DATA_HELP}
examples:
  edgequant analyze torchvision:resnet18 --data digits
  edgequant analyze torchvision:resnet50 --weights r50.pt --data imagenet/train \\
      --eval-data imagenet/val --limit 2000 --html report.html
""",
    "ptq": f"""\
{MODEL_HELP}
{DATA_HELP}
Writes OUTPUT (QDQ ONNX, dynamic batch, checked in onnxruntime against the integer
torch model) and, for --device, the files TIDL takes: .tidl.onnx (static shapes),
.options.json, and .quant_params.prototxt (our ranges) when some layers are 16-bit.
Schemes: {SCHEMES}.

examples:
  edgequant ptq torchvision:resnet18 --data digits -o resnet18.onnx          # TDA4VM, int8_pow2
  edgequant ptq torchvision:mobilenet_v2 --data digits --device AM68A \
      --high-precision first_last -o mnv2.onnx                            # int8, 16-bit ends
  edgequant ptq torchvision:mobilenet_v2 --weights mnv2.pt --num-classes 5 \\
      --data flowers/train --eval-data flowers/val --scheme int8_pow2_dw -o mnv2.onnx
  edgequant ptq mypackage.models:build_net --weights net.pt --data calib/ \\
      --high-precision backbone.conv1,head.fc -o net.onnx --json
""",
    "qat": f"""\
{MODEL_HELP}
{DATA_HELP}
The built-in loop fits classifiers: cross-entropy, SGD with momentum, the QAT
freezing schedule over --epochs (docs/qat.md), no augmentation. For anything else
wrap the model with eq.QATModule in your own training loop.

examples:
  edgequant qat torchvision:resnet18 --data digits --epochs 3 --lr 2e-3 -o resnet18_qat.onnx
  edgequant qat torchvision:mobilenet_v2 --weights mnv2.pt --num-classes 5 \\
      --data flowers/train --eval-data flowers/val --epochs 5 --lr 1e-3 -o mnv2_qat.onnx
""",
}


def _floats3(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _common_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def _model_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("model", metavar="MODEL", help="torchvision:NAME or package.module:factory")
    parser.add_argument("--weights", metavar="W", help="checkpoint file holding the model's state_dict")
    parser.add_argument(
        "--num-classes",
        type=_positive,
        metavar="N",
        help="outputs of a torchvision model (default: the classes of the labelled data, else torchvision's)",
    )
    return parser


def _data_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--data",
        required=True,
        metavar="D",
        help="image folder (ImageFolder layout), `digits` or `canvases` (detection)",
    )
    parser.add_argument(
        "--eval-data", metavar="E", help="held-out image folder for evaluation (default: digits test split / --data)"
    )
    parser.add_argument(
        "--input-size", type=_positive, metavar="S", help="square input size (default: 32 for digits, 224 for folders)"
    )
    parser.add_argument(
        "--mean", type=_floats3, metavar="R,G,B", help="normalization mean for folders (default: ImageNet's)"
    )
    parser.add_argument(
        "--std", type=_floats3, metavar="R,G,B", help="normalization std for folders (default: ImageNet's)"
    )
    parser.add_argument(
        "--resize",
        choices=list(RESIZE_MODES),
        default="crop",
        help="folders: `crop` resizes the short side to 8/7 of --input-size, then center-crops (default); "
        "`none` only center-crops, for images already at the input size",
    )
    parser.add_argument("--batch-size", type=_positive, default=64, metavar="B", help="batch size (default: 64)")
    parser.add_argument(
        "--limit", type=_positive, metavar="N", help="use at most N images for training and evaluation (default: all)"
    )
    return parser


def _scheme_options(parser: argparse.ArgumentParser, eight_bit_only: bool = False) -> None:
    names = [n for n, s in PRESETS.items() if not eight_bit_only or (s.weight_bits, s.activation_bits) == (8, 8)]
    if eight_bit_only:
        parser.add_argument(
            "--scheme", default="int8_pow2", choices=names, metavar="S", help=f"{', '.join(names)} (default: int8_pow2)"
        )
        return
    parser.add_argument(
        "--scheme",
        choices=names,
        metavar="S",
        help=f"{', '.join(names)} (default: the device's, int8_pow2 on TDA4VM and without --device, else int8)",
    )
    _device_option(parser, "the TIDL device to export for (default: TDA4VM for power-of-2 schemes, else AM68A)")
    parser.add_argument(
        "--high-precision",
        metavar="NAMES",
        help="comma-separated module names to run in 16 bit, or first_last (see `edgequant analyze`)",
    )


def _device_option(parser: argparse.ArgumentParser, help_text: str, required: bool = False) -> None:
    parser.add_argument(
        "--device", type=str.upper, choices=list(DEVICES), required=required, metavar="DEV", help=help_text
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (exposed for the docs and the tests)."""
    parser = argparse.ArgumentParser(
        prog="edgequant",
        description="Quantize PyTorch CNNs for fixed-point edge engines: check, analyze, PTQ, QAT, QDQ ONNX export.",
        epilog="Run `edgequant COMMAND --help` for the options and examples of each command.",
    )
    parser.add_argument("--version", action="version", version=f"edgequant {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common, model, data = _common_options(), _model_options(), _data_options()

    def add(name: str, help_text: str, run: Command, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOGS[name],
            parents=parents,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(run=run)
        return sub

    demo = add("demo", "train, QAT, export and check a digits model end to end (`make demo`)", cmd_demo, [common])
    demo.add_argument("--model", default="resnet18", help="torchvision classifier name (default: resnet18)")
    demo.add_argument("--epochs", type=_positive, default=3, help="QAT epochs (default: 3)")
    demo.add_argument("--lr", type=float, default=5e-3, help="QAT learning rate (default: 5e-3)")
    demo.add_argument("--out", type=Path, default=Path("build/demo"), help="output folder (default: build/demo)")

    check = add("check", "list the quantization-guideline findings for a model", cmd_check, [model, common])
    check.add_argument("--input-size", type=_positive, default=224, metavar="S", help="input size (default: 224)")
    check.add_argument("--channels", type=_positive, default=3, metavar="C", help="input channels (default: 3)")
    _device_option(check, "also list what `edgequant adapt` would change and check TIDL's import rules on the export")

    surgery = add(
        "adapt",
        "replace what a TIDL device runs badly (model surgery) and distill the adapted model from the original",
        cmd_adapt,
        [model, data, common],
    )
    _device_option(surgery, "the TIDL device to adapt the model for", required=True)
    which = surgery.add_mutually_exclusive_group()
    which.add_argument(
        "--replacements", metavar="NAMES", help="comma-separated replacements to make (default: the device's)"
    )
    which.add_argument("--add", metavar="NAMES", help="comma-separated replacements to make besides the device's")
    surgery.add_argument(
        "--epochs", type=int, default=5, metavar="N", help="distillation epochs, 0 for none (default: 5)"
    )
    surgery.add_argument(
        "--lr", type=float, metavar="LR", help=f"distillation learning rate (default: {DistillConfig().lr:g}, AdamW)"
    )
    surgery.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT", help="adapted model file (.pt)")
    surgery.add_argument("--report", type=Path, metavar="PATH", help="report JSON (default: OUTPUT with .adapt.json)")

    tidl = add(
        "tidl-check",
        "list the nodes of an ONNX file that TIDL will not run on its accelerator",
        cmd_tidl_check,
        [common],
    )
    tidl.add_argument("onnx", type=Path, metavar="ONNX", help="a QDQ ONNX file (as edgequant exports it)")
    _device_option(tidl, "the TIDL device whose rules apply", required=True)

    analyze = add(
        "analyze",
        "compare float, int16 and 8-bit accuracy and find the layers to keep in 16 bit",
        cmd_analyze,
        [model, data, common],
    )
    _scheme_options(analyze, eight_bit_only=True)
    analyze.add_argument(
        "--tolerance",
        type=float,
        default=0.5,
        metavar="PTS",
        help="points of top-1 agreement with float a model may lose and still count as close (default: 0.5)",
    )
    analyze.add_argument(
        "--calib-samples", type=_positive, default=256, metavar="N", help="calibration images (default: 256)"
    )
    analyze.add_argument("--html", type=Path, metavar="PATH", help="also write the report as HTML")

    ptq = add("ptq", "calibrate, evaluate and export a post-training-quantized model", cmd_ptq, [model, data, common])
    _scheme_options(ptq)
    ptq.add_argument(
        "--calib-samples", type=_positive, default=256, metavar="N", help="calibration images (default: 256)"
    )
    ptq.add_argument(
        "--range-estimator",
        default="auto",
        choices=list(ESTIMATORS),
        help="activation ranges (default: auto, which is sample_mse; see docs/ptq.md)",
    )
    ptq.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT", help="ONNX file to write")

    qat = add(
        "qat",
        "fine-tune a classifier or detector with quantization-aware training and export it",
        cmd_qat,
        [model, data, common],
    )
    _scheme_options(qat)
    qat.add_argument("--epochs", type=_positive, default=3, metavar="N", help="QAT epochs (default: 3)")
    qat.add_argument("--lr", type=float, default=2e-3, metavar="LR", help="SGD learning rate (default: 2e-3)")
    qat.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    qat.add_argument("--weight-decay", type=float, default=1e-4, metavar="WD", help="SGD weight decay (default: 1e-4)")
    qat.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT", help="ONNX file to write")
    return parser


@contextlib.contextmanager
def _quiet_internals(enabled: bool) -> Iterator[None]:
    """Silence torch.export / torch.onnx warnings and logged tracebacks about internals.

    A CLI user cannot act on them; what matters reaches the user as the error edgequant
    raises. The previous state is restored, so in-process callers keep theirs.
    """
    logger = logging.getLogger("torch")
    level = logger.level
    with warnings.catch_warnings():
        if enabled:
            warnings.filterwarnings("ignore", module=r"(torch|torchao|torchvision|onnx|onnxscript)(\.|$)")
            warnings.simplefilter("ignore", TidlFallbackWarning)  # the summary prints the import check
            logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgequant` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ["EDGEQUANT_DEBUG"] = "1"  # torch's own output during capture is shown, not held back
    try:
        with _quiet_internals(not args.debug):
            result = args.run(args)
    except KeyboardInterrupt:
        print(f"edgequant {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        expected = isinstance(error, EXPECTED_ERRORS)
        hint = "" if expected else f" ({type(error).__name__}; rerun with --debug for the traceback)"
        print(f"edgequant {args.command}: error: {_one_line(error)}{hint}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
