import os

import numpy as np
import onnx
import pytest
import torch
import torchvision
from torch import nn
from torch.utils import _pytree as pytree

from edgequant import PTQModule, QATModule
from edgequant.export import onnx as export
from edgequant.export.onnx import choose_opset
from edgequant.export.parity import ParityError
from edgequant.export.runtime import run_onnx, session

from ..helpers import qdq_nodes


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
    dtypes = set()
    for node, scale, zero_point in qdq_nodes(path):
        assert np.all(zero_point == 0), node.name
        mantissa, _ = np.frexp(scale.astype(np.float32))
        assert np.all(mantissa == 0.5), f"{node.name}: scale {scale} is not a power of two"
        dtypes.add(zero_point.dtype)
    # The ReLU output and the mean of it are unsigned (uint8); the input and the logits int8.
    assert dtypes == {np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int32)}


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
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.options.json", "m.tidl.onnx"]  # no temporary left


def test_choose_opset_for_int8(qmodel):
    assert choose_opset(qmodel.convert(), None) == 18
    assert choose_opset(qmodel.convert(), 21) == 21


def _previous_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous model")
    return path


def test_failure_midway_keeps_the_previous_file(qmodel, tmp_path, monkeypatch):
    path = _previous_file(tmp_path)

    def crash(*args, **kwargs):
        raise RuntimeError("onnxruntime crashed")

    monkeypatch.setattr(export, "compare", crash)  # fails after the new file was written
    with pytest.raises(RuntimeError, match="crashed"):
        qmodel.export(path)
    assert path.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["m.onnx"]  # no temporary file left behind


def test_rejected_export_is_kept_aside_and_the_previous_file_survives(qmodel, tmp_path, monkeypatch):
    path = _previous_file(tmp_path)

    def disagree(*args, **kwargs):
        raise ParityError("onnxruntime disagrees")

    monkeypatch.setattr(export, "compare", disagree)
    with pytest.raises(ParityError, match=r"kept at .*m\.rejected\.onnx"):
        qmodel.export(path)
    assert path.read_bytes() == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.rejected.onnx"]
    onnx.checker.check_model(str(tmp_path / "m.rejected.onnx"))  # the complete file, for inspection


def test_unwritable_destination_is_refused_before_any_work(qmodel, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "export_onnx", None)  # must not be reached
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="not writable"):
        qmodel.export(tmp_path / "m.onnx")


def test_int16_needs_opset_21(tmp_path):
    torch.manual_seed(0)
    q16 = QATModule(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (torch.randn(2, 3, 8, 8),), "int16").eval()
    with pytest.raises(ValueError, match="opset 18 cannot express int16"):
        q16.export(tmp_path / "m.onnx", opset=18)


class TwoHeads(nn.Module):
    """Returns a dict, as torchvision's segmentation models do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)
        self.aux = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        features = torch.relu(self.body(x))
        return {"out": self.out(features), "aux": self.aux(features)}


def test_dict_outputs_become_onnx_outputs_in_order(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    qmodel = PTQModule(TwoHeads().eval(), (x[:1],)).calibrate([x], progress=False)
    result = qmodel.export(tmp_path / "seg.onnx")
    assert result.parity.max_abs_diff == 0.0
    with torch.no_grad():
        expected = qmodel(x)
    out, aux = run_onnx(session(str(result.path)), (x,))
    assert np.array_equal(out, expected["out"].numpy()) and np.array_equal(aux, expected["aux"].numpy())


def _torchvision(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=10)
    return torchvision.models.get_model(name, weights=None, num_classes=10)


def warm_bn(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """BN statistics from a few batches, as a trained model has (random-init ones are 0 / 1)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


@pytest.mark.parametrize(
    "name", ["squeezenet1_0", "shufflenet_v2_x0_5", "efficientnet_b0", "lraspp_mobilenet_v3_large"]
)
@pytest.mark.slow
def test_zoo_sample_through_ptq_and_export(name, digits_train, tmp_path):
    """A CI-sized sample of benchmarks/zoo.py: fire modules, channel shuffle, SE blocks with
    stochastic depth, and a segmentation head with a dict output."""
    x = digits_train[0]
    model = warm_bn(_torchvision(name), [x[:16], x[16:32]])
    qmodel = PTQModule(model, (x[:4],)).calibrate([x[:16], x[16:32]], progress=False)
    result = qmodel.export(tmp_path / f"{name}.onnx")
    assert result.parity.max_abs_diff == 0.0 and result.parity.top1_agreement == 1.0
    test = x[100:106]  # a batch the parity check did not see
    with torch.no_grad():
        expected = [t.numpy() for t in pytree.tree_leaves(qmodel(test))]
    got = run_onnx(session(str(result.path)), (test,))
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)
    assert float(np.abs(expected[0]).max()) > 0  # not a dead network
