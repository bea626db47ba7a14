"""A histogram of |x| and the range estimators that read it (percentile, mse).

PTQ can choose an activation range tighter than min/max: the one below which a
percentile of the values lie, or the one with the least expected squared
quantization error. Both need the distribution of |x|, which a fixed number of
bins over [0, max |x|] keeps in constant memory however much calibration data passes.
"""

from __future__ import annotations

import torch

from ..core.errors import UsageError
from . import scales

ESTIMATORS = ("percentile", "mse")


def histogram_percentile(hist: torch.Tensor, hist_max: float, percentile: float) -> torch.Tensor:
    """The |x| below which `percentile` % of the histogrammed values lie (upper bin edge)."""
    cdf = torch.cumsum(hist, 0) / hist.sum().clamp(min=1)
    index = int(torch.searchsorted(cdf, torch.tensor(percentile / 100.0)).clamp(max=len(hist) - 1))
    return torch.tensor((index + 1) * hist_max / len(hist))


def mse_optimal_max_abs(hist: torch.Tensor, hist_max: float, qmax: int, power_of_2: bool) -> torch.Tensor:
    """The clipping range that minimises the expected squared quantization error.

    `hist` counts |x| in equal bins over [0, hist_max]. Power-of-2 scales leave only
    a few candidates (the min/max exponent and the next few below it); free scales
    are searched on a grid of fractions of hist_max.
    """
    bins = len(hist)
    centers = (torch.arange(bins, dtype=torch.float32) + 0.5) * (hist_max / bins)
    full = scales.symmetric_scale(torch.tensor(hist_max), qmax, power_of_2)
    if power_of_2:
        candidates = full * 2.0 ** -torch.arange(0, 6, dtype=torch.float32)
    else:
        candidates = full * torch.linspace(0.2, 1.0, 81)
    q = torch.clamp(scales.to_grid(centers[None, :], candidates[:, None], power_of_2), max=qmax)
    errors = ((centers[None, :] - q * candidates[:, None]) ** 2 * hist[None, :]).sum(dim=1)
    return candidates[int(torch.argmin(errors))] * qmax


class AbsHistogram:
    """Counts of |x| in `bins` equal bins over [0, limit], and the range `estimator` reads from them.

    `limit` is the max |x| of an earlier min/max pass over the same data; values beyond
    it (none, then) are not counted, |x| = limit falls in the last bin.
    """

    def __init__(self, estimator: str, limit: float, percentile: float = 99.99, bins: int = 2048) -> None:
        if estimator not in ESTIMATORS:
            raise UsageError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
        self.estimator = estimator
        self.limit = limit
        self.percentile = percentile
        self.counts = torch.zeros(bins)

    def add(self, x: torch.Tensor) -> None:
        """Count the values of x (nothing to bin over an empty range, limit 0)."""
        if self.limit > 0:
            self.counts += torch.histc(x.detach().abs().float(), len(self.counts), 0, self.limit)

    def max_abs(self, qmax: int, power_of_2: bool) -> torch.Tensor | None:
        """The estimated range max |x|, or None while nothing has been counted."""
        if not self.counts.any():
            return None
        if self.estimator == "percentile":
            return histogram_percentile(self.counts, self.limit, self.percentile)
        return mse_optimal_max_abs(self.counts, self.limit, qmax, power_of_2)
