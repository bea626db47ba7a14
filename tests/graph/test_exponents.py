import torch
from torch import nn

import edgequant as eq
from edgequant.graph.exponents import CANDIDATE_SHIFTS, output_errors
from edgequant.numerics.observers import RangeObserver
from edgequant.numerics.scales import is_power_of_2


def _measured_output_error(w: torch.Tensor, qw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-channel sum of squared conv-output errors per position, computed directly on data."""
    err = nn.functional.conv2d(x, w) - nn.functional.conv2d(x, qw)
    return err.square().mean(dim=(0, 2, 3))


def _just_above_a_power_of_2(out: int = 4, inp: int = 3) -> torch.Tensor:
    """Weights in [-0.5, 0.5] plus one weight 3% past 127 * 2**-8: the covering step doubles to 2**-7."""
    torch.manual_seed(0)
    w = (torch.rand(out, inp, 3, 3) - 0.5) * 0.9
    w[0, 0, 1, 1] = 127 * 2**-8 * 1.03
    return w


def test_output_error_of_each_candidate_matches_the_error_measured_on_data():
    w = _just_above_a_power_of_2()
    obs = RangeObserver(power_of_2=True, channel_axis=None)
    obs(w)
    x = torch.randn(4096, 3, 3, 3) * torch.tensor([0.5, 2.0, 1.0]).view(1, 3, 1, 1)  # 1x1 outputs
    energy = x.square().mean(dim=(0, 2, 3))
    scales, errors = output_errors(w, obs, energy)
    assert scales.flatten().tolist() == [2**-7, 2**-8, 2**-9][: len(CANDIDATE_SHIFTS)]
    for s, predicted in zip(scales.flatten(), errors, strict=True):
        qw = torch.clamp(torch.round(w / s), -128, 127) * s
        # independent rounding errors: the diagonal approximation is within sampling noise
        torch.testing.assert_close(predicted, _measured_output_error(w, qw, x), rtol=0.15, atol=1e-7)


def test_exponent_one_below_is_chosen_when_one_weight_sets_the_range():
    w = _just_above_a_power_of_2()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True)).eval()
    with torch.no_grad():
        model[0].weight.copy_(w)
    x = torch.randn(64, 3, 8, 8)
    chosen = eq.PTQModule(model, (x[:4],), "int8_pow2", eq.PTQConfig(bias_correction=False))
    chosen.calibrate([x], progress=False)
    ceil = eq.PTQModule(model, (x[:4],), "int8_pow2", eq.PTQConfig(bias_correction=False, weight_exponent="ceil"))
    ceil.calibrate([x], progress=False)

    def weight_scale(q: eq.PTQModule) -> float:
        (obs,) = [o for o in q.observers() if o not in q.activation_observers()]
        return float(obs.calculate_qparams()[0])

    assert weight_scale(ceil) == 2**-7
    assert weight_scale(chosen) == 2**-8
    x_test = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        reference = model(x_test)
        err_chosen = (chosen(x_test) - reference).square().mean()
        err_ceil = (ceil(x_test) - reference).square().mean()
    assert err_chosen < err_ceil


def test_exponent_stays_at_the_covering_one_when_the_large_weights_carry_the_output():
    torch.manual_seed(0)
    w = (torch.rand(4, 3, 1, 1) - 0.5) * 0.1
    w[:, 0] = 127 * 2**-8 * 1.9  # a whole input channel of large weights: clipping them costs most
    obs = RangeObserver(power_of_2=True)
    obs(w)
    scales, errors = output_errors(w, obs, torch.tensor([10.0, 0.1, 0.1]))
    assert int(torch.argmin(errors.sum(dim=1))) == 0
    assert float(scales[0]) == 2**-7


def test_per_channel_exponents_are_chosen_per_output_channel():
    w = _just_above_a_power_of_2()
    obs = RangeObserver(power_of_2=True, channel_axis=0)
    obs(w)
    scales, errors = output_errors(w, obs, None)
    best = scales.gather(0, torch.argmin(errors, dim=0)[None]).flatten()
    assert is_power_of_2(best)
    # channel 0 holds the outlier; the others' covering step already fits their range
    assert best.shape == (4,)
    for o in range(4):
        s = best[o]
        qw = torch.clamp(torch.round(w[o] / s), -128, 127) * s
        for other in scales[:, o]:
            q_other = torch.clamp(torch.round(w[o] / other), -128, 127) * other
            assert (w[o] - qw).square().sum() <= (w[o] - q_other).square().sum() + 1e-12
