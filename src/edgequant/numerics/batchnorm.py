"""BN in inference, with the engine's roundings.

A BN with no conv before it (densenet's and pre-activation blocks) stays a layer of
its own in the exported file. onnxruntime computes it, in float32 with a rounding
after each operation, as

    a = w * (1 / sqrt(var + eps)),    y = x * a + (b - mean * a).

torch's kernel reaches the same value another way (a fused multiply-add, a sqrt that
is not always correctly rounded), so about a third of the outputs differ in their last
bit. After the next quantizer most of that vanishes, but a value on a rounding
boundary moves one step (densenet161 at 32x32: 16 of 196,608 values), and a deep net
can turn that into a different top-1. Eval graphs run `batch_norm` below in BN's place;
export writes aten's op again, which the file holds as BatchNormalization.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def _f32(value: torch.Tensor) -> torch.Tensor:
    # One float32 rounding of a result computed exactly (or with an innocuous double
    # rounding) in float64: float32 operations correctly rounded, as IEEE 754 requires.
    return value.to(torch.float32)


def batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool = True,
) -> torch.Tensor:
    """Drop-in for `aten.batch_norm` whose inference output equals onnxruntime's bit for bit."""
    if training or running_mean is None or running_var is None or input.dtype != torch.float32:
        return aten.batch_norm.default(
            input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled
        )
    d = torch.float64
    eps32 = torch.tensor(eps, dtype=torch.float32, device=running_var.device)
    var = _f32(running_var.to(d) + eps32.to(d))
    inv_std = _f32(1.0 / _f32(var.to(d).sqrt()).to(d))
    scale = inv_std if weight is None else _f32(weight.to(d) * inv_std.to(d))
    moved = _f32(running_mean.to(d) * scale.to(d)).to(d)
    shift = _f32(-moved if bias is None else bias.to(d) - moved)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    # Two kernels, two roundings (x * a, then + b): no fused multiply-add.
    return torch.add(torch.mul(input, scale.reshape(shape)), shift.reshape(shape))
