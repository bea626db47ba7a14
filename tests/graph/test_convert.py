import copy
import math
import operator

import pytest
import torch
from torch import nn

from edgequant import QATModule
from edgequant.graph.ops import DQ_OPS

from ..helpers import FloatNormNet


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def _bias_dq(model):
    for node in model.graph.nodes:
        if node.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            x, w, b = node.args[:3]
            yield node, x, w, b


@pytest.mark.slow
def test_biases_are_int32_with_scale_input_times_weight():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    q = QATModule(Small(), (x,))
    converted = q.convert()
    seen = 0
    for _node, x_dq, w_dq, b_dq in _bias_dq(converted):
        assert b_dq.target in DQ_OPS
        q_bias = operator.attrgetter(b_dq.args[0].target)(converted)
        assert q_bias.dtype == torch.int32
        assert b_dq.args[1] == x_dq.args[1] * w_dq.args[1]  # pow2 scales: exact product
        seen += 1
    assert seen == 2


def test_converted_model_matches_eval_wrapper_within_one_step():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    q = QATModule(Small(), (x,)).eval()
    converted = q.convert()
    out_step = max(fq.scale.item() for fq in q.fake_quantizers())
    assert (q(x) - converted(x)).abs().max() <= out_step
    converted.eval()  # plain nn.Module behaviour, no torchao error


def test_int16_bias_that_would_overflow_int32_gets_a_larger_pow2_scale():
    torch.manual_seed(0)
    model = nn.Linear(16, 3)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([40.0, -0.5, 0.25]))  # 40 / (s_in * s_w) > 2**31 at 16 bit
    x = torch.randn(8, 16)
    converted = QATModule(model, (x,), "int16_pow2").eval().convert()
    ((_, x_dq, w_dq, b_dq),) = list(_bias_dq(converted))
    product = x_dq.args[1] * w_dq.args[1]
    ratio = b_dq.args[1] / product
    assert ratio > 1 and ratio == 2 ** round(math.log2(ratio))  # a power-of-2 multiple
    q_bias = operator.attrgetter(b_dq.args[0].target)(converted)
    assert int(q_bias.abs().max()) <= 2**31 - 1
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), atol=1e-2, rtol=1e-3)


@pytest.mark.filterwarnings("ignore::edgequant.UnquantizedOpsWarning")
def test_convert_leaves_the_training_graph_alone_and_shares_no_tensor_with_it():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    q = QATModule(FloatNormNet(), (x,))  # its layer norm keeps float weights.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    converted = q.convert()
    after = q.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ours = {t.untyped_storage().data_ptr() for t in [*converted.parameters(), *converted.buffers()]}
    theirs = {t.untyped_storage().data_ptr() for t in [*q.parameters(), *q.buffers()]}
    assert not ours & theirs
    expected = converted(x)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(1.0)  # training goes on after the convert
    assert torch.equal(converted(x), expected)


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ptq", "qat"])
def test_to_qdq_matches_torchaos_convert_on_a_graph_with_standalone_bn(wrapper):
    """Skipping torchao's QAT conv+BN fold changes nothing: same nodes, same outputs, bit for bit."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from edgequant import PTQModule
    from edgequant.graph.batchnorm import fold_fused_bn, set_graph_training
    from edgequant.graph.convert import rerange_weights, to_qdq

    from ..helpers import tiny_densenet

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    if wrapper == "ptq":
        q = PTQModule(tiny_densenet(), (x,)).calibrate([x], progress=False)
    else:
        q = QATModule(tiny_densenet(), (x,))
        q(x)

    def ready():
        model = copy.deepcopy(q.model)
        set_graph_training(model, dropout=False, batchnorm=False)
        fold_fused_bn(model)
        rerange_weights(model)
        return model

    ours, theirs = to_qdq(ready()), convert_pt2e(ready(), fold_quantize=True)
    assert any("batch_norm" in str(n.target) for n in ours.graph.nodes)  # the case the fold searched for
    assert [str(n.target) for n in ours.graph.nodes] == [str(n.target) for n in theirs.graph.nodes]
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_converted_model_keeps_no_float_copy_of_quantized_weights():
    """Without BN to fold (a ViT's linear layers), the float weights stay module attributes after
    constant folding; convert drops them instead of copying them (a float model's worth of memory)."""
    from edgequant import PTQModule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.randn(8, 16)
    q = PTQModule(model, (x,)).calibrate([x], progress=False)
    converted = q.convert()
    read = {n.target for n in converted.graph.nodes if n.op == "get_attr"}
    tensors = dict([*converted.named_parameters(), *converted.named_buffers()])
    assert set(tensors) <= read
    weights = [t for t in tensors.values() if t.shape in {(32, 16), (10, 32)}]
    assert len(weights) == 2 and all(t.dtype == torch.int8 for t in weights)
    with torch.no_grad():
        assert torch.equal(converted(x), q(x))
