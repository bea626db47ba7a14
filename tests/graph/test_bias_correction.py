import torch
from torch import nn

import edgequant as eq
from edgequant.graph.bias_correction import mean_shift


def test_mean_shift_matches_direct_computation():
    torch.manual_seed(0)
    w = torch.randn(6, 2, 1, 1)
    qw = torch.round(w * 4) / 4
    x = torch.randn(16, 4, 5, 5) + torch.tensor([1.0, -2.0, 0.5, 3.0]).view(1, 4, 1, 1)
    # 1x1 kernels, groups=2: the mean output error is exactly linear in the channel means
    err = nn.functional.conv2d(x, w, groups=2) - nn.functional.conv2d(x, qw, groups=2)
    expected = err.mean(dim=(0, 2, 3))
    got = mean_shift(w, qw, x.mean(dim=(0, 2, 3)), groups=2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _node_values(graph: torch.fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's output when `graph` runs on x, by node name."""
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n.name] = out
            return out

    Recorder(graph).run(x)
    return values


def _mean_conv_error(qmodel, model, x):
    """Mean over the data of (quantized-weight conv - float conv), per channel."""
    quantized = qmodel.convert()
    conv_q = next(n for n in quantized.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    # run the converted graph up to the conv with float (dequantized-input) arithmetic
    values = _node_values(quantized, x)
    y_q = values[conv_q.name]
    y = model.conv(values[conv_q.args[0].name])  # same (quantized) input, float weights
    return (y_q - y).mean(dim=(0, 2, 3))


def test_bias_correction_zeroes_mean_output_error():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.conv.weight.mul_(3.0)  # coarse int8 steps, visible rounding shift
    x = torch.randn(64, 3, 6, 6) + 0.5
    loader = [x[i : i + 16] for i in range(0, 64, 16)]
    plain = eq.PTQModule(model, (x[:8],), config=eq.PTQConfig(bias_correction=False, range_estimator="minmax"))
    corrected = eq.PTQModule(model, (x[:8],), config=eq.PTQConfig(bias_correction=True, range_estimator="minmax"))
    plain.calibrate(loader, progress=False)
    corrected.calibrate(loader, progress=False)
    before = _mean_conv_error(plain, model, x).abs().max()
    after = _mean_conv_error(corrected, model, x).abs().max()
    assert before > 1e-3
    assert after < before / 5


class Tokens(nn.Module):
    """A linear layer over the last dim of (N, T, C) tokens, as in transformers' MLPs."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(12, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.mix(x).mean(1))


def _mean_linear_error(qmodel, model, x):
    """Mean over the data of (converted `mix` - float `mix` on the same quantized input), per channel."""
    quantized = qmodel.convert()
    mix = next(n for n in quantized.graph.nodes if n.target == torch.ops.aten.linear.default)
    values = _node_values(quantized, x)
    return (values[mix.name] - model.mix(values[mix.args[0].name])).mean(dim=(0, 1))


def test_bias_correction_on_channels_last_linear_layers():
    torch.manual_seed(0)
    model = Tokens().eval()
    with torch.no_grad():
        model.mix.weight.mul_(4.0)  # coarse int8 steps, visible rounding shift
    x = torch.randn(64, 7, 12) + torch.linspace(-1.0, 2.0, 12)  # T = 7 != C = 12, channel means far from 0
    loader = [x[i : i + 16] for i in range(0, 64, 16)]
    results = []
    for correct in (False, True):
        qmodel = eq.PTQModule(model, (x[:8],), config=eq.PTQConfig(bias_correction=correct))
        qmodel.calibrate(loader, progress=False)
        with torch.no_grad():
            results.append(_mean_linear_error(qmodel, model, x).abs().max())
    before, after = results
    assert before > 1e-3
    assert after < before / 5
