import copy

import torch
from torch import nn
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

from edgequant.graph.batchnorm import (
    attach_bn_factors,
    fold_fused_bn,
    fuse_conv_bn_for_qat,
    reestimate_bn,
    set_graph_training,
    zero_dead_channels,
)
from edgequant.graph.capture import capture
from edgequant.graph.ops import BN_OPS
from edgequant.graph.quantizer import EdgeQuantizer
from edgequant.numerics.scheme import get_scheme


class ConvBN(nn.Module):
    def __init__(self, eps: float, momentum: float, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(8, eps=eps, momentum=momentum)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(torch.relu(self.bn(self.conv(x))))


def trained_bn(eps=1e-3, momentum=0.01, bias=True):
    torch.manual_seed(0)
    m = ConvBN(eps, momentum, bias)
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.0, 2.0)
        m.bn.running_var[0] = 0.0  # a dead channel: only eps keeps it finite
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


def test_fused_form_matches_float_in_eval_and_keeps_eps_momentum():
    m = trained_bn()
    x = torch.randn(4, 3, 8, 8)
    gm = capture(m, (x,))
    assert fuse_conv_bn_for_qat(gm) == 1
    set_graph_training(gm, dropout=False, batchnorm=False)
    torch.testing.assert_close(gm(x), m(x), rtol=1e-4, atol=1e-4)
    bn = next(n for n in gm.graph.nodes if n.target in BN_OPS)
    assert bn.args[6:8] == (0.01, 1e-3)


def test_fused_form_updates_running_stats_with_model_momentum():
    m = trained_bn()
    reference = copy.deepcopy(m).train()
    x = torch.randn(4, 3, 8, 8)
    gm = capture(m, (x,))
    fuse_conv_bn_for_qat(gm)
    set_graph_training(gm, dropout=False, batchnorm=True)
    reference.drop.p = 0.0
    gm(x)
    reference(x)
    torch.testing.assert_close(gm.bn.running_mean, reference.bn.running_mean, rtol=1e-5, atol=1e-6)


def _prepared(m, x):
    prepared = prepare_qat_pt2e(capture(m, (x,)), EdgeQuantizer(get_scheme("int8_pow2"), qat=True))
    attach_bn_factors(prepared)
    set_graph_training(prepared, dropout=False, batchnorm=False)
    return prepared


def test_fold_matches_float_with_custom_eps():
    m = trained_bn(eps=1e-3, bias=True)
    x = torch.randn(4, 3, 8, 8)
    prepared = _prepared(m, x)
    for fq in prepared.modules():
        if hasattr(fq, "disable_fake_quant"):
            fq.disable_fake_quant()
    torch.testing.assert_close(prepared(x), m(x), rtol=1e-4, atol=1e-4)
    assert fold_fused_bn(prepared) == 1
    assert not any(n.target in BN_OPS for n in prepared.graph.nodes)
    torch.testing.assert_close(prepared(x), m(x), rtol=1e-4, atol=1e-4)
    # The conv's and BN's replaced tensors are gone: one folded weight and bias remain.
    floats = [k for k, v in prepared.state_dict().items() if v.numel() > 1 and "activation_post_process" not in k]
    assert len(floats) == 2 and all("folded" in k for k in floats), floats


def test_fold_after_prepare_keeps_weight_quantizer():
    m = trained_bn(bias=False)
    x = torch.randn(4, 3, 8, 8)
    prepared = _prepared(m, x)
    before = prepared(x)
    folded = copy.deepcopy(prepared)
    fold_fused_bn(folded)
    after = folded(x)
    # Same quantized weights; activations may flip by one step through float rounding.
    step = max(m.scale.item() for m in prepared.modules() if hasattr(m, "scale") and m.scale.numel() == 1)
    assert (before - after).abs().max() <= step


def test_set_graph_training_switches_dropout():
    m = trained_bn()
    x = torch.ones(2, 3, 8, 8)
    gm = capture(m, (x,))
    set_graph_training(gm, dropout=False, batchnorm=False)
    torch.testing.assert_close(gm(x), gm(x))
    set_graph_training(gm, dropout=True, batchnorm=False)
    out = gm(x)
    assert (out == 0).float().mean() > 0.3  # half the activations dropped


def test_reestimate_bn_recomputes_statistics_from_data():
    torch.manual_seed(0)
    m = trained_bn(eps=1e-5, momentum=0.1, bias=False)
    x = torch.randn(32, 3, 8, 8) * 2 + 1
    gm = capture(m, (x[:4],))
    set_graph_training(gm, dropout=False, batchnorm=False)
    batches = [(x[i : i + 8],) for i in range(0, 32, 8)]
    assert reestimate_bn(gm, batches) == 1
    with torch.no_grad():
        conv_out = torch.cat([m.conv(b[0]) for b in batches])
    expected_mean = torch.stack([m.conv(b[0]).mean((0, 2, 3)) for b in batches]).mean(0).detach()
    torch.testing.assert_close(gm.bn.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    assert gm.bn.running_var.shape == conv_out.shape[1:2]
    bn = next(n for n in gm.graph.nodes if n.target in BN_OPS)
    assert bn.args[5] is False and bn.args[6] == 0.1  # back in eval mode, momentum restored


class DeadDepthwise(nn.Module):
    """conv -> ReLU whose channel 0 is always 0, then a depthwise conv whose BN saw only zeros there."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.stem.weight[0] = 0.0
            self.stem.bias[0] = -1.0  # relu(-1) == 0 on every input
            self.dw.weight.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.running_var[0] = 0.0
            self.bn.running_mean[0] = 0.0
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.bn(self.dw(torch.relu(self.stem(x))))


def test_dead_channels_are_zeroed_without_changing_the_function():
    torch.manual_seed(0)
    model = DeadDepthwise().eval()
    x = torch.randn(4, 3, 8, 8)
    original = copy.deepcopy(model.state_dict())
    graph = capture(model, (x,))
    set_graph_training(graph, dropout=False, batchnorm=False)
    expected = graph(x)
    # Folded, channel 0's weights are ~316x the others': they alone would set a per-tensor range.
    factor = model.bn.weight.detach() / torch.sqrt(model.bn.running_var + model.bn.eps)
    assert float(factor[0]) > 100 * float(factor[1:].max())
    found = zero_dead_channels(graph)
    assert found == {"dw": [0]}
    assert torch.equal(graph(x), expected)  # the dead weights only ever multiplied zeros
    weight = graph.dw.weight.detach()
    assert float(weight[0].abs().max()) == 0.0 and float(weight[1:].abs().min()) > 0.0
    set_graph_training(graph, dropout=False, batchnorm=True)
    assert torch.equal(graph(x)[:, 0], torch.full_like(graph(x)[:, 0], float(model.bn.bias[0])))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())  # the user's model is untouched


def test_a_layer_that_never_saw_data_is_left_alone():
    model = ConvBN(1e-5, 0.1, bias=True).eval()
    with torch.no_grad():
        model.bn.running_var.zero_()
    graph = capture(model, (torch.randn(2, 3, 8, 8),))
    assert zero_dead_channels(graph) == {}
