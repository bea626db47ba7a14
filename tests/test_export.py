import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgequant import QATModule
from edgequant.export import choose_opset

from .conftest import qdq_nodes


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


@pytest.fixture(scope="module")
def qmodel():
    torch.manual_seed(0)
    return QATModule(Net(), (torch.randn(8, 3, 8, 8),)).eval()


def test_qdq_graph_is_engine_ready(qmodel, tmp_path):
    path = tmp_path / "net.onnx"
    qmodel.export(path)
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert not {"BatchNormalization", "Dropout"} & set(ops)
    producers = {o: n for n in model.graph.node for o in n.output}
    # The network input goes straight into a QuantizeLinear.
    assert [n.op_type for n in model.graph.node if "x" in n.input] == ["QuantizeLinear"]
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            for name in node.input:
                assert producers[name].op_type == "DequantizeLinear", f"{node.name} input {name} not dequantized"
            consumers = [n for n in model.graph.node if node.output[0] in n.input]
            assert consumers, node.name
    for node, scale, zero_point in qdq_nodes(path):
        assert np.all(zero_point == 0), node.name
        mantissa, _ = np.frexp(scale.astype(np.float32))
        assert np.all(mantissa == 0.5), f"{node.name}: scale {scale} is not a power of two"
        assert zero_point.dtype in (np.int8, np.int32), node.name


def test_weights_are_int8(qmodel, tmp_path):
    path = tmp_path / "net.onnx"
    qmodel.export(path)
    model = onnx.load(str(path))
    init = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            weight_dq = next(n for n in model.graph.node if node.input[1] in n.output)
            assert init[weight_dq.input[0]].data_type == onnx.TensorProto.INT8
            bias_dq = next(n for n in model.graph.node if node.input[2] in n.output)
            assert init[bias_dq.input[0]].data_type == onnx.TensorProto.INT32


def test_missing_directory_and_bad_opset(qmodel, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qmodel.export(tmp_path / "nope" / "m.onnx")
    with pytest.raises(ValueError, match="opset 11"):
        qmodel.export(tmp_path / "m.onnx", opset=11)


def test_export_replaces_file_atomically(qmodel, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    qmodel.export(path)
    assert path.read_bytes() != b"previous"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.options.json"]  # no temporary left behind


def test_choose_opset_for_int8(qmodel):
    assert choose_opset(qmodel.convert(), None) == 18
    assert choose_opset(qmodel.convert(), 21) == 21
