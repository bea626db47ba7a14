"""What the PTQ and QAT wrappers share: scheme, example inputs, convert and export."""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.fx import GraphModule

from .convert import convert
from .export import ExportResult, export_onnx
from .scheme import Scheme, get_scheme


class QuantWrapper(nn.Module):
    """Base of `PTQModule` and `QATModule`; `self.model` is the prepared graph."""

    model: GraphModule

    def __init__(self, example_inputs: tuple[torch.Tensor, ...], scheme: str | Scheme) -> None:
        super().__init__()
        self.scheme = get_scheme(scheme)
        self.example_inputs = tuple(x.detach().clone() for x in example_inputs)

    def _set_training_flags(self, mode: bool) -> None:
        # torchao's prepared graphs refuse nn.Module.train(); set the flags directly.
        for module in self.modules():
            module.training = mode

    def convert(self) -> GraphModule:
        """The integer model: BN folded, int8 weights, int32 biases, Q/DQ activations."""
        return convert(self.model)

    def export(self, path: str | os.PathLike, opset: int | None = None) -> ExportResult:
        """Write QDQ ONNX (plus TIDL files) after checking it in onnxruntime against `convert()`."""
        return export_onnx(self.convert(), self.example_inputs, path, self.scheme, opset)
