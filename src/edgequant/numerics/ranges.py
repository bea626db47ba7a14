"""Range tracking: a batch's extremes, and how they fold into a running or averaged range.

The range tensors themselves belong to the observer (they are its checkpointed
`min_val` / `max_val`); these functions only say how one batch changes them, so
that the PTQ rule (widen to everything seen) and the QAT rule (average the
extremes) can be read and tested apart from the observer.
"""

from __future__ import annotations

import torch


def batch_extremes(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of x: scalars, or one per slice along `axis`."""
    x = x.detach().to(torch.float32)
    if axis is None:
        return torch.aminmax(x)
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    # amin / amax separately: aminmax with dim is several times slower on CPU.
    return flat.amin(dim=1), flat.amax(dim=1)


def averaging_weight(count: int | torch.Tensor, constant: float) -> float | torch.Tensor:
    """Weight of the `count`-th batch (from 1) in an averaged range.

    A plain running mean for the first 1/c batches, then the moving average with
    weight c: ranges settle within a few steps instead of drifting from their first
    value. The first batch, and every batch when c = 1, replaces the range.
    A tensor `count` gives the same value as a 0-d float32 tensor computed on its
    device: under torch.compile a host integer would be a guard that recompiles
    every step.
    """
    if constant == 1.0:
        return 1.0
    if isinstance(count, torch.Tensor):
        # In float64 and then rounded once, as the host value is when a kernel takes it.
        return torch.clamp(1.0 / count.to(torch.float64), min=constant).to(torch.float32)
    return max(1.0 / count, constant)


def fold(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    batch_min: torch.Tensor,
    batch_max: torch.Tensor,
    weight: float | torch.Tensor | None,
) -> None:
    """Fold one batch's extremes into [min_val, max_val] in place, without host syncs.

    `weight` None widens the range to cover the batch (running min / max); a weight
    moves each end that far towards the batch's (1: onto it).
    """
    if weight is None:
        torch.minimum(min_val, batch_min, out=min_val)
        torch.maximum(max_val, batch_max, out=max_val)
    elif isinstance(weight, torch.Tensor):
        # Select rather than lerp when the weight is 1: the first range is +-inf, and inf * 0 is NaN.
        replace = weight == 1.0
        min_val.copy_(torch.where(replace, batch_min, min_val.lerp(batch_min, weight)))
        max_val.copy_(torch.where(replace, batch_max, max_val.lerp(batch_max, weight)))
    elif weight == 1.0:
        min_val.copy_(batch_min)
        max_val.copy_(batch_max)
    else:
        min_val.lerp_(batch_min, weight)
        max_val.lerp_(batch_max, weight)
