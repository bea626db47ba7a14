import pytest
import torch

from edgequant.numerics import estimators as histogram
from edgequant.numerics.estimators import AbsHistogram, SampleMaxMean, range_estimator


def test_histogram_percentile_by_hand():
    hist = torch.zeros(100)
    hist[:99] = 1.0  # 99 values spread over [0, 0.99)
    hist[99] = 1.0  # one outlier in the last bin
    assert histogram.histogram_percentile(hist, 10.0, 99.0).item() == pytest.approx(9.9)
    assert histogram.histogram_percentile(hist, 10.0, 100.0).item() == pytest.approx(10.0)


def test_mse_range_clips_a_lone_outlier_but_not_a_dense_tail():
    bins = 1000
    dense = torch.zeros(bins)
    dense[:100] = 1e6  # a hundred million values within the first 10% of the range ...
    dense[-1] = 1.0  # ... except one outlier at the top
    clipped = histogram.mse_optimal_max_abs(dense, 10.0, 127, power_of_2=True)
    assert clipped.item() < 10.0 / 4  # a power-of-2 step chosen below the outlier
    uniform = torch.ones(bins)
    assert histogram.mse_optimal_max_abs(uniform, 10.0, 127, power_of_2=False).item() == pytest.approx(10.0, rel=0.05)


def test_mse_range_for_pow2_scales_by_hand():
    # One bin over [0, 1.5], centre 0.75; qmax 1: the covering step is 2, candidates 2, 1, 0.5, ...
    # Step 2 rounds 0.75 to 0 (error 0.5625), step 1 to 1 (0.0625), step 0.5 clips to 0.5 (0.0625),
    # step 0.25 clips to 0.25 (0.25): the first of the least errors wins, step 1, range 1 * qmax.
    hist = torch.tensor([3.0])
    assert histogram.mse_optimal_max_abs(hist, 1.5, 1, power_of_2=True).item() == 1.0


def test_abs_histogram_counts_magnitudes_over_its_limit():
    h = AbsHistogram("percentile", limit=4.0, percentile=50.0, bins=4)
    h.add(torch.tensor([-0.5, 1.5, -3.9, 4.0]))
    h.add(torch.tensor([[0.25], [-2.5]]))
    assert h.counts.tolist() == [2.0, 1.0, 1.0, 2.0]  # bins [0,1) [1,2) [2,3) [3,4]


def test_abs_histogram_estimates_by_hand():
    h = AbsHistogram("percentile", limit=4.0, percentile=50.0, bins=4)
    h.add(torch.tensor([0.5, 0.5, 0.5, 3.5]))
    # 75% of the values lie in the first bin: the 50th percentile is its upper edge, 1.0
    assert h.max_abs(qmax=127, power_of_2=True).item() == 1.0
    h.percentile = 100.0
    assert h.max_abs(qmax=127, power_of_2=True).item() == 4.0
    mse = AbsHistogram("mse", limit=1.5, bins=1)
    mse.add(torch.full((3,), 0.75))
    assert mse.max_abs(qmax=1, power_of_2=True).item() == 1.0  # as in the by-hand mse case above


def test_abs_histogram_without_counts_gives_no_estimate():
    assert AbsHistogram("mse", limit=1.0).max_abs(127, True) is None
    empty_range = AbsHistogram("percentile", limit=0.0)  # all zeros seen: nothing to bin over
    empty_range.add(torch.zeros(5))
    assert empty_range.max_abs(127, True) is None


def test_abs_histogram_refuses_an_unknown_estimator():
    with pytest.raises(ValueError, match="a histogram estimates percentile, mse or sample_mse ranges, not 'mean_max'"):
        AbsHistogram("mean_max", limit=1.0)
    known = "percentile, mse, sample_mse, mean_max"
    with pytest.raises(ValueError, match=f"estimator must be one of {known}; got 'minmax'"):
        range_estimator("minmax", limit=1.0)


def test_sample_mse_weighs_each_samples_counts_by_its_energy_by_hand():
    est = AbsHistogram("sample_mse", limit=10.0, bins=10)
    est.add(torch.tensor([[[1.0, -1.0]], [[10.0, -10.0]], [[0.0, 0.0]]]))  # energies 1, 100, 0
    expected = torch.zeros(10)
    expected[1] = 2 / 1.0  # two values of |x| = 1 in a sample of mean x^2 = 1
    expected[9] = 2 / 100.0  # two of |x| = 10 (the last bin) in a sample of mean x^2 = 100
    assert torch.allclose(est.counts, expected)  # the all-zero sample adds nothing
    flat = AbsHistogram("sample_mse", limit=2.0, bins=2)
    flat.add(torch.tensor([0.5, -1.5]))  # under two dims: one sample of mean x^2 = 1.25
    assert torch.allclose(flat.counts, torch.tensor([1.0, 1.0]) / 1.25)


def test_sample_mse_is_pooled_mse_for_equal_samples_and_tighter_with_an_outlier_sample():
    torch.manual_seed(0)
    values = torch.randn(512)
    alike = torch.stack([values[torch.randperm(512)] for _ in range(32)])  # 32 samples of equal energy
    limit = float(alike.abs().max())
    for power_of_2 in (True, False):
        pooled, per_sample = AbsHistogram("mse", limit), AbsHistogram("sample_mse", limit)
        pooled.add(alike)
        per_sample.add(alike)
        pooled_range, sample_range = pooled.max_abs(127, power_of_2), per_sample.max_abs(127, power_of_2)
        assert sample_range.item() == pytest.approx(pooled_range.item(), rel=0.05 if not power_of_2 else 0)
    outlier = alike.clone()
    outlier[0] *= 40.0  # one sample among 32 sets max |x|; pooled, its squared error dominates
    limit = float(outlier.abs().max())
    pooled, per_sample = AbsHistogram("mse", limit), AbsHistogram("sample_mse", limit)
    pooled.add(outlier)
    per_sample.add(outlier)
    assert per_sample.max_abs(127, True) * 4 <= pooled.max_abs(127, True)


def test_sample_max_mean_averages_each_samples_peak_by_hand():
    est = SampleMaxMean()
    assert est.max_abs(127, True) is None
    est.add(torch.tensor([[[1.0, -2.0]], [[0.5, 0.25]]]))  # two samples: peaks 2.0 and 0.5
    est.add(torch.tensor([[-30.0, 0.0]]))  # one outlier sample: peak 30
    assert est.samples == 3
    assert est.max_abs(127, True).item() == pytest.approx((2.0 + 0.5 + 30.0) / 3)
    scalar = SampleMaxMean()
    scalar.add(torch.tensor([-3.0, 1.0]))  # under two dims: one sample
    assert (scalar.samples, scalar.max_abs(127, False).item()) == (1, 3.0)
    zeros = SampleMaxMean()
    zeros.add(torch.zeros(4, 3))
    assert zeros.max_abs(127, True) is None  # nothing to scale: min/max (zero) stays


def test_range_estimator_builds_the_named_accumulator():
    assert isinstance(range_estimator("mean_max", limit=4.0), SampleMaxMean)
    histogram_estimator = range_estimator("mse", limit=4.0, bins=8)
    assert isinstance(histogram_estimator, AbsHistogram) and len(histogram_estimator.counts) == 8
    assert range_estimator("sample_mse", limit=4.0).per_sample and not histogram_estimator.per_sample
