"""Per-channel mean and mean square of a tensor stream, accumulated batch by batch.

The input statistics of a layer that bias correction (the mean) and the choice of
weight exponents (the mean square: what an error on each input channel costs) use.
"""

from __future__ import annotations

import torch


class ChannelMoments:
    """Running sums of x and x^2 per channel along `dim` (1 for NCHW, -1 for channels-last data)."""

    def __init__(self, dim: int = 1) -> None:
        self.dim = dim
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count = 0  # values per channel so far

    def add(self, x: torch.Tensor) -> None:
        """Fold in one batch; an empty tensor, or one of rank < 2 (no channel dim), is skipped."""
        if x.dim() < 2 or not x.numel():
            return
        channel = self.dim % x.dim()
        others = [d for d in range(x.dim()) if d != channel]
        values = x.detach().float()
        total, squares = values.sum(dim=others), values.square().sum(dim=others)
        if self.total is not None and self.squares is not None:
            total, squares = self.total + total, self.squares + squares
        self.total, self.squares = total, squares
        self.count += x.numel() // x.shape[channel]

    @property
    def mean(self) -> torch.Tensor | None:
        """Per-channel mean of x, None before any batch."""
        return None if self.total is None or not self.count else self.total / self.count

    @property
    def energy(self) -> torch.Tensor | None:
        """Per-channel mean of x^2, None before any batch."""
        return None if self.squares is None or not self.count else self.squares / self.count
