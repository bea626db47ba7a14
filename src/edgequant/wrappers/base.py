"""What the PTQ and QAT wrappers share: scheme, example inputs, checkpoints, convert and export."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import torch
from google.protobuf.message import Message
from torch import nn
from torch.fx import GraphModule

from ..core.errors import InputShapeError, UsageError
from ..core.files import check_writable
from ..export.devices import Device, device_for, get_device, target_scheme
from ..export.onnx import ExportResult, export_onnx
from ..export.parity import torch_outputs
from ..graph.capture import MODEL_CLASS_KEY, batch_of_two, check_example_inputs
from ..graph.convert import convert
from ..numerics.scheme import Scheme
from .checkpoint import CheckpointError, check_metadata, check_state_dict, read_checkpoint, save_checkpoint
from .detection import detector_family, wrap_detector

# Samples the export's onnxruntime check runs on: the first ones the wrapper calibrated or
# trained on (a fixed number, so the verdict does not hang on the example batch's size).
PARITY_SAMPLES = 32


class QuantWrapper(nn.Module):
    """Base of `PTQModule` and `QATModule`; `self.model` is the prepared graph.

    Given a torchvision detector (SSD, RetinaNet, FCOS), either class returns a
    `DetectionModule`: this wrapper around the detector's network, with torchvision's
    own pre- and post-processing in float (see detection.py).
    """

    model: GraphModule
    trains = False  # whether the wrapper is trained (QAT) rather than calibrated (PTQ)

    def __new__(cls, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> Any:
        family = detector_family(model) if isinstance(model, nn.Module) else None
        if family is not None:
            return wrap_detector(cls, model, family, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        example_inputs: tuple[torch.Tensor, ...],
        scheme: str | Scheme | None,
        dynamic_spatial: bool = False,
        device: str | Device | None = None,
    ) -> None:
        super().__init__()
        # The TIDL device this model is for, if named: it sets the default scheme and export's options.
        self.scheme, self.tidl_device = target_scheme(scheme, device)
        self.example_inputs = tuple(x.detach().clone() for x in check_example_inputs(example_inputs))
        self.dynamic_spatial = dynamic_spatial

    def _shape_text(self, x: torch.Tensor) -> str:
        dims = [
            "N",
            str(x.shape[1]),
            *(("H", "W", "D")[: x.dim() - 2] if self.dynamic_spatial else map(str, x.shape[2:])),
        ]
        return f"({', '.join(dims)})"

    def check_inputs(self, args: tuple[object, ...]) -> None:
        """Refuse inputs the captured graph cannot run, in one line that says what to do."""
        if len(args) != len(self.example_inputs):
            raise InputShapeError(
                f"the model was captured with {len(self.example_inputs)} input(s) (example_inputs); got {len(args)}"
            )
        for i, (x, ref) in enumerate(zip(args, self.example_inputs, strict=True)):
            if not isinstance(x, torch.Tensor):
                raise UsageError(f"input {i} is a {type(x).__name__}, expected a torch.Tensor")
            if self.dynamic_spatial:
                fits = x.dim() == ref.dim() and x.shape[1] == ref.shape[1]
            else:
                fits = x.shape[1:] == ref.shape[1:]
            if not fits:
                hint = "" if self.dynamic_spatial else ", or dynamic_spatial=True for a fully convolutional model"
                raise InputShapeError(
                    f"captured for inputs of shape {self._shape_text(ref)}; got {tuple(x.shape)} for input {i}: "
                    f"pass example_inputs at the size you run{hint}"
                )

    @property
    def model_class(self) -> str:
        """Qualified class name of the float model that was wrapped."""
        return self.model.meta.get(MODEL_CLASS_KEY, "unknown")

    def _set_training_flags(self, mode: bool) -> None:
        # torchao's prepared graphs refuse nn.Module.train(); set the flags directly.
        for module in self.modules():
            module.training = mode

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As nn.Module's, but a misfit (strict) names every missing, unexpected and mis-shaped key."""
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def save(self, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> Path:
        """Write a checkpoint (state_dict, scheme, model class, edgequant version), atomically.

        With `optimizer` its state goes into the same file, so a run killed at any point
        resumes from one consistent pair of model and optimizer state.
        """
        return save_checkpoint(self, path, self.scheme, self.model_class, optimizer)

    def load(self, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> Self:
        """Load a checkpoint written by `save()` into this wrapper, refusing one made for another scheme or model.

        With `optimizer` (built over this wrapper's parameters) its saved state is restored too.
        """
        payload = read_checkpoint(path)
        check_metadata(payload, self, self.scheme, self.model_class)
        if optimizer is not None and "optimizer" not in payload:
            raise CheckpointError(f"{path} holds no optimizer state: save it with `save(path, optimizer=...)`")
        self.load_state_dict(payload["state_dict"])
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        return self

    def convert(self) -> GraphModule:
        """The integer model: BN folded, int8 weights, int32 biases, Q/DQ activations."""
        return convert(self.model)

    def _state_key(self) -> tuple[tuple[int, int], ...]:
        # Any in-place change of a parameter (an optimizer step) bumps its version.
        return tuple((id(p), p._version) for p in self.parameters())

    def integer_model(self) -> GraphModule:
        """`convert()`, cached until the wrapper's state changes: what eval mode runs.

        Eval runs the very model that is exported, so the accuracy seen in eval is the
        deployed accuracy, bit for bit.
        """
        cached = self.__dict__.get("_integer")
        key = self._state_key()
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.convert())
            # A cache, not part of the module: kept out of state_dict(), children() and parameters().
            self.__dict__["_integer"] = cached
        return cached[1]

    def remember_samples(self, args: tuple[torch.Tensor, ...]) -> None:
        """Keep samples of a calibration or training batch, up to PARITY_SAMPLES, for export's check."""
        kept = self.__dict__.get("_samples")
        have = 0 if kept is None else kept[0].shape[0]
        if have >= PARITY_SAMPLES or not args or args[0].dim() == 0:
            return
        take = tuple(x[: PARITY_SAMPLES - have].detach().clone() for x in args)
        if kept is None:
            self.__dict__["_samples"] = take
        elif all(a.shape[1:] == b.shape[1:] for a, b in zip(kept, take, strict=True)):
            self.__dict__["_samples"] = tuple(torch.cat(pair) for pair in zip(kept, take, strict=True))

    def parity_inputs(self) -> tuple[torch.Tensor, ...]:
        """What export() compares onnxruntime and torch on: the remembered samples, else example_inputs."""
        kept = self.__dict__.get("_samples")
        if kept is not None and kept[0].shape[0] >= 2:
            return kept
        return batch_of_two(self.example_inputs)

    def _drop_integer_model(self) -> None:
        self.__dict__["_integer"] = None

    def _apply(self, fn: Any, recurse: bool = True) -> Self:
        self._drop_integer_model()  # .to(device) / .half(): rebuild the integer model from the moved graph
        return super()._apply(fn, recurse)

    def export(
        self,
        path: str | os.PathLike,
        opset: int | None = None,
        device: str | Device | None = None,
        batch: int = 1,
        *,
        meta_arch: Message | None = None,
    ) -> ExportResult:
        """Write QDQ ONNX and the files TIDL takes for `device`, after checking them in onnxruntime.

        The check covers the three views a user has of the model: eval mode of this
        wrapper, `convert()`, and onnxruntime on the file, on up to PARITY_SAMPLES samples
        of the data the wrapper calibrated or trained on in this process (else on
        example_inputs). `device` (TDA4VM, AM62A, AM67A, AM68A, AM69A) defaults to the
        wrapper's, else to TDA4VM for power-of-2 schemes and AM68A for the others; a
        scheme the device cannot run is refused. The TIDL model has a static `batch`.
        `meta_arch` (set by `DetectionModule.export`) is a detector's post-processing prototxt.
        """
        target = get_device(device) if device is not None else self.tidl_device or device_for(self.scheme)
        target.check(self.scheme)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise UsageError(f"batch is the TIDL model's static batch size, a positive integer; got {batch!r}")
        check_writable(path)  # before the conversion, which takes a while on large models
        inputs = self.parity_inputs()
        converted = self.convert()
        seen = torch_outputs(self.integer_model(), inputs)  # what eval mode computes
        return export_onnx(
            converted, inputs, path, self.scheme, target, opset, eval_outputs=seen, batch=batch, meta_arch=meta_arch
        )
