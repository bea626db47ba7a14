import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import edgequant as eq
from edgequant.export.runtime import run_onnx, session
from edgequant.export.tidl import Layer, layers, options, strip_int16


def test_options_for_each_kind_of_scheme():
    eight = [Layer("conv", "relu", 8, 8), Layer("fc", "fc", 8, 8)]
    mixed = [Layer("conv", "relu", 16, 16), Layer("fc", "fc", 8, 8)]
    pow2 = options(eq.get_scheme("int8_pow2"), eight)
    assert pow2 == {
        "advanced_options:prequantized_model": 1,
        "advanced_options:quantization_scale_type": 1,
        "tensor_bits": 8,
        "accuracy_level": 0,
    }
    assert options(eq.get_scheme("int8"), eight)["advanced_options:quantization_scale_type"] == 4
    mixed_opts = options(eq.get_scheme("int8_pow2").with_high_precision(["conv"]), mixed)
    assert mixed_opts["advanced_options:output_feature_16bit_names_list"] == "relu"
    assert mixed_opts["advanced_options:params_16bit_names_list"] == "conv"
    sixteen = options(eq.get_scheme("int16"), [Layer("conv", "relu", 16, 16)])
    assert sixteen["tensor_bits"] == 16 and sixteen["advanced_options:prequantized_model"] == 0
    assert "advanced_options:params_16bit_names_list" not in sixteen


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_strip_int16_leaves_a_float_graph_that_matches(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    model = Net().eval()
    qmodel = eq.QATModule(model, (x,), "int16").eval()
    result = qmodel.export(tmp_path / "m.onnx")
    found = layers(onnx.load(str(result.path)))
    assert [(layer.weight_bits, layer.output_bits) for layer in found] == [(16, 16), (16, 16)]
    stripped, removed = strip_int16(onnx.load(str(result.path)))
    assert removed >= 3  # input, conv output, logits
    assert not any(
        n.op_type in ("QuantizeLinear", "DequantizeLinear")
        for n in stripped.graph.node
        if n.op_type == "QuantizeLinear"
    )
    assert all(numpy_helper.to_array(t).dtype != np.int16 for t in stripped.graph.initializer)
    path = tmp_path / "float.onnx"
    onnx.save(stripped, str(path))
    out = run_onnx(session(str(path)), (x,))[0]
    with torch.no_grad():
        reference = model(x).numpy()
    # 16-bit quantization error only: tiny against the float model
    assert np.abs(out - reference).max() < 1e-2 * np.abs(reference).max()


class SqueezeExcite(torch.nn.Module):
    """conv -> hardswish, a squeeze-excitation gate (x * hardsigmoid(...)), mobilenet_v3's classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = torch.nn.Conv2d(8, 4, 1)
        self.excite = torch.nn.Conv2d(4, 8, 1)
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Hardswish(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4)
        )

    def forward(self, x):
        x = torch.nn.functional.hardswish(self.conv(x))
        gate = torch.nn.functional.hardsigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return self.classifier((x * gate).mean((2, 3)))


@pytest.mark.parametrize("scheme", ["int16", "int16_pow2"])
@pytest.mark.parametrize("net", [Net, SqueezeExcite])
def test_int16_exports_strip_to_a_valid_float_graph(net, scheme, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    model = net().eval()
    qmodel = eq.PTQModule(model, (x,), scheme).calibrate([x], progress=False)
    result = qmodel.export(tmp_path / "m.onnx")
    assert result.tidl_path is not None
    stripped = onnx.load(str(result.tidl_path))
    onnx.checker.check_model(stripped)  # topologically sorted, every input defined
    out = run_onnx(session(str(result.tidl_path)), (x,))[0]
    with torch.no_grad():
        reference = model(x).numpy()
    assert np.abs(out - reference).max() < 1e-2 * np.abs(reference).max()
