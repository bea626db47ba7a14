import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgequant.numerics import scales

from ..helpers import OFFSETS, PROPERTY, ort_qdq


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


def test_free_scale_covers_the_range_when_the_division_rounds_down():
    max_abs = torch.tensor(3.9736151695251465)  # float32 max_abs / 127 * 127 lands one ulp below max_abs
    assert (max_abs / 127) * 127 < max_abs
    scale = scales.symmetric_scale(max_abs, 127, power_of_2=False)
    assert scale * 127 >= max_abs and scale == torch.nextafter(max_abs / 127, torch.tensor(1.0))


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


# Property tests: the arithmetic holds for any scale, zero point, width and value.

POW2_SCALES = st.integers(-20, 4).map(lambda e: 2.0**e)
FREE_SCALES = st.floats(2.0**-13, 10.0, width=32)
BITS = st.sampled_from([8, 16])


def grid_values(data, scale: float, qmin: int, qmax: int, zero_point: int = 0) -> np.ndarray:
    """Values at grid points, ties and near-ties, some past both ends of the range."""
    n = data.draw(st.integers(1, 48))
    k = data.draw(hnp.arrays(np.int64, n, elements=st.integers(qmin - zero_point - 3, qmax - zero_point + 3)))
    offsets = data.draw(hnp.arrays(np.float64, n, elements=OFFSETS))
    return ((k + offsets) * scale).astype(np.float32)


@PROPERTY
@given(scale=st.one_of(POW2_SCALES, FREE_SCALES), bits=BITS, data=st.data())
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(scale, bits, data):
    qmin, qmax = scales.qrange(bits)
    zero_point = data.draw(st.integers(qmin // 2, qmax // 2))
    lo, hi = (qmin - zero_point) * scale, (qmax - zero_point) * scale
    inside = st.floats(float(np.float32(lo) * 0.999), float(np.float32(hi) * 0.999), width=32)
    x = data.draw(hnp.arrays(np.float32, st.integers(1, 64), elements=inside))
    s, z = torch.tensor(scale, dtype=torch.float32), torch.tensor(zero_point)
    q = scales.quantize(torch.from_numpy(x), s, z, qmin, qmax)
    assert q.min() >= qmin and q.max() <= qmax and torch.equal(q, q.round())
    error = (scales.dequantize(q, s, z) - torch.from_numpy(x)).abs().double()
    # float32 arithmetic adds at most a rounding of x / s and of the product (free scales only)
    slack = 0.0 if scales.is_power_of_2(s) else 1e-6 * max(abs(lo), abs(hi))
    assert float(error.max()) <= float(s) / 2 + slack


@PROPERTY
@given(scale=st.one_of(POW2_SCALES, FREE_SCALES), bits=BITS, beyond=st.floats(1.0, 1e6), sign=st.sampled_from([-1, 1]))
def test_values_beyond_the_range_saturate_at_the_bounds(scale, bits, beyond, sign):
    qmin, qmax = scales.qrange(bits)
    edge = qmax if sign > 0 else qmin
    x = torch.tensor([(edge + sign * beyond) * scale], dtype=torch.float32)
    q = scales.quantize(x, torch.tensor(scale), torch.tensor(0), qmin, qmax)
    assert q.item() == edge


@PROPERTY
@given(max_abs=st.floats(2.0**-20, 2.0**20, width=32), bits=BITS)
def test_pow2_scale_is_the_smallest_power_of_two_covering_the_range(max_abs, bits):
    _, qmax = scales.qrange(bits)
    scale = scales.symmetric_scale(torch.tensor(max_abs), qmax, power_of_2=True)
    assert scales.is_power_of_2(scale)
    mantissa, _ = np.frexp(scale.item())
    assert mantissa == 0.5
    assert scale.item() * qmax >= max_abs  # covers the observed range: no clipping
    if scale.item() > scales.MIN_SCALE:
        assert scale.item() / 2 * qmax < max_abs  # and is the smallest that does


@PROPERTY
@given(lo=st.floats(-1e3, 0.0, width=32), hi=st.floats(0.0, 1e3, width=32), bits=BITS, data=st.data())
def test_asymmetric_range_holds_zero_exactly_and_covers_the_range(lo, hi, bits, data):
    qmin, qmax = scales.qrange(bits)
    scale, zero_point = scales.asymmetric_qparams(torch.tensor(lo), torch.tensor(hi), qmin, qmax)
    assert qmin <= zero_point.item() <= qmax
    assert scales.quantize(torch.zeros(1), scale, zero_point, qmin, qmax).item() == zero_point.item()
    ends = scales.dequantize(torch.tensor([float(qmin), float(qmax)]), scale, zero_point)
    step = scale.item()
    assert ends[0].item() <= lo + step and ends[1].item() >= hi - step  # within a step (zero point rounding)


@PROPERTY
@given(scale=st.one_of(POW2_SCALES, FREE_SCALES), bits=BITS, data=st.data())
def test_quantize_matches_onnxruntime_bit_for_bit_including_ties(scale, bits, data):
    qmin, qmax = scales.qrange(bits)
    zero_point = data.draw(st.integers(qmin // 4, qmax // 4))
    x = grid_values(data, scale, qmin, qmax, zero_point)
    s = torch.tensor(scale, dtype=torch.float32)
    q = scales.quantize(torch.from_numpy(x), s, torch.tensor(zero_point), qmin, qmax)
    y = scales.dequantize(q, s, torch.tensor(zero_point))
    ort_q, ort_y = ort_qdq(x, np.float32(scale), np.array(zero_point), bits)
    assert np.array_equal(q.numpy().astype(np.int64), ort_q.astype(np.int64))
    assert np.array_equal(y.numpy(), ort_y)


def _ties(scale: np.float32, bits: int) -> np.ndarray:
    """float32 values at and next to k + 1/2 steps across the range.

    For a power-of-2 scale (k + 1/2) * s is an exact tie; for a free scale the
    neighbours include values where round(x * (1/s)) != round(x / s).
    """
    qmin, qmax = scales.qrange(bits)
    k = np.arange(qmin, qmax, max(1, (qmax - qmin) // 4096), dtype=np.float64)
    centre = ((k + 0.5) * np.float64(scale)).astype(np.float32)
    return np.concatenate([centre, np.nextafter(centre, np.inf), np.nextafter(centre, -np.inf)])


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("scale", [0.1, 0.013702594, 4.9712042e-05, 0.37, 2.0**-4, 2.0**-11, 4.0])
def test_every_quantizer_rounds_alike_at_ties(scale, bits):
    """One rounding, round_half_even(x / s) as onnxruntime's QuantizeLinear: fake-quant, the converted
    model's quantize ops, the analysis simulator, scales.quantize and to_grid agree bit for bit."""
    from torch.ao.quantization.fx import _decomposed

    from edgequant.diagnose.analysis import _Switch
    from edgequant.numerics.observers import FakeQuantize, RangeObserver

    scale = np.float32(scale)
    x = _ties(scale, bits)
    t, s = torch.from_numpy(x), torch.tensor(scale)
    power_of_2 = scales.is_power_of_2(s)
    by_division, by_reciprocal = np.round(x / scale), np.round(x * (np.float32(1) / scale))
    if power_of_2:
        assert np.any(np.abs(x / scale) % 1 == 0.5) and np.array_equal(by_division, by_reciprocal)
    else:
        assert np.any(by_division != by_reciprocal)  # the case that tells the two roundings apart exists
    qmin, qmax = scales.qrange(bits)
    dtype = torch.int8 if bits == 8 else torch.int16
    ort_q, ort_y = ort_qdq(x, scale, np.array(0), bits)
    assert np.array_equal(ort_q, by_division)

    assert np.array_equal(scales.to_grid(t, s, power_of_2).numpy(), ort_q)
    assert np.array_equal(scales.to_grid(t, s).numpy(), ort_q)
    assert np.array_equal(scales.quantize(t, s, torch.tensor(0), qmin, qmax).numpy(), ort_q)
    ops, zero = torch.ops.quantized_decomposed, torch.zeros(1, dtype=torch.int64)
    assert np.array_equal(ops.quantize_per_tensor(t, float(scale), 0, qmin, qmax, dtype).numpy(), ort_q)
    assert np.array_equal(ops.quantize_per_tensor.tensor(t, s, zero[0], qmin, qmax, dtype).numpy(), ort_q)
    assert np.array_equal(ops.quantize_per_channel(t[None], s[None], zero, 0, qmin, qmax, dtype)[0].numpy(), ort_q)
    # torch's own reference kernel (which edgequant's registration replaces) multiplies by 1 / s:
    # right for power-of-2 scales only.
    stock = _decomposed.quantize_per_tensor(t, float(scale), 0, qmin, qmax, dtype).numpy()
    assert np.array_equal(stock, ort_q) == power_of_2

    fq = FakeQuantize(RangeObserver, dtype=dtype, quant_min=qmin, quant_max=qmax, power_of_2=power_of_2)
    fq.scale.copy_(s.reshape(1))
    fq.disable_observer()
    assert np.array_equal(fq(t).numpy(), ort_y)
    observer = RangeObserver(dtype, power_of_2=power_of_2)
    observer(torch.tensor([-float(scale) * qmax, float(scale) * qmax]))
    switch = _Switch(observer, constant=None)
    switch.params[bits] = (s.reshape(1), torch.zeros(1), qmin, qmax)
    switch.bits = bits
    assert np.array_equal(switch(t).numpy(), ort_y)
