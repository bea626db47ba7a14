"""What every `edgequant` subcommand shares: notes on stderr, the scheme from the options, the summary."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..export.devices import target_scheme
from ..export.onnx import ExportResult
from ..numerics.scheme import Scheme


def note(message: str) -> None:
    """A remark for the user on stderr, kept apart from the summary (and from --json's stdout)."""
    print(f"edgequant: note: {message}", file=sys.stderr, flush=True)


def scheme_of(args: argparse.Namespace) -> Scheme:
    """The scheme --scheme / --device / --high-precision name."""
    scheme, _ = target_scheme(args.scheme, getattr(args, "device", None))
    if not args.high_precision:
        return scheme
    if args.high_precision == "first_last":
        return scheme.with_high_precision("first_last")
    return scheme.with_high_precision([name.strip() for name in args.high_precision.split(",") if name.strip()])


def export_summary(result: ExportResult) -> dict[str, Any]:
    parity = result.parity
    return {
        "onnx": str(result.path),
        "device": result.device.name,
        "options": str(result.options_path),
        "tidl_onnx": str(result.tidl_path),
        "quant_params": str(result.quant_params_path) if result.quant_params_path else None,
        "meta_arch": str(result.deploy.meta_arch) if result.deploy.meta_arch else None,
        "detection_check": result.detection_check,
        "tidl_check": result.tidl_check.to_dict(),
        "opset": result.opset,
        "parity": {
            "max_abs_diff": parity.max_abs_diff,
            "top1_agreement": parity.top1_agreement,
            "samples": parity.samples,
            "rounding_only": parity.rounding is not None,
        },
    }


def indented(result: ExportResult) -> list[str]:
    """The export's own summary, indented under the command's."""
    return [f"  {line}" for line in str(result).splitlines()]


def print_summary(args: argparse.Namespace, lines: Sequence[str]) -> None:
    """The human-readable summary, after the progress bars; --json prints data instead."""
    if not args.json:
        print()
        print("\n".join(lines))
