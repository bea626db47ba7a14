import json
import warnings
from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import edgequant as eq
from edgequant.export.devices import get_device
from edgequant.export.runtime import run_onnx, session
from edgequant.export.tidl import Layer, layers, options, strip_qdq
from edgequant.export.tidl_params import parse


def test_options_for_each_device_and_kind_of_scheme():
    eight = [Layer("conv", "relu", 8, 8), Layer("fc", "fc", 8, 8)]
    mixed = [Layer("conv", "relu", 16, 16), Layer("fc", "fc", 8, 8)]
    tda4vm, am68a = get_device("TDA4VM"), get_device("am68a")
    pow2 = options(tda4vm, eq.get_scheme("int8_pow2"), eight, None)
    assert pow2 == {
        "tensor_bits": 8,
        "accuracy_level": 0,
        "advanced_options:prequantized_model": 1,
        "advanced_options:quantization_scale_type": 1,
    }
    assert options(am68a, eq.get_scheme("int8"), eight, None)["advanced_options:quantization_scale_type"] == 4
    mixed_opts = options(tda4vm, eq.get_scheme("int8_pow2").with_high_precision(["conv"]), mixed, "m.prototxt")
    assert mixed_opts["advanced_options:output_feature_16bit_names_list"] == "relu"
    assert mixed_opts["advanced_options:params_16bit_names_list"] == "conv"
    assert mixed_opts["advanced_options:prequantized_model"] == 0  # float model, our ranges in the prototxt
    assert mixed_opts["advanced_options:quant_params_proto_path"] == "m.prototxt"
    sixteen = options(am68a, eq.get_scheme("int16"), [Layer("conv", "relu", 16, 16)], "m.prototxt")
    assert sixteen["tensor_bits"] == 16 and sixteen["advanced_options:prequantized_model"] == 0
    assert "advanced_options:params_16bit_names_list" not in sixteen


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, image):
        return self.fc(torch.relu(self.conv(image)).mean((2, 3)))


class TwoHeads(torch.nn.Module):
    """A segmentation-style model: a dict of outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(8, 4, 1)
        self.aux = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        features = torch.relu(self.body(x))
        return OrderedDict(out=self.out(features), aux=self.aux(features))  # as torchvision's segmentation models


def test_refused_export_writes_nothing(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    qmodel = eq.PTQModule(Net().eval(), (x,), "int8").calibrate([x], progress=False)
    with pytest.raises(ValueError, match="use 'int8_pow2'"):
        qmodel.export(tmp_path / "m.onnx", device="TDA4VM")
    with pytest.raises(ValueError, match="unknown device"):
        qmodel.export(tmp_path / "m.onnx", device="AM99")
    with pytest.raises(ValueError, match="static batch size"):
        qmodel.export(tmp_path / "m.onnx", batch=0)
    assert list(tmp_path.iterdir()) == []


def _static(value: onnx.ValueInfoProto) -> bool:
    dims = value.type.tensor_type.shape.dim
    return bool(dims) and all(d.HasField("dim_value") for d in dims)


@pytest.mark.parametrize("batch", [1, 2])
def test_tidl_model_is_static_named_and_equal_to_the_export(batch, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    qmodel = eq.PTQModule(Net().eval(), (x,), device="TDA4VM").calibrate([x], progress=False)
    result = qmodel.export(tmp_path / "m.onnx", batch=batch)
    exported, tidl = onnx.load(str(result.path)), onnx.load(str(result.tidl_path))
    assert [i.name for i in tidl.graph.input] == ["image"]  # forward's argument
    assert [o.name for o in tidl.graph.output] == ["logits"]
    assert [o.name for o in exported.graph.output] == ["logits"]
    assert not _static(exported.graph.input[0])  # the onnxruntime file keeps its dynamic batch
    assert tidl.graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch
    produced = [o for n in tidl.graph.node for o in n.output]
    infos = {v.name: v for v in (*tidl.graph.value_info, *tidl.graph.output)}
    assert all(name in infos and _static(infos[name]) for name in produced)
    ours = run_onnx(session(str(result.tidl_path)), (x[:batch],))[0]
    theirs = run_onnx(session(str(result.path)), (x[:batch],))[0]
    assert ours.shape == (batch, 4) and (ours == theirs).all()


class WithEinsum(Net):
    def forward(self, image):
        return self.fc(torch.einsum("nchw->nc", torch.relu(self.conv(image))) / 64)


def test_export_warns_about_nodes_tidl_runs_on_the_arm_core(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    qmodel = eq.PTQModule(WithEinsum().eval(), (x,)).calibrate([x], progress=False)
    with pytest.warns(eq.TidlFallbackWarning, match=r"TDA4VM: 4 of 5 nodes on the accelerator; 1 fall back to the ARM"):
        result = qmodel.export(tmp_path / "m.onnx")
    assert [f.op_type for f in result.tidl_check.findings] == ["Einsum"]
    assert result.tidl_check.summary in str(result)


def test_global_average_pooling_goes_to_tidl_as_a_pool(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    qmodel = eq.PTQModule(Net().eval(), (x,)).calibrate([x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", eq.TidlFallbackWarning)  # x.mean((2, 3)) no longer falls back
        result = qmodel.export(tmp_path / "m.onnx", batch=8)
    ops = [n.op_type for n in onnx.load(str(result.tidl_path)).graph.node]
    assert "ReduceMean" not in ops and ops.count("GlobalAveragePool") == 1
    assert "ReduceMean" in [n.op_type for n in onnx.load(str(result.path)).graph.node]
    ours, theirs = (run_onnx(session(str(p)), (x,))[0] for p in (result.tidl_path, result.path))
    assert (ours == theirs).all()


class Upsampling(TwoHeads):
    """A segmentation head resized to the input's size, as torchvision's: shape arithmetic in the graph."""

    def forward(self, x):
        out = self.out(torch.relu(self.body(x)))[:, :, ::2, ::2]
        return {"out": torch.nn.functional.interpolate(out, size=x.shape[-2:], mode="nearest")}


def test_dict_outputs_keep_their_keys(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    qmodel = eq.PTQModule(TwoHeads().eval(), (x,)).calibrate([x], progress=False)
    result = qmodel.export(tmp_path / "seg.onnx")
    for path in (result.path, result.tidl_path):
        assert [o.name for o in onnx.load(str(path)).graph.output] == ["out", "aux"]


def test_shape_arithmetic_is_folded_into_constants(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    qmodel = eq.PTQModule(Upsampling().eval(), (x,)).calibrate([x], progress=False)
    result = qmodel.export(tmp_path / "seg.onnx", batch=2)
    exported, tidl = (onnx.load(str(p)) for p in (result.path, result.tidl_path))
    assert "Shape" in [n.op_type for n in exported.graph.node]  # the dynamic-batch file computes sizes
    assert not {"Shape", "Gather", "Concat"} & {n.op_type for n in tidl.graph.node}
    resize = next(n for n in tidl.graph.node if n.op_type == "Resize")
    assert all(name in {t.name for t in tidl.graph.initializer} for name in resize.input[1:] if name)
    assert "resize-scales" not in {f.rule for f in result.tidl_check.findings}
    ours, theirs = (run_onnx(session(str(p)), (x[:2],))[0] for p in (result.tidl_path, result.path))
    assert ours.shape == (2, 4, 8, 8) and (ours == theirs).all()


class Residual(Net):
    """conv -> ReLU -> conv, added back: an eltwise layer for TIDL."""

    def __init__(self) -> None:
        super().__init__()
        self.second = torch.nn.Conv2d(8, 8, 1)

    def forward(self, image):
        x = torch.relu(self.conv(image))
        return self.fc((x + self.second(x)).mean((2, 3)))


def _implied_range(model: onnx.ModelProto, tensor: str) -> tuple[float, float]:
    """The range the QuantizeLinear reading `tensor` implies, computed from the file alone."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    scale, zp = float(values[q.input[1]]), int(values[q.input[2]])
    qmax = np.iinfo(values[q.input[2]].dtype).max
    qmin = -qmax if zp == 0 else np.iinfo(values[q.input[2]].dtype).min
    return (qmin - zp) * scale, (qmax - zp) * scale


@pytest.mark.parametrize(
    ("scheme", "device"),
    [("int16", "AM68A"), pytest.param("int16_pow2", "TDA4VM", marks=pytest.mark.slow), ("mixed", "AM68A")],
)
def test_quant_params_prototxt_holds_every_layer_range(scheme, device, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    if scheme == "mixed":
        scheme = eq.get_scheme("int8").with_high_precision(["conv"])
    qmodel = eq.PTQModule(Residual().eval(), (x,), scheme).calibrate([x], progress=False)
    result = qmodel.export(tmp_path / "m.onnx", device=device)
    opts = json.loads(result.options_path.read_text())
    assert opts["advanced_options:quant_params_proto_path"] == result.quant_params_path.name
    assert opts["advanced_options:prequantized_model"] == 0
    net = parse(result.quant_params_path.read_text())
    exported = onnx.load(str(result.path))
    by_name = {layer.layer_name: layer for layer in net.layers}
    assert net.num_layers == len(net.layers)
    # The input, the convs (+ReLU), the residual Add, the mean (GlobalAveragePool + Flatten in
    # the TIDL model) and the Gemm.
    gemm = next(n for n in exported.graph.node if n.op_type == "Gemm").output[0]
    mean = next(n for n in exported.graph.node if n.op_type == "ReduceMean").output[0]
    add = next(n for n in exported.graph.node if n.op_type == "Add").output[0]
    second = next(n for n in exported.graph.node if n.op_type == "Conv" and n.output[0] != "conv2d").output[0]
    expected = {
        "image": ("TIDL_DataLayer", "image"),
        "relu": ("TIDL_ConvolutionLayer", "relu"),
        second: ("TIDL_ConvolutionLayer", second),
        add: ("TIDL_EltWiseLayer", add),
        f"{mean}_pooled": ("TIDL_PoolingLayer", mean),  # the pooled tensor has the mean's grid
        mean: ("TIDL_FlattenLayer", mean),
        gemm: ("TIDL_InnerProductLayer", gemm),
    }
    assert {name: by_name[name].layer_type for name in expected} == {k: v[0] for k, v in expected.items()}
    assert len(net.layers) == len(expected)
    for name, (_, quantized) in expected.items():
        low, high = _implied_range(exported, quantized)
        assert by_name[name].outputs[0].min == pytest.approx(low, rel=1e-6)
        assert by_name[name].outputs[0].max == pytest.approx(high, rel=1e-6)
    conv = by_name["relu"]  # 16 bit in every case here (the mixed scheme's 16-bit layer is "conv")
    assert conv.bit_depth == 2 and conv.outputs[0].element_type == 3  # bytes; TIDL_SignedShort
    assert conv.bias[0].size == 8 and len(conv.bias[0].value) == 8
    assert conv.weights[0].min < 0 < conv.weights[0].max
    # The TIDL model is float, at an opset TI validates: no Q/DQ, and the named tensors exist in it.
    tidl = onnx.load(str(result.tidl_path))
    assert [o.version for o in tidl.opset_import if o.domain == ""] == [18]
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in tidl.graph.node)
    produced = {o for n in tidl.graph.node for o in n.output} | {i.name for i in tidl.graph.input}
    assert set(by_name) <= produced


def test_strip_qdq_leaves_a_float_graph_that_matches(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    model = Net().eval()
    qmodel = eq.PTQModule(model, (x,), "int16").calibrate([x], progress=False)
    result = qmodel.export(tmp_path / "m.onnx")
    found = layers(onnx.load(str(result.path)))
    assert [(layer.weight_bits, layer.output_bits) for layer in found] == [(16, 16), (16, 16)]
    stripped, removed = strip_qdq(onnx.load(str(result.path)))
    assert removed >= 3  # input, conv output, logits
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in stripped.graph.node)
    quantized = (np.int8, np.uint8, np.int16, np.uint16, np.int32)
    assert not any(numpy_helper.to_array(t).dtype in quantized for t in stripped.graph.initializer)
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


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int16", "int16_pow2"])
@pytest.mark.parametrize("net", [Net, SqueezeExcite])
def test_int16_exports_strip_to_a_valid_float_graph(net, scheme, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    model = net().eval()
    qmodel = eq.PTQModule(model, (x,), scheme).calibrate([x], progress=False)
    result = qmodel.export(tmp_path / "m.onnx")
    stripped = onnx.load(str(result.tidl_path))
    onnx.checker.check_model(stripped)  # topologically sorted, every input defined
    out = run_onnx(session(str(result.tidl_path)), (x[:1],))[0]
    with torch.no_grad():
        reference = model(x[:1]).numpy()
    assert np.abs(out - reference).max() < 1e-2 * np.abs(reference).max()


def test_a_model_saved_with_external_data_gets_its_tidl_files(tmp_path, monkeypatch):
    """Past 2 GB torch keeps the weights in a side file: the TIDL files are written without reading them all."""
    from edgequant.export import onnx as onnx_export

    save = torch.onnx.ONNXProgram.save
    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", lambda self, f, **k: save(self, f, external_data=True))
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # a named temporary, as for a large model
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3))
    qmodel = eq.PTQModule(model.eval(), (x,)).calibrate([x], progress=False)  # weights big enough to go outside
    result = qmodel.export(tmp_path / "m.onnx")
    tidl = onnx.load(str(result.tidl_path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in tidl.graph.initializer)
    assert result.tidl_check.accelerated == result.tidl_check.nodes > 0
    ours, theirs = (run_onnx(session(str(p)), (x[:1],))[0] for p in (result.tidl_path, result.path))
    assert (ours == theirs).all()
