"""QDQ ONNX export, verified in onnxruntime before the file is put in place."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves

from ..core.errors import UsageError
from ..core.files import atomic_path, check_writable, keep_as
from ..numerics.scheme import Scheme
from .parity import ParityError, ParityReport, compare, reexport, torch_outputs
from .runtime import session
from .tidl import write_deploy_files

# Models whose weights take more bytes than this are saved by torch with external data.
EXTERNAL_DATA_BYTES = 1 << 30
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
        raise UsageError(f"opset {requested} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    if requested < needed:
        raise UsageError(f"opset {requested} cannot express int16 Q/DQ; use {INT16_OPSET} or newer")
    return requested


def flatten_outputs(model: GraphModule) -> GraphModule:
    """Make the graph return a flat tuple of tensors when it returns a dict or nested structure.

    ONNX outputs are a flat list; segmentation models return {"out": ..., "aux": ...}.
    The graph computes the flat leaves already; only the final regrouping is dropped.
    """
    codegen = model.graph._codegen  # torch.fx keeps the output structure in its (private) codegen
    info = getattr(codegen, "pytree_info", None)
    out_spec = getattr(info, "out_spec", None)
    if out_spec is None or out_spec.is_leaf():
        return model
    if out_spec.type in (tuple, list) and all(child.is_leaf() for child in out_spec.children_specs):
        return model
    model.graph._codegen = torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(info.orig_args, info.in_spec, None))
    model.recompile()
    return model


def check_eval(converted: GraphModule, inputs: tuple[torch.Tensor, ...], eval_outputs: object) -> tuple[float, float]:
    """(max |diff|, top-1 agreement) of the wrapper's eval outputs vs the converted model.

    Eval mode runs the integer model, so the two must be equal bit for bit; anything
    else means eval shows an accuracy that is not the exported model's.
    """
    expected = torch_outputs(converted, inputs)
    seen = tree_leaves(eval_outputs)
    worst, agree, total = 0.0, 0, 0
    for e, s in zip(expected, seen, strict=True):
        worst = max(worst, float((e - s).abs().max())) if e.numel() else worst
        if e.dim() >= 2 and e.shape[1] > 1:
            agree += int((e.argmax(1) == s.argmax(1)).reshape(e.shape[0], -1).all(1).sum())
            total += e.shape[0]
    if worst != 0.0:
        raise ParityError(
            f"eval mode of the wrapper differs from convert() by up to {worst:g}: the accuracy seen in eval "
            "would not be the exported model's. Please report this as a bug."
        )
    return worst, agree / total if total else 1.0


def export_onnx(
    converted: GraphModule,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    scheme: Scheme,
    opset: int | None = None,
    eval_outputs: object = None,
) -> ExportResult:
    """Export with a dynamic batch, check it in onnxruntime, then move it into place.

    Next to the model it writes the TIDL options file (and, for 16-bit layers, the
    8-bit-only model TIDL imports); see `tidl.py`.

    The file is written under a temporary name and renamed only after the parity
    check passes, so an interrupted or rejected export never clobbers a good file.
    """
    path = check_writable(path)
    opset = choose_opset(converted, opset)
    agreement = None if eval_outputs is None else check_eval(converted, example_inputs, eval_outputs)
    converted = flatten_outputs(converted.eval())
    program, reference = reexport(converted, tuple(example_inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset, verbose=False)
    # Past 2 GB torch writes the weights as a side file named after the model file, which
    # a nameless temporary cannot have: such models use a named hidden temporary.
    size = sum(t.numel() * t.element_size() for t in (*converted.parameters(), *converted.buffers()))
    with atomic_path(path, anonymous=size < EXTERNAL_DATA_BYTES) as tmp:
        onnx_program.save(str(tmp))
        del onnx_program  # its in-memory copy of the weights; onnxruntime reads the file
        try:
            parity = compare(str(tmp), reference, tuple(example_inputs), session(str(tmp)))
            if agreement is not None:
                parity = replace(parity, eval_agreement=agreement)
        except ParityError as error:
            # Keep the disagreeing file for inspection, under a name nobody deploys by accident.
            rejected = path.with_name(f"{path.stem}.rejected.onnx")
            keep_as(tmp, rejected)
            raise ParityError(f"{error}\nThe rejected file is kept at {rejected}.") from None
    options_path, tidl_path = write_deploy_files(path, scheme)
    return ExportResult(path, opset, parity, options_path, tidl_path)
