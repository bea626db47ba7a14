import pytest
import torch

from edgequant import scales


@pytest.mark.parametrize(
    ("max_abs", "expected"),
    [
        (127.0, 1.0),  # exactly fits: 127 * 1
        (127.5, 2.0),  # just over: next power of two
        (1.0, 2.0**-6),  # 1/127 = 0.00787 -> 2^-6 = 0.015625
        (0.5, 2.0**-7),  # 0.5/127 = 0.003937 -> 2^-7 = 0.0078125
        (63.5, 0.5),  # 63.5/127 = 0.5 exactly
        (6.0, 2.0**-4),  # ReLU6: 6/127 = 0.0472 -> 0.0625
    ],
)
def test_pow2_scale_by_hand(max_abs, expected):
    scale = scales.symmetric_scale(torch.tensor(max_abs), 127, power_of_2=True)
    assert scale.item() == expected
    assert scale.item() * 127 >= max_abs


def test_free_scale_is_range_over_qmax():
    assert scales.symmetric_scale(torch.tensor(2.54), 127, power_of_2=False).item() == pytest.approx(0.02)


def test_zero_range_gives_small_finite_pow2_scale():
    scale = scales.symmetric_scale(torch.tensor(0.0), 127, power_of_2=True)
    assert scale.item() == scales.MIN_SCALE
    assert scales.is_power_of_2(scale)


def test_pow2_ceil_exact_at_powers_and_neighbours():
    for exponent in range(-20, 10):
        p = 2.0**exponent
        assert scales.pow2_ceil(torch.tensor(p)).item() == p
        above = torch.nextafter(torch.tensor(p), torch.tensor(float("inf")))
        assert scales.pow2_ceil(above).item() == 2 * p


def test_quantize_rounds_half_to_even_and_saturates():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 200.0, -200.0, 127.4, -128.6])
    q = scales.quantize(x, torch.tensor(1.0), torch.tensor(0), -128, 127)
    assert q.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 127.0, -128.0, 127.0, -128.0]


def test_quantize_with_pow2_scale():
    # scale 2^-4: 0.09375 / 0.0625 = 1.5 -> 2 (ties to even); 0.15625 / 0.0625 = 2.5 -> 2
    x = torch.tensor([0.09375, 0.15625, 8.0, -8.0])
    q = scales.quantize(x, torch.tensor(0.0625), torch.tensor(0), -128, 127)
    assert q.tolist() == [2.0, 2.0, 127.0, -128.0]
    assert scales.dequantize(q, torch.tensor(0.0625), torch.tensor(0)).tolist() == [0.125, 0.125, 7.9375, -8.0]


def test_qrange():
    assert scales.qrange(8) == (-128, 127)
    assert scales.qrange(16) == (-32768, 32767)
    assert scales.qrange(8, signed=False) == (0, 255)
    with pytest.raises(ValueError):
        scales.qrange(1)


def test_asymmetric_qparams_cover_range_and_zero():
    scale, zp = scales.asymmetric_qparams(torch.tensor(-1.0), torch.tensor(3.0), -128, 127)
    assert scale.item() == pytest.approx(4.0 / 255)
    assert -128 <= zp.item() <= 127
    # 0.0 must be exactly representable
    assert scales.dequantize(zp.float(), scale, zp).item() == 0.0


def test_is_power_of_2():
    assert scales.is_power_of_2(torch.tensor([0.25, 1.0, 2.0**-10]))
    assert not scales.is_power_of_2(torch.tensor([0.25, 0.3]))


def test_histogram_percentile_by_hand():
    hist = torch.zeros(100)
    hist[:99] = 1.0  # 99 values spread over [0, 0.99)
    hist[99] = 1.0  # one outlier in the last bin
    assert scales.histogram_percentile(hist, 10.0, 99.0).item() == pytest.approx(9.9)
    assert scales.histogram_percentile(hist, 10.0, 100.0).item() == pytest.approx(10.0)


def test_mse_range_clips_a_lone_outlier_but_not_a_dense_tail():
    bins = 1000
    dense = torch.zeros(bins)
    dense[:100] = 1e6  # a hundred million values within the first 10% of the range ...
    dense[-1] = 1.0  # ... except one outlier at the top
    clipped = scales.mse_optimal_max_abs(dense, 10.0, 127, power_of_2=True)
    assert clipped.item() < 10.0 / 4  # a power-of-2 step chosen below the outlier
    uniform = torch.ones(bins)
    assert scales.mse_optimal_max_abs(uniform, 10.0, 127, power_of_2=False).item() == pytest.approx(10.0, rel=0.05)
