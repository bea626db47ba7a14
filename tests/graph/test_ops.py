import torch
from torch import nn

import edgequant as eq
from edgequant.graph.capture import capture
from edgequant.graph.ops import (
    CONV_OPS,
    EXACT_OPS,
    MOVEMENT_OPS,
    REQUANT_OPS,
    activation_quantizer_nodes,
    constant,
    conv_groups,
    is_depthwise,
    module_name,
    producer_module,
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
