import torch

from edgequant.observers import FakeQuantize, RangeObserver


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
    folded = (w.detach() * s.view(-1, 1, 1, 1))
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
