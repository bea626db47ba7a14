"""QDQ ONNX export, verified in onnxruntime before the file is put in place."""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.fx import GraphModule

from .parity import ParityError, ParityReport, compare, reexport, session
from .scheme import Scheme
from .tidl import write_deploy_files

# The dynamo exporter starts at 18; int16 QuantizeLinear / DequantizeLinear need 21.
MIN_OPSET, INT16_OPSET, MAX_OPSET = 18, 21, 23


@dataclass(frozen=True)
class ExportResult:
    """What `export()` wrote, and how onnxruntime compared."""

    path: Path
    opset: int
    parity: ParityReport
    options_path: Path
    tidl_path: Path | None = None

    def __str__(self) -> str:
        tidl = f", {self.tidl_path.name} for TIDL" if self.tidl_path else ""
        return f"wrote {self.path} (opset {self.opset}) with {self.options_path.name}{tidl}; {self.parity}"


def _uses_int16(model: GraphModule) -> bool:
    for node in model.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("quantized_decomposed."):
            if torch.int16 in node.args or torch.int16 in node.kwargs.values():
                return True
    return False


def choose_opset(model: GraphModule, requested: int | None) -> int:
    """The lowest opset that can hold the graph, or the requested one if it can."""
    needed = INT16_OPSET if _uses_int16(model) else MIN_OPSET
    if requested is None:
        return needed
    if not MIN_OPSET <= requested <= MAX_OPSET:
        raise ValueError(f"opset {requested} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    if requested < needed:
        raise ValueError(f"opset {requested} cannot express int16 Q/DQ; use {INT16_OPSET} or newer")
    return requested


def _check_destination(path: Path) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write {path}: directory {parent} is not writable")


def export_onnx(
    converted: GraphModule,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    scheme: Scheme,
    opset: int | None = None,
) -> ExportResult:
    """Export with a dynamic batch, check it in onnxruntime, then move it into place.

    Next to the model it writes the TIDL options file (and, for 16-bit layers, the
    8-bit-only model TIDL imports); see `tidl.py`.

    The file is written under a temporary name and renamed only after the parity
    check passes, so an interrupted or rejected export never clobbers a good file.
    """
    path = Path(path)
    _check_destination(path)
    converted.eval()
    opset = choose_opset(converted, opset)
    program, reference = reexport(converted, tuple(example_inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset, verbose=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx_program.save(tmp)
        parity = compare(tmp, reference, tuple(example_inputs), session(tmp))
    except ParityError as error:
        # Keep the disagreeing file for inspection, under a name nobody deploys by accident.
        rejected = path.with_name(f"{path.stem}.rejected.onnx")
        os.replace(tmp, rejected)
        raise ParityError(f"{error}\nThe rejected file is kept at {rejected}.") from None
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    options_path, tidl_path = write_deploy_files(path, scheme)
    return ExportResult(path, opset, parity, options_path, tidl_path)
