"""Graph capture with torch.export, and errors that point at the user's code.

torch.export's failures are long dynamo traces; users need the module, the line,
the reason and the fix. The batch dimension is exported as dynamic so a wrapped
model runs at any batch size.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Sequence

import torch
from torch import nn


class CaptureError(RuntimeError):
    """torch.export could not turn the model into a graph."""


_HINTS = (
    (
        ("data-dependent", "Could not guard on data-dependent", "GuardOnDataDependentSymNode"),
        "Python control flow depends on tensor values. Replace the `if`/loop on a tensor "
        "with tensor ops (torch.where, masking) or torch.cond, or compute the condition "
        "from shapes and constants only.",
    ),
    (
        (".numpy()", "numpy", ".tolist()", ".item()"),
        "the model leaves PyTorch (numpy / .item() / .tolist()). Keep the computation in torch ops.",
    ),
    (
        ("Constraints violated", "specialized", "batch"),
        "the code fixes the batch size (for example x.view(64, -1)). Use x.flatten(1) or "
        "x.reshape(x.shape[0], -1) so that any batch size works.",
    ),
    (
        ("Unsupported", "not supported", "graph break"),
        "this construct is not supported by torch.export. Move it out of forward(), or "
        "rewrite it with plain tensor ops.",
    ),
)


def check_example_inputs(example_inputs: object) -> tuple[torch.Tensor, ...]:
    """Validate example inputs early: a tuple of float tensors with a batch dimension."""
    if isinstance(example_inputs, torch.Tensor):
        raise TypeError("example_inputs must be a tuple of tensors, e.g. example_inputs=(x,)")
    if not isinstance(example_inputs, Sequence) or not example_inputs:
        raise TypeError("example_inputs must be a non-empty tuple of tensors, e.g. (x,)")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] is a {type(x).__name__}, expected a torch.Tensor")
        if not x.is_floating_point():
            raise TypeError(f"example_inputs[{i}] has dtype {x.dtype}; the model input must be a float tensor")
        if x.dim() < 2:
            raise ValueError(f"example_inputs[{i}] has shape {tuple(x.shape)}; expected a batch dimension first")
    return tuple(example_inputs)


def _batch_of_two(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    # torch.export specialises size-1 dims, and BN in train mode rejects a batch of one.
    return tuple(x if x.shape[0] >= 2 else x.repeat(2, *([1] * (x.dim() - 1))) for x in inputs)


def _user_frames(message: str) -> list[tuple[str, int, str]]:
    frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', message)
    return [(f, int(line), code.strip()) for f, line, code in frames if "/torch/" not in f]


def _module_at(model: nn.Module, filename: str, line: int) -> str | None:
    """Name of the submodule whose forward() contains filename:line, deepest first."""
    best = None
    for name, module in model.named_modules():
        forward = type(module).forward
        try:
            src, start = inspect.getsourcelines(forward)
            file = inspect.getsourcefile(forward)
        except (OSError, TypeError):
            continue
        if file == filename and start <= line < start + len(src):
            best = name or "<root>"
    return best


def explain_export_failure(model: nn.Module, error: BaseException) -> str:
    """A short, human message for a torch.export failure."""
    message = str(error)
    reason = next((ln.strip() for ln in message.splitlines() if ln.strip()), type(error).__name__)
    where = ""
    frames = _user_frames(message)
    if frames:
        filename, line, code = frames[-1]
        module = _module_at(model, filename, line)
        owner = "the model"
        if module:
            kind = type(model.get_submodule("" if module == "<root>" else module)).__name__
            owner = f"module `{module}` ({kind})"
        where = f" in {owner} at {filename}:{line}: `{code}`"
    hint = next((h for keys, h in _HINTS if any(k in message for k in keys)), None)
    text = f"torch.export cannot capture {type(model).__name__}{where}.\nReason: {reason[:300]}"
    if hint:
        text += f"\nFix: {hint}"
    return text


def capture(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    """Export a copy of `model` (in train mode, batch dimension dynamic) to an ATen graph module."""
    inputs = _batch_of_two(check_example_inputs(example_inputs))
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in inputs)
    # The exported graph would share parameters with the caller's model; QAT must not
    # train the user's float model in place.
    model = copy.deepcopy(model).train()
    try:
        program = torch.export.export(model, inputs, dynamic_shapes=dynamic)
    except Exception as dynamic_error:
        try:
            torch.export.export(model, inputs)
        except Exception:
            raise CaptureError(explain_export_failure(model, dynamic_error)) from None
        raise CaptureError(
            explain_export_failure(model, dynamic_error)
            + "\nThe model exports at a fixed batch size only; wrapping needs any batch size to work."
        ) from None
    return program.module()
