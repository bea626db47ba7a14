import operator

import torch
from torch import nn

from edgequant.graph.batchnorm import fold_bn, set_graph_training
from edgequant.graph.capture import capture
from edgequant.graph.equalization import equalize, pairs
from edgequant.graph.ops import BOUND_OP


class Chain(nn.Module):
    """conv -> ReLU6 -> depthwise -> ReLU -> pointwise, with badly spread channel ranges."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pw = nn.Conv2d(6, 4, 1)
        with torch.no_grad():
            self.a.weight.mul_(torch.tensor([100.0, 0.01, 1.0, 5.0, 0.2, 30.0]).view(6, 1, 1, 1))

    def forward(self, x):
        return self.pw(torch.relu(self.dw(nn.functional.relu6(self.a(x)))))


def _channel_ranges(gm):
    conv = [n for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    w = [operator.attrgetter(n.args[1].target)(gm) for n in conv]
    return [x.abs().reshape(x.shape[0], -1).amax(1) for x in w], w


def test_equalization_preserves_function_and_evens_ranges():
    torch.manual_seed(0)
    model = Chain().eval()
    x = torch.randn(4, 3, 8, 8)
    gm = capture(model, (x,))
    fold_bn(gm)
    set_graph_training(gm, dropout=False, batchnorm=False)
    before = gm(x)
    spread_before = _channel_ranges(gm)[0][0]
    assert len(pairs(gm)) == 2
    assert equalize(gm) == 2
    torch.testing.assert_close(gm(x), before, rtol=1e-4, atol=1e-5)  # ReLU6 handled exactly
    assert any(n.target == BOUND_OP for n in gm.graph.nodes)
    (r_a, r_dw, _), (_, _, w_pw) = _channel_ranges(gm)
    # Converged CLE: for each pair, A's output ranges are proportional to B's input ranges.
    r_pw_in = w_pw.abs().amax(dim=(0, 2, 3))
    torch.testing.assert_close(r_a / r_a.max(), r_dw / r_dw.max(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(r_dw / r_dw.max(), r_pw_in / r_pw_in.max(), rtol=1e-2, atol=1e-3)
    assert (r_a.max() / r_a.min()) < (spread_before.max() / spread_before.min()) / 100


def test_residual_branches_are_not_paired():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) + y  # y has two users

    gm = capture(Residual().eval(), (torch.randn(2, 4, 4, 4),))
    assert pairs(gm) == []
