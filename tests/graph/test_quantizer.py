"""Each preset's rules, read back from the exported ONNX file; mixed-precision boundaries."""

import dataclasses
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import edgequant as eq
from edgequant.core.errors import UnquantizedOpsWarning
from edgequant.export.runtime import run_onnx, session

from ..helpers import constant_values, warmed_model

PRESETS = ("int8_pow2", "int8", "int8_pow2_dw", "int16", "int16_pow2")


def _is_pow2(a: np.ndarray) -> bool:
    return bool(np.all(np.frexp(a.astype(np.float32))[0] == 0.5))


@pytest.fixture(scope="module")
def data(digits_train):
    return digits_train


@pytest.mark.parametrize("model_name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_rules_in_onnx(preset, model_name, data, digits_model, tmp_path):
    x, y = data
    scheme = eq.get_scheme(preset)
    qmodel = eq.QATModule(digits_model(model_name), (x[:16],), preset)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=1e-3, momentum=0.9)
    qmodel.train()
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(qmodel(x[:16]), y[:16]).backward()
    optimizer.step()
    qmodel.eval()
    result = qmodel.export(tmp_path / "m.onnx")  # raises ParityError on disagreement
    assert result.parity.top1_agreement == 1.0
    if scheme.power_of_2 and scheme.activation_bits == 8:
        assert result.parity.max_abs_diff == 0.0 and result.parity.rounding is None
    assert result.opset == (21 if scheme.activation_bits == 16 else 18)

    model = onnx.load(str(result.path))
    values = constant_values(model)
    wdtype = np.int8 if scheme.weight_bits == 8 else np.int16
    adtype = np.int8 if scheme.activation_bits == 8 else np.int16
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    checked_weights = 0
    unsigned = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = values[node.input[1]]
        zero_point = values[node.input[2]]
        assert np.all(zero_point == 0) or not scheme.symmetric_activations, node.name
        if scheme.power_of_2:
            assert _is_pow2(scale), f"{node.name}: {scale}"
        source = values.get(node.input[0])
        if node.op_type == "QuantizeLinear":
            # 8-bit activations after a ReLU / ReLU6 are uint8 (Scheme.unsigned_activations).
            unsigned += zero_point.dtype == np.uint8 and adtype == np.int8
            assert zero_point.dtype == adtype or unsigned, node.name
            continue
        if source is None or source.dtype == np.int32:  # activation DQ or int32 bias
            continue
        # a weight: which layer reads it, and is that layer depthwise?
        (layer,) = consumers[node.output[0]]
        group = next((a.i for a in layer.attribute if a.name == "group"), 1)
        depthwise = layer.op_type == "Conv" and group > 1 and source.shape[1] == 1
        per_channel = scheme.weight_granularity == "per_channel" or (
            scheme.weight_granularity == "depthwise_per_channel" and depthwise
        )
        assert source.dtype == wdtype, node.name
        assert np.all(zero_point == 0), node.name
        if per_channel:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            assert scale.shape == (source.shape[0],) and axis == 0, node.name
        else:
            assert scale.size == 1, node.name
        checked_weights += 1
    assert checked_weights == sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
    assert (unsigned > 0) == (scheme.activation_bits == 8)


def _int16_q_inputs(model: onnx.ModelProto) -> set[str]:
    values = constant_values(model)
    return {
        n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and values[n.input[2]].dtype == np.int16
    }


def test_mixed_precision_names_only_the_chosen_layers(data, digits_model, tmp_path):
    x, _ = data
    scheme = eq.get_scheme("int8_pow2").with_high_precision(["conv1", "fc"])
    qmodel = eq.QATModule(digits_model("resnet18"), (x[:16],), scheme).eval()
    result = qmodel.export(tmp_path / "mixed.onnx")
    # 16-bit products exceed float32's exact range, so only rounding-level differences are allowed
    assert result.parity.top1_agreement == 1.0
    model = onnx.load(str(result.path))
    values = constant_values(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    sixteen_bit_layers = set()
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            weight_dq = producer[node.input[1]]
            if values[weight_dq.input[0]].dtype == np.int16:
                sixteen_bit_layers.add(node.output[0])
    assert len(sixteen_bit_layers) == 2
    options = json.loads(result.options_path.read_text())
    assert options["advanced_options:prequantized_model"] == 0  # float for TIDL, our ranges in the prototxt
    assert options["advanced_options:quant_params_proto_path"] == result.quant_params_path.name
    assert options["advanced_options:quantization_scale_type"] == 1
    assert options["tensor_bits"] == 8
    assert set(options["advanced_options:params_16bit_names_list"].split(",")) == sixteen_bit_layers
    features = set(options["advanced_options:output_feature_16bit_names_list"].split(","))
    assert len(features) == 2
    # int16 tensors: the network input (read by the 16-bit stem), the two layer outputs,
    # and the max-pool output that shares the stem's quantization. Nothing else.
    int16 = _int16_q_inputs(model)
    assert features <= int16
    extra = int16 - features - {model.graph.input[0].name}
    assert all(producer[name].op_type == "MaxPool" for name in extra), extra
    # no orphan Q/DQ: every QuantizeLinear feeds only DequantizeLinear nodes
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            users = [n for n in model.graph.node if node.output[0] in n.input]
            assert users and all(u.op_type == "DequantizeLinear" for u in users)

    # The TIDL model is float (its ranges are in the prototxt), keeps the layer names, and runs.
    tidl = onnx.load(str(result.tidl_path))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in tidl.graph.node)
    assert all(numpy_helper.to_array(t).dtype != np.int16 for t in tidl.graph.initializer)
    names = {o for n in tidl.graph.node for o in n.output}
    assert sixteen_bit_layers <= names and features <= names
    assert run_onnx(session(str(result.tidl_path)), (x[:1],))[0].shape == (1, 10)


@pytest.mark.parametrize("choice", ["first_last", lambda name: name in ("conv1", "fc")])
@pytest.mark.slow
def test_high_precision_rule_and_callable(choice, data):
    x, _ = data
    scheme = eq.get_scheme("int8_pow2").with_high_precision(choice)
    qmodel = eq.QATModule(warmed_model("resnet18", x, steps=1), (x[:8],), scheme)
    int16_weights = [
        fq
        for fq in qmodel.fake_quantizers()
        if fq.activation_post_process.averaging_constant == 1.0 and fq.dtype == torch.int16
    ]
    assert len(int16_weights) == 2


def test_unknown_high_precision_name_lists_layers(data):
    x, _ = data
    scheme = eq.get_scheme("int8_pow2").with_high_precision(["classifier"])
    with pytest.raises(ValueError, match=r"classifier.*conv1"):
        eq.QATModule(warmed_model("resnet18", x, steps=1), (x[:8],), scheme)


@pytest.mark.slow
def test_int16_only_model_goes_to_tidl_in_float(data, tmp_path):
    x, _ = data
    qmodel = eq.QATModule(warmed_model("resnet18", x, steps=1), (x[:8],), "int16_pow2").eval()
    result = qmodel.export(tmp_path / "m16.onnx")
    options = json.loads(result.options_path.read_text())
    assert options["tensor_bits"] == 16 and options["advanced_options:prequantized_model"] == 0
    tidl = onnx.load(str(result.tidl_path))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and "int16" in n.name for n in tidl.graph.node)
    assert not _int16_q_inputs(tidl)


class ReusedReLU(nn.Module):
    """One nn.ReLU module called after two convs (as torchvision's BasicBlock does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _consumers(model: onnx.ModelProto, name: str) -> list[str]:
    return [n.op_type for n in model.graph.node if name in n.input]


def test_a_reused_relu_is_fused_at_each_call(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    qmodel = eq.PTQModule(ReusedReLU().eval(), (x,)).calibrate([x], progress=False)
    result = qmodel.export(tmp_path / "relu.onnx")
    assert result.parity.max_abs_diff == 0.0
    model = onnx.load(str(result.path))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    for conv in convs:  # conv -> relu -> one requantization, at both call sites
        assert _consumers(model, conv.output[0]) == ["Relu"]
        relu = next(n for n in model.graph.node if conv.output[0] in n.input)
        assert _consumers(model, relu.output[0]) == ["QuantizeLinear"]


class Attention(nn.Module):
    """Ops without a quantization rule: layer norm, matmul, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.query = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        tokens = self.norm(self.conv(x).flatten(2).transpose(1, 2))
        weights = torch.softmax(self.query(tokens) @ tokens.transpose(1, 2), dim=-1)
        return self.head((weights @ tokens).mean(1))


@pytest.mark.slow
def test_ops_without_a_rule_stay_float_with_a_warning_naming_them(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    with pytest.warns(UnquantizedOpsWarning) as record:
        qmodel = eq.PTQModule(Attention().eval(), (x,))
    text = str(record[0].message)
    assert "aten.layer_norm x1 (e.g. in `norm`)" in text
    assert "aten.softmax" in text and "aten.matmul x2" in text
    assert "transpose" not in text and "flatten" not in text  # moving values needs no rule
    qmodel.calibrate([x], progress=False)
    result = qmodel.export(tmp_path / "attention.onnx")
    model = onnx.load(str(result.path))
    norm = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producer[norm.input[0]] == "Transpose" and _consumers(model, norm.output[0])  # float, in place
    with torch.no_grad():
        ours = qmodel(x).numpy()
    assert np.abs(run_onnx(session(str(result.path)), (x,))[0] - ours).max() <= result.parity.output_step


@pytest.mark.slow
def test_bn_without_a_conv_before_it_is_requantized(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)
    ).eval()  # pre-activation: BN after a ReLU, as in DenseNet
    with torch.no_grad():
        model[2].running_mean.uniform_(-0.5, 0.5)
        model[2].running_var.uniform_(0.5, 2.0)
    x = torch.randn(8, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnquantizedOpsWarning)
        qmodel = eq.PTQModule(model, (x,)).calibrate([x], progress=False)
    result = qmodel.export(tmp_path / "preact.onnx")
    assert result.parity.max_abs_diff == 0.0
    onnx_model = onnx.load(str(result.path))
    producer = {o: n.op_type for n in onnx_model.graph.node for o in n.output}
    (bn,) = [n for n in onnx_model.graph.node if n.op_type == "BatchNormalization"]
    assert producer[bn.input[0]] == "DequantizeLinear"
    (relu,) = [n for n in onnx_model.graph.node if bn.output[0] in n.input]
    assert relu.op_type == "Relu" and _consumers(onnx_model, relu.output[0]) == ["QuantizeLinear"]


class Signs(nn.Module):
    """A ReLU and a max-pool of it (never negative), a conv output and a sum with it (signed), a sigmoid gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(x))
        b = torch.nn.functional.max_pool2d(a, 2)
        c = self.conv2(b)  # signed
        d = c + b  # signed + non-negative: signed
        g = torch.sigmoid(d) * b  # a gate: kept signed on purpose
        return self.fc(g.mean((2, 3)))


def _quantizer_grids(path) -> dict[str, tuple[np.dtype, float]]:
    """Each activation QuantizeLinear's (integer type, scale), by the op that feeds it."""
    model = onnx.load(str(path))
    values = constant_values(model)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in values:
            source = producers.get(node.input[0], "input")
            found.setdefault(source, []).append((values[node.input[2]].dtype, float(values[node.input[1]])))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["int8_pow2", "int8"])
@pytest.mark.parametrize("wrapper", ["ptq", "qat"])
def test_never_negative_activations_get_the_unsigned_grid(preset, wrapper, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    grids = {}
    for unsigned in (True, False):
        torch.manual_seed(1)
        scheme = dataclasses.replace(eq.get_scheme(preset), unsigned_activations=unsigned)
        if wrapper == "ptq":
            config = eq.PTQConfig(range_estimator="minmax")  # scales straight from the range: comparable
            qmodel = eq.PTQModule(Signs().eval(), (x[:8],), scheme, config).calibrate([x], progress=False)
        else:
            qmodel = eq.QATModule(Signs(), (x[:8],), scheme).train()
            qmodel(x)
            qmodel.eval()
        result = qmodel.export(tmp_path / f"{unsigned}.onnx")  # raises ParityError on disagreement
        if eq.get_scheme(preset).power_of_2:
            assert result.parity.max_abs_diff == 0.0  # uint8 pow2 grids are bit-exact too
        grids[unsigned] = _quantizer_grids(result.path)
    on, off = grids[True], grids[False]
    u8, i8 = np.dtype(np.uint8), np.dtype(np.int8)
    # The ReLU and its max-pool (which shares its grid) are the only unsigned tensors.
    assert on["Relu"] == on["MaxPool"] and [d for d, _ in on["Relu"]] == [u8]
    assert all(d == i8 for op, found in on.items() if op not in ("Relu", "MaxPool") for d, _ in found)
    assert all(d == i8 for found in off.values() for d, _ in found)
    # The same range on 255 steps instead of 127: half the step (power-of-2: exactly).
    (_, scale_on), (_, scale_off) = on["Relu"][0], off["Relu"][0]
    if preset == "int8_pow2":
        assert scale_on == scale_off / 2
    else:
        assert scale_on == pytest.approx(scale_off * 127 / 255, rel=1e-6)
