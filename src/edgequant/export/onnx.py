"""QDQ ONNX export, verified in onnxruntime before the file is put in place."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from google.protobuf.message import Message
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves

from ..core.errors import TidlFallbackWarning, UsageError
from ..core.files import atomic_path, check_writable, keep_as
from ..numerics.scheme import Scheme
from .devices import Device
from .parity import ParityError, ParityReport, compare, reexport, torch_outputs
from .runtime import run_onnx, session
from .tidl import DeployFiles, write_deploy_files
from .tidl_check import TidlCheckReport, tidl_check

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
    device: Device
    deploy: DeployFiles
    tidl_check: TidlCheckReport
    # For a detector: whether TIDL's post-processing, as the prototxt describes it, finds
    # the detections torchvision finds on the exported heads' outputs.
    detection_check: str | None = None

    @property
    def options_path(self) -> Path:
        return self.deploy.options

    @property
    def tidl_path(self) -> Path:
        return self.deploy.model

    @property
    def quant_params_path(self) -> Path | None:
        return self.deploy.quant_params

    def __str__(self) -> str:
        files = [self.tidl_path.name, self.options_path.name]
        files += [p.name for p in (self.quant_params_path, self.deploy.meta_arch) if p is not None]
        return (
            f"wrote {self.path} (opset {self.opset}) and, for {self.device.name}, {', '.join(files)}; {self.parity}\n"
            f"{self.tidl_check.summary}" + (f"\n{self.detection_check}" if self.detection_check else "")
        )


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
    if out_spec.type in (tuple, list) and all(child.is_leaf() for child in out_spec.children()):
        return model
    model.graph._codegen = torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(info.orig_args, info.in_spec, None))
    model.recompile()
    return model


def output_names(model: GraphModule) -> list[str]:
    """ONNX names for the model's outputs: "logits" for one tensor, the keys of a dict, else output_<i>."""
    info = getattr(model.graph._codegen, "pytree_info", None)  # torch.fx keeps the output structure here
    spec = getattr(info, "out_spec", None)
    if spec is None or spec.is_leaf():
        return ["logits"]
    if spec.type in (dict, OrderedDict) and all(child.is_leaf() for child in spec.children()):
        return [str(key) for key in spec.context]  # torchvision's segmentation models return an OrderedDict
    return [f"output_{i}" for i in range(spec.num_leaves)]


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
    device: Device,
    opset: int | None = None,
    eval_outputs: object = None,
    batch: int = 1,
    meta_arch: Message | None = None,
) -> ExportResult:
    """Export with a dynamic batch, check it in onnxruntime, then move it into place.

    Next to it go the files TIDL takes for `device` (see `tidl.py`): the model with a
    static `batch`, checked in onnxruntime too, its options and, for 16-bit layers, our ranges;
    for a detector, the `meta_arch` prototxt of its post-processing (see `meta_arch.py`).

    The file is written under a temporary name and renamed only after the parity
    check passes, so an interrupted or rejected export never clobbers a good file.
    """
    path = check_writable(path)
    opset = choose_opset(converted, opset)
    agreement = None if eval_outputs is None else check_eval(converted, example_inputs, eval_outputs)
    names = output_names(converted)
    converted = flatten_outputs(converted.eval())
    program, reference = reexport(converted, tuple(example_inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset, verbose=False)
    outputs = onnx_program.model.graph.outputs
    if len(outputs) == len(names) and len({id(v) for v in outputs}) == len(names):
        for value, name in zip(outputs, names, strict=True):
            value.name = name
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
    deploy, quantized = write_deploy_files(path, scheme, device, batch, meta_arch)
    check_static(deploy, path, example_inputs, batch)
    # TIDL's import rules on the static model with its Q/DQ (a 16-bit TIDL model itself is
    # float; facts such as a 16-bit ConvTranspose are read from the Q/DQ). An 8-bit one is
    # read from its file, which also finds the weights of a model saved with external data.
    report = tidl_check(deploy.model if deploy.quant_params is None else quantized, device)
    if report.fallback:
        warnings.warn(
            TidlFallbackWarning(f"{report.summary}. print(result.tidl_check) gives each node's rule and fix"),
            stacklevel=3,
        )
    return ExportResult(path, opset, parity, device, deploy, report)


def check_static(deploy: DeployFiles, path: Path, inputs: tuple[torch.Tensor, ...], batch: int) -> None:
    """Run the static TIDL model in onnxruntime: the same outputs as the exported file (8 bit), or finite ones.

    A float TIDL model (16-bit layers, ranges in the prototxt) cannot equal the QDQ
    file; it must run at its static shape and stay finite.
    """
    part = tuple(x[:batch] for x in inputs)
    if part[0].shape[0] != batch:
        return  # fewer samples than the static batch: nothing to feed it
    static = run_onnx(session(str(deploy.model)), part)
    if deploy.quant_params is None:
        dynamic = run_onnx(session(str(path)), part)
        same = all(a.shape == b.shape and (a == b).all() for a, b in zip(static, dynamic, strict=True))
        problem = None if same else "its outputs differ from the exported file's"
    else:
        problem = None if all(np.isfinite(a).all() for a in static) else "it computes non-finite outputs"
    if problem:
        raise ParityError(f"the static TIDL model {deploy.model.name} does not check out: {problem}")
