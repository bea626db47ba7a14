"""PTQModule: post-training quantization from a few hundred unlabelled samples."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn
from torch.fx import GraphModule
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
from tqdm.auto import tqdm

from .batchnorm import set_graph_training
from .capture import capture
from .convert import convert
from .export import ExportResult, export_onnx
from .observers import RangeObserver
from .quantizer import EdgeQuantizer
from .scheme import Scheme, get_scheme


def _inputs_of(batch: object) -> tuple[torch.Tensor, ...]:
    """The model inputs of a batch: a tensor, or the first item of an (inputs, labels) pair."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)
    raise TypeError(f"calibration batches must be tensors or (inputs, labels) pairs, got {type(batch).__name__}")


class PTQModule(nn.Module):
    """Post-training quantization wrapper: BN folded, ranges calibrated, no labels, no backprop.

    In train mode (the state after construction) each forward pass observes ranges
    and returns the float result; `calibrate(data)` does that over a loader and
    switches to eval mode, where forward runs the quantized integer model.
    """

    def __init__(
        self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...], scheme: str | Scheme = "int8_pow2"
    ) -> None:
        super().__init__()
        self.scheme = get_scheme(scheme)
        self.example_inputs = tuple(x.detach().clone() for x in example_inputs)
        graph = capture(model, self.example_inputs)
        self.model: GraphModule = prepare_pt2e(graph, EdgeQuantizer(self.scheme, qat=False))
        set_graph_training(self.model, dropout=False, batchnorm=False)
        self.register_buffer("calibrated_samples", torch.tensor(0, dtype=torch.int64))
        self._quantized: GraphModule | None = None

    def observers(self) -> list[RangeObserver]:
        return [m for m in self.model.modules() if isinstance(m, RangeObserver)]

    def train(self, mode: bool = True) -> PTQModule:
        # torchao's prepared graph refuses nn.Module.train(); only the flag matters here.
        for module in self.modules():
            module.training = mode
        return self

    @torch.no_grad()
    def calibrate(self, data: Iterable, skip_nonfinite: bool = False, progress: bool = True) -> PTQModule:
        """Observe ranges over `data` (tensors or (inputs, labels) batches), then switch to eval.

        Batches with NaN or Inf raise ValueError, or are skipped with `skip_nonfinite=True`.
        """
        self.train()
        seen = skipped = 0
        for index, batch in enumerate(tqdm(data, desc="calibrate", leave=False, disable=None if progress else True)):
            inputs = _inputs_of(batch)
            if not all(bool(torch.isfinite(x).all()) for x in inputs):
                if skip_nonfinite:
                    skipped += 1
                    continue
                raise ValueError(
                    f"calibration batch {index} contains NaN or Inf; clean the data or pass skip_nonfinite=True"
                )
            self(*inputs)
            seen += 1
        if seen == 0:
            detail = f" ({skipped} batches skipped as non-finite)" if skipped else ""
            raise ValueError(f"calibration data yielded no usable batch{detail}; is the loader empty or exhausted?")
        return self.eval()

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._quantized = None
            self.calibrated_samples += args[0].shape[0]
            return self.model(*args)
        if not int(self.calibrated_samples):
            raise RuntimeError("PTQModule has no ranges yet: call calibrate(data) (or run batches in train mode) first")
        if self._quantized is None:
            self._quantized = self.convert()
        return self._quantized(*args)

    def convert(self) -> GraphModule:
        """The integer model: BN folded, int8 weights, int32 biases, Q/DQ activations."""
        return convert(self.model)

    def export(self, path: str | os.PathLike, opset: int | None = None) -> ExportResult:
        """Write QDQ ONNX and check it in onnxruntime against `convert()` on the example inputs."""
        return export_onnx(self.convert(), self.example_inputs, path, self.scheme, opset)
