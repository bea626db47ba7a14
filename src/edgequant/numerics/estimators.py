"""Activation range estimators tighter than min/max: percentile, mse, sample_mse, mean_max.

PTQ can choose an activation range tighter than min/max: the one below which a
percentile of the values lie, or the one with the least expected squared
quantization error. Both need the distribution of |x|, which a fixed number of
bins over [0, max |x|] keeps in constant memory however much calibration data passes.

One outlier image among the calibration data (logits 20x the usual) dominates a
pooled squared error and sets the range for every input. sample_mse weighs each
sample's counts by its own energy, so it minimises the mean over samples of each
sample's relative error: the outlier counts as one sample. mean_max averages each
sample's max |x|, with the same aim and no histogram.
"""

from __future__ import annotations

import torch

from ..core.errors import UsageError
from . import scales

ESTIMATORS = ("percentile", "mse", "sample_mse", "mean_max")


def histogram_percentile(hist: torch.Tensor, hist_max: float, percentile: float) -> torch.Tensor:
    """The |x| below which `percentile` % of the histogrammed values lie (upper bin edge)."""
    cdf = torch.cumsum(hist, 0) / hist.sum().clamp(min=1)
    index = int(torch.searchsorted(cdf, torch.tensor(percentile / 100.0)).clamp(max=len(hist) - 1))
    return torch.tensor((index + 1) * hist_max / len(hist))


def mse_optimal_max_abs(
    hist: torch.Tensor, hist_max: float, qmax: int, power_of_2: bool, deep: bool = False
) -> torch.Tensor:
    """The clipping range that minimises the expected squared quantization error.

    `hist` counts |x| in equal bins over [0, hist_max]. Power-of-2 scales leave only
    a few candidates (the min/max exponent and the next few below it); free scales
    are searched on a grid of fractions of hist_max. `deep` searches 10 octaves
    below hist_max instead of 6 (power-of-2) or down to 0.2 (free): with samples
    weighed by their energy the best range can lie far below one outlier's max.
    """
    bins = len(hist)
    centers = (torch.arange(bins, dtype=torch.float32) + 0.5) * (hist_max / bins)
    full = scales.symmetric_scale(torch.tensor(hist_max), qmax, power_of_2)
    if power_of_2:
        candidates = full * 2.0 ** -torch.arange(0, 10 if deep else 6, dtype=torch.float32)
    elif deep:
        candidates = full * 2.0 ** -torch.linspace(0, 6, 241)
    else:
        candidates = full * torch.linspace(0.2, 1.0, 81)
    q = torch.clamp(scales.to_grid(centers[None, :], candidates[:, None], power_of_2), max=qmax)
    errors = ((centers[None, :] - q * candidates[:, None]) ** 2 * hist[None, :]).sum(dim=1)
    return candidates[int(torch.argmin(errors))] * qmax


class AbsHistogram:
    """Counts of |x| in `bins` equal bins over [0, limit], and the range `estimator` reads from them.

    For sample_mse, samples are along dim 0 (a tensor of less than two dims is one
    sample) and an all-zero sample adds nothing.

    `limit` is the max |x| of an earlier min/max pass over the same data; values beyond
    it (none, then) are not counted, |x| = limit falls in the last bin.
    """

    def __init__(self, estimator: str, limit: float, percentile: float = 99.99, bins: int = 2048) -> None:
        if estimator not in ("percentile", "mse", "sample_mse"):
            raise UsageError(f"a histogram estimates percentile, mse or sample_mse ranges, not {estimator!r}")
        self.estimator = estimator
        self.per_sample = estimator == "sample_mse"  # each sample's counts divided by its mean x^2
        self.limit = limit
        self.percentile = percentile
        self.counts = torch.zeros(bins)

    def add(self, x: torch.Tensor) -> None:
        """Count the values of x (nothing to bin over an empty range, limit 0)."""
        if self.limit <= 0:
            return
        x = x.detach().abs().float()
        if not self.per_sample:
            self.counts += torch.histc(x, len(self.counts), 0, self.limit)
            return
        samples = x.flatten(1) if x.dim() >= 2 else x.reshape(1, -1)
        for sample, energy in zip(samples, samples.square().mean(1).tolist(), strict=True):
            if energy > 0:
                self.counts += torch.histc(sample, len(self.counts), 0, self.limit) / energy

    def max_abs(self, qmax: int, power_of_2: bool) -> torch.Tensor | None:
        """The estimated range max |x|, or None while nothing has been counted."""
        if not self.counts.any():
            return None
        if self.estimator == "percentile":
            return histogram_percentile(self.counts, self.limit, self.percentile)
        return mse_optimal_max_abs(self.counts, self.limit, qmax, power_of_2, deep=self.per_sample)


class SampleMaxMean:
    """The mean over samples (dim 0) of each sample's max |x|: NNCF's default for activation ranges.

    Min/max lets a single unusual calibration image set a layer's range for every
    input; on an efficientnet_b0 of the checkpoint population, 1 image in 128 has
    logits 20x the usual, and the 8-bit step it forces erases the other images'
    class margins. The mean weighs that image by its share of the data.
    """

    def __init__(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)
        self.samples = 0

    def add(self, x: torch.Tensor) -> None:
        """Add each sample's max |x| (a tensor of less than two dims counts as one sample)."""
        peaks = x.detach().abs().flatten(1).amax(1) if x.dim() >= 2 else x.detach().abs().amax().reshape(1)
        self.total += peaks.double().sum()
        self.samples += peaks.numel()

    def max_abs(self, qmax: int, power_of_2: bool) -> torch.Tensor | None:
        """The mean of the samples' max |x|, or None while nothing (or only zeros) has been seen."""
        if not self.samples or not self.total:
            return None
        return (self.total / self.samples).float()


def range_estimator(
    estimator: str, limit: float, percentile: float = 99.99, bins: int = 2048
) -> AbsHistogram | SampleMaxMean:
    """The accumulator of `estimator` (one of ESTIMATORS) for a second pass over the calibration data."""
    if estimator == "mean_max":
        return SampleMaxMean()
    if estimator not in ESTIMATORS:
        raise UsageError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
    return AbsHistogram(estimator, limit, percentile, bins)
