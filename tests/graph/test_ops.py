import torch
from torch import nn

import edgequant as eq
from edgequant.graph.capture import capture
from edgequant.graph.ops import (
    CONV_OPS,
    EXACT_OPS,
    MATMUL_OPS,
    MOVEMENT_OPS,
    REQUANT_OPS,
    activation_quantizer_nodes,
    constant,
    conv_groups,
    is_depthwise,
    module_name,
    nonnegative_nodes,
    producer_module,
    reaches,
    sole_user,
)
from edgequant.numerics.observers import RangeObserver


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.dw(self.conv(x)))
        return self.fc(y.mean((2, 3)))


def _graph(net: nn.Module | None = None):
    return capture((net or Net()).eval(), (torch.randn(2, 3, 8, 8),), False)


def test_conv_helpers_read_the_graph():
    net = Net()
    gm = _graph(net)
    convs = [n for n in gm.graph.nodes if n.target in CONV_OPS]
    assert [module_name(n) for n in convs] == ["conv", "dw"]
    assert [conv_groups(n) for n in convs] == [1, 4]
    assert [is_depthwise(n) for n in convs] == [False, True]
    assert torch.equal(constant(gm, convs[1].args[1]), net.dw.weight)
    assert constant(gm, convs[1].args[0]) is None  # an activation, not a constant
    assert sole_user(convs[0]) is convs[1]


def test_a_functional_op_is_named_after_its_producer():
    gm = _graph()
    relu = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.relu.default)
    assert module_name(relu) == "" and producer_module(relu) == "dw"


def test_activation_quantizers_are_told_from_weight_quantizers_by_what_they_read():
    x = torch.randn(2, 3, 8, 8)
    ptq = eq.PTQModule(Net().eval(), (x,), "int8_pow2")
    found = activation_quantizer_nodes(ptq.model, RangeObserver)
    every = [m for m in ptq.model.modules() if isinstance(m, RangeObserver)]
    assert found and len(found) < len(every)
    assert all(node.args[0].op != "get_attr" for node, _ in found)
    weights = [m for m in every if all(m is not obs for _, obs in found)]
    assert len(weights) == 3  # conv, dw and fc weights


def test_the_vocabulary_sets_do_not_contradict_each_other():
    # a value-moving op computes nothing to requantize, and every one of them is exact
    assert not set(MOVEMENT_OPS) & set(REQUANT_OPS)
    assert set(MOVEMENT_OPS) <= EXACT_OPS


class Signs(nn.Module):
    """Each line's result is named after whether it can be negative."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("bound", torch.full((1, 4, 1, 1), 6.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        signed_conv = self.conv(x)
        relu = torch.relu(signed_conv)
        relu6 = nn.functional.relu6(signed_conv)
        hardtanh_pos = nn.functional.hardtanh(signed_conv, 0.0, 6.0)
        hardtanh_neg = nn.functional.hardtanh(signed_conv)  # min -1
        clamp_pos = torch.clamp(signed_conv, min=0.5)
        clamp_neg = torch.clamp(signed_conv, min=-1.0)
        pool = nn.functional.max_pool2d(relu, 2)
        mean = relu.mean((2, 3))
        total = relu + relu6 * 2.0
        signed_scaled = relu * -1.0
        signed_sum = relu + signed_conv
        bounded = torch.minimum(relu, self.bound)
        joined = torch.cat([relu, pool.repeat(1, 1, 2, 2)], 1)
        signed_gate = torch.sigmoid(signed_conv) * relu
        flat = relu.flatten(1)
        product = flat @ flat.t()
        return (
            hardtanh_pos,
            hardtanh_neg,
            clamp_pos,
            clamp_neg,
            mean,
            total,
            signed_scaled,
            signed_sum,
            bounded,
            joined,
            signed_gate,
            product,
        )


def test_nonnegative_nodes_follow_each_ops_sign():
    gm = _graph(Signs())
    found = nonnegative_nodes(gm)
    aten = torch.ops.aten
    by_op = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            by_op.setdefault(node.target, []).append(node in found)
    assert by_op[aten.conv2d.default] == [False]
    assert by_op[aten.relu.default] == [True]
    assert by_op[aten.relu6.default] == [True]
    assert by_op[aten.hardtanh.default] == [True, False]  # min 0 / min -1
    assert by_op[aten.clamp.default] == [True, False]  # min 0.5 / min -1
    assert by_op[aten.max_pool2d.default] == [True]
    assert by_op[aten.mean.dim] == [True]
    # relu6 * 2.0 and relu + that; relu * -1.0; relu + conv; sigmoid(conv) * relu
    assert by_op[aten.mul.Tensor] == [True, False, False]
    assert by_op[aten.add.Tensor] == [True, False]
    assert by_op[aten.minimum.default] == [True]  # the bound is a non-negative constant
    assert by_op[aten.cat.default] == [True]
    assert by_op[aten.sigmoid.default] == [False]  # gates are kept signed on purpose
    assert by_op[aten.matmul.default] == [False]
    flat = next(n for n in gm.graph.nodes if n.target == aten.flatten.using_ints)
    relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
    assert reaches(flat, MATMUL_OPS) and reaches(relu, MATMUL_OPS)
    conv = next(n for n in gm.graph.nodes if n.target == aten.conv2d.default)
    assert not reaches(conv, MATMUL_OPS)
