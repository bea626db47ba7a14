import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.demo.data import digits_tensors
from edgequant.graph.adaround import round_layer
from edgequant.graph.bias_correction import ObservedLayer, observed_layers, quantized_weight
from edgequant.numerics.observers import RangeObserver


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def _layer(w: torch.Tensor, per_channel: bool, power_of_2: bool) -> ObservedLayer:
    obs = RangeObserver(power_of_2=power_of_2, channel_axis=0 if per_channel else None)
    obs(w)
    return ObservedLayer(node=None, input_observer=None, weight_observer=obs, weight=w, bias=None, groups=1)


@pytest.mark.parametrize(("per_channel", "power_of_2"), [(False, True), (True, True), (True, False)])
@pytest.mark.slow
def test_learned_rounding_beats_nearest_on_held_out_inputs(per_channel, power_of_2):
    torch.manual_seed(0)
    w = torch.randn(16, 32) * 0.05
    # correlated inputs: the rounding errors of different weights no longer average out
    mix = torch.randn(32, 32) * 0.3 + torch.eye(32)
    x_train, x_test = torch.randn(4096, 32) @ mix, torch.randn(4096, 32) @ mix
    layer = _layer(w, per_channel, power_of_2)
    scale = layer.weight_observer.calculate_qparams()[0]
    s = scale.reshape(-1, 1) if per_channel else scale
    rounded = round_layer(layer, x_train.reshape(-1, 1, 32), 500, torch.Generator().manual_seed(0))
    nearest = torch.clamp(torch.round(w / s), -128, 127) * s
    # on the observer's grid, with its scale, and each weight moved to a neighbouring grid point
    q = rounded / s
    torch.testing.assert_close(q, q.round())
    offset = q.round() - torch.floor(w / s)
    assert bool(((offset == 0) | (offset == 1)).all())
    err = ((x_test @ (rounded - w).T) ** 2).mean()
    err_nearest = ((x_test @ (nearest - w).T) ** 2).mean()
    assert err < 0.7 * err_nearest


@pytest.mark.slow
def test_ptq_with_adaround_keeps_its_scales_and_exports_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    # Real images: neighbouring pixels (and the three equal channels) are correlated, which is what
    # AdaRound exploits; on white noise nearest rounding is already optimal.
    x = digits_tensors("train", size=8)[0][:64]
    plain = eq.PTQModule(model, (x[:8],), "int8_pow2").calibrate([x[:32], x[32:]], progress=False)
    learned = eq.PTQModule(model, (x[:8],), "int8_pow2", eq.PTQConfig(adaround=True))
    learned.calibrate([x[:32], x[32:]], progress=False)
    scales = {n: o.calculate_qparams()[0] for n, o in plain.model.named_modules() if isinstance(o, RangeObserver)}
    for name, obs in learned.model.named_modules():
        if isinstance(obs, RangeObserver):
            torch.testing.assert_close(obs.calculate_qparams()[0], scales[name])
    result = learned.export(tmp_path / "adaround.onnx")
    assert result.parity.max_abs_diff == 0.0
    # The first conv reads x itself: its learned weights give a closer output than nearest rounding.
    first_plain, first_learned = next(observed_layers(plain.model)), next(observed_layers(learned.model))
    w = first_plain.weight
    nearest = quantized_weight(w, first_plain.weight_observer)
    with torch.no_grad():
        reference = nn.functional.conv2d(x, w, padding=1)
        err_learned = (nn.functional.conv2d(x, first_learned.weight, padding=1) - reference).square().mean()
        err_nearest = (nn.functional.conv2d(x, nearest, padding=1) - reference).square().mean()
    assert err_learned < err_nearest
