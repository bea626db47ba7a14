import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgequant.numerics import scales
from edgequant.numerics.observers import FakeQuantize, RangeObserver, paused

from ..helpers import OFFSETS, PROPERTY, ort_qdq


def test_minmax_observer_keeps_extremes_and_pow2_scale():
    obs = RangeObserver(dtype=torch.int8, power_of_2=True)
    obs(torch.tensor([-0.5, 0.25]))
    obs(torch.tensor([0.75, 0.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-0.5, 0.75)
    scale, zp = obs.calculate_qparams()
    # 0.75 / 127 = 0.0059 -> 2^-7
    assert scale.item() == 2.0**-7 and zp.item() == 0


def test_moving_average_observer():
    obs = RangeObserver(averaging_constant=0.5)
    obs(torch.tensor([-1.0, 1.0]))
    obs(torch.tensor([-3.0, 3.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-2.0, 2.0)


def test_checkpointed_state_is_the_range_and_the_update_count():
    """Saved checkpoints name these keys: the components' state stays out of the state_dict."""
    obs = RangeObserver(averaging_constant=0.5)
    obs.start_estimator("percentile")
    obs.track_channel_stats()
    assert list(obs.state_dict()) == ["min_val", "max_val", "updates"]


def test_averaging_resumes_from_a_loaded_update_count():
    obs = RangeObserver(averaging_constant=0.25)
    for m in (1.0, 3.0):
        obs(torch.tensor([-m, m]))
    resumed = RangeObserver(averaging_constant=0.25)
    resumed.load_state_dict(obs.state_dict())
    resumed(torch.tensor([-8.0, 8.0]))  # the third batch: weight 1/3, not a fresh start
    assert int(resumed.updates) == 3 and resumed.max_val.item() == 2.0 + (8.0 - 2.0) / 3


def test_estimator_pass_replaces_min_max_with_the_estimate():
    obs = RangeObserver(power_of_2=False)
    obs(torch.tensor([0.0, 4.0]))
    obs.start_estimator("percentile", percentile=50.0, bins=4)
    obs(torch.tensor([0.5, 0.5, 0.5, 3.5]))
    assert (obs.min_val.item(), obs.max_val.item()) == (0.0, 4.0)  # the range stays where the first pass left it
    assert obs.qparams()[0].item() == pytest.approx(1.0 / 127)  # 50% of |x| lie below 1.0
    obs.settle()  # the estimate becomes the range: a state_dict carries it
    assert obs.estimator is None and (obs.min_val.item(), obs.max_val.item()) == (0.0, 1.0)
    loaded = RangeObserver(power_of_2=False)
    loaded.load_state_dict(obs.state_dict())
    assert loaded.qparams()[0].item() == pytest.approx(1.0 / 127)


def test_settle_keeps_the_scale_of_an_estimate_above_the_range():
    """A power-of-2 mse estimate is the covering step times qmax, above max |x|: min/max stay, the scale too."""
    obs = RangeObserver(power_of_2=True)
    obs(torch.tensor([-3.0, 0.75]))
    obs.start_estimator("mse", bins=8)
    obs(torch.full((6,), 3.0))
    before = obs.qparams()[0].item()
    obs.settle()
    assert (obs.min_val.item(), obs.max_val.item()) == (-3.0, 0.75)
    assert obs.qparams()[0].item() == before == 2.0**-5  # 3 / 127 -> 2^-5


def test_mean_max_pass_sets_the_range_from_the_samples_peaks():
    obs = RangeObserver(power_of_2=False)
    peaks = torch.tensor([1.0, 2.0, 3.0, 90.0])
    batch = torch.zeros(4, 2, 3)
    batch[:, 1, 2] = peaks
    obs(batch)
    obs.start_estimator("mean_max")
    obs(batch)
    obs.settle()
    assert (obs.min_val.item(), obs.max_val.item()) == (0.0, 24.0)  # (1 + 2 + 3 + 90) / 4


def test_channel_stats_follow_the_observed_inputs():
    obs = RangeObserver()
    assert obs.channel_mean is None
    obs.track_channel_stats(dim=1)
    obs(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
    assert obs.channel_mean.tolist() == [2.0, 1.0] and obs.channel_energy.tolist() == [5.0, 10.0]
    with paused(obs):
        obs(torch.tensor([[100.0, 100.0]]))
    assert obs.channel_mean.tolist() == [2.0, 1.0] and obs.max_val.item() == 4.0


def test_unobserved_gives_unit_scale():
    scale, zp = RangeObserver().calculate_qparams()
    assert scale.item() == 1.0 and zp.item() == 0


def test_fake_quantize_rounds_and_passes_gradient_straight_through():
    fq = FakeQuantize(observer=RangeObserver, dtype=torch.int8, quant_min=-128, quant_max=127)
    x = torch.tensor([0.3, -0.9, 0.1], requires_grad=True)
    y = fq(x)
    # max |x| = 0.9 -> 0.9/127 -> 2^-7 = 0.0078125
    assert fq.scale.item() == 2.0**-7
    expected = torch.round(x.detach() / 2.0**-7) * 2.0**-7
    assert torch.equal(y.detach(), expected)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_freeze_survives_set_observing():
    fq = FakeQuantize(observer=RangeObserver, dtype=torch.int8, quant_min=-128, quant_max=127)
    fq(torch.tensor([1.0]))
    fq.freeze()
    fq.set_observing(True)
    fq(torch.tensor([100.0]))
    assert fq.scale.item() == 2.0**-6  # still the range of the first tensor
    assert fq.is_frozen


def test_bn_factor_path_equals_quantizing_the_folded_weight():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    s = torch.tensor([0.5, -2.0, 1.5, 3.0, -0.25, 1.0])
    fq = FakeQuantize(observer=RangeObserver, dtype=torch.int8, quant_min=-128, quant_max=127, averaging_constant=1.0)
    out = fq(w, s)
    folded = w.detach() * s.view(-1, 1, 1, 1)
    q = 2.0 ** torch.ceil(torch.log2(folded.abs().max() / 127))  # the pow2 step of the folded weight
    assert fq.scale.item() == q.item()
    expected = torch.clamp(torch.round(folded / q), -128, 127) * q / s.view(-1, 1, 1, 1)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-6, atol=1e-7)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight through, nothing clipped


def test_activation_clip_mask_zeroes_gradient_outside_range():
    fq = FakeQuantize(observer=RangeObserver, dtype=torch.int8, quant_min=-128, quant_max=127)
    fq(torch.tensor([1.0, -1.0]))
    fq.freeze()
    x = torch.tensor([0.5, 3.0, -3.0], requires_grad=True)
    y = fq(x)
    # range 1.0 -> step 2^-6: 3.0 saturates at 127 steps, -3.0 at -128 steps
    assert y.tolist() == [0.5, 127 * 2.0**-6, -128 * 2.0**-6]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0]


def test_switches_take_effect_at_once_and_after_loading_a_state_dict():
    def make():
        return FakeQuantize(observer=RangeObserver, dtype=torch.int8, quant_min=-128, quant_max=127)

    small, big = torch.full((4,), 0.5), torch.full((4,), 8.0)
    fq = make()
    fq(small)
    fq.disable_observer()
    assert fq(big).max() == 127 / 128  # clipped to the range of `small`: 0.5 / 127 -> scale 2^-7
    fq.disable_fake_quant()
    assert torch.equal(fq(big), big)
    resumed = make()
    resumed(small)  # observing and fake-quantizing before the load
    resumed.load_state_dict(fq.state_dict())
    assert torch.equal(resumed(big), big)  # the loaded switches (both off) apply
    resumed.enable_fake_quant()
    assert resumed(big).max() == 127 / 128 and resumed.scale.item() == 2.0**-7


SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)


@PROPERTY
@given(shape=SHAPES, data=st.data(), power_of_2=st.booleans())
def test_per_channel_ranges_follow_the_chosen_axis(shape, data, power_of_2):
    axis = data.draw(st.integers(0, len(shape) - 1))
    x = torch.from_numpy(data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, width=32))))
    obs = RangeObserver(channel_axis=axis, power_of_2=power_of_2)
    obs(x)
    others = [d for d in range(x.dim()) if d != axis]
    want_min = x.amin(dim=others) if others else x
    want_max = x.amax(dim=others) if others else x
    assert torch.equal(obs.min_val, want_min) and torch.equal(obs.max_val, want_max)
    scale, zero_point = obs.calculate_qparams()
    assert scale.shape == (shape[axis],) and torch.all(zero_point == 0)
    max_abs = torch.maximum(-want_min, want_max)
    assert torch.all(scale * obs.quant_max >= max_abs)  # every channel's range is covered
    if power_of_2:
        assert scales.is_power_of_2(scale)


def _frozen_fake_quant(exponents: list[int], bits: int, axis: int | None, rank: int) -> FakeQuantize:
    """A fake-quantizer whose (per-channel) scales are 2**exponents, frozen."""
    qmin, qmax = scales.qrange(bits)
    dtype = torch.int8 if bits == 8 else torch.int16
    fq = FakeQuantize(observer=RangeObserver, dtype=dtype, quant_min=qmin, quant_max=qmax, channel_axis=axis)
    steps = torch.tensor([2.0**e for e in exponents])
    shape = [1] * rank
    if axis is not None:
        shape[axis] = len(exponents)
    fq(qmax * steps.reshape(shape))  # a range of exactly qmax steps gives the step itself
    fq.freeze()
    return fq


@PROPERTY
@given(bits=st.sampled_from([8, 16]), shape=SHAPES, per_channel=st.booleans(), data=st.data())
def test_fake_quant_equals_onnxruntime_qdq_bit_for_bit(bits, shape, per_channel, data):
    """Power-of-2 steps, values on the grid, at ties (k + 0.5) and past the range: identical results."""
    qmin, qmax = scales.qrange(bits)
    axis = data.draw(st.integers(0, len(shape) - 1)) if per_channel else None
    channels = shape[axis] if per_channel else 1
    exponents = data.draw(st.lists(st.integers(-12, 3), min_size=channels, max_size=channels))
    fq = _frozen_fake_quant(exponents, bits, axis, len(shape))
    steps = np.array([2.0**e for e in exponents], np.float32)
    assert np.array_equal(fq.scale.numpy(), steps)
    k = data.draw(hnp.arrays(np.int64, shape, elements=st.integers(qmin - 3, qmax + 3)))
    offsets = data.draw(hnp.arrays(np.float64, shape, elements=OFFSETS))
    grid = steps.reshape([-1 if d == axis else 1 for d in range(len(shape))]) if per_channel else steps[0]
    x = ((k + offsets) * grid).astype(np.float32)
    with torch.no_grad():
        ours = fq(torch.from_numpy(x)).numpy()
    scale = steps if per_channel else steps[0]
    zero_point = np.zeros(channels, np.int64) if per_channel else np.int64(0)
    _, theirs = ort_qdq(x, scale, zero_point, bits, axis)
    assert np.array_equal(ours, theirs)


def test_unsigned_form_halves_the_step_of_a_non_negative_range():
    x = torch.tensor([0.0, 0.3, 2.55])
    for power_of_2, expected in ((False, 2.55 / 255), (True, 2.0**-6)):  # 2.55/255 = 0.01 -> 2**-6 (0.0156)
        obs = RangeObserver(torch.int8, -127, 127, power_of_2=power_of_2)
        obs.make_unsigned()
        obs(x)
        scale, zero_point = obs.calculate_qparams()
        assert obs.unsigned and (obs.dtype, obs.quant_min, obs.quant_max) == (torch.uint8, 0, 255)
        assert float(scale) == pytest.approx(expected, rel=1e-6) and int(zero_point) == 0
    with pytest.raises(ValueError, match="only int8 symmetric per-tensor"):
        RangeObserver(torch.int8, -127, 127, channel_axis=0).make_unsigned()
    fake = FakeQuantize(RangeObserver, dtype=torch.int8, quant_min=-127, quant_max=127, power_of_2=True)
    fake.make_unsigned()
    assert (fake.dtype, fake.quant_min, fake.quant_max) == (torch.uint8, 0, 255)
    assert torch.equal(fake(x), torch.tensor([0.0, 0.296875, 2.546875]))  # 0.3 -> 19 steps of 2**-6 -> 0.296875
