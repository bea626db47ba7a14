import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import edgequant as eq
from edgequant.core.errors import UsageError
from edgequant.export.tidl_check import RULES, NodeFinding, Rule, TidlCheckReport, tidl_check


def build(*nodes: onnx.NodeProto, shape=(1, 4, 8, 8), consts=None) -> onnx.ModelProto:
    """x -> Q -> DQ ("xq") -> `nodes` -> "y": the node under test is named "n"; `consts` become initializers."""
    values = {"s": np.float32(0.1), "z": np.int8(0), **(consts or {})}
    qdq = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xq"], name="dq"),
    ]
    graph = helper.make_graph(
        [*qdq, *nodes],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in values.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def node(op: str, inputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, ["y"], name="n", **attrs)


def conv(shape=(1, 4, 16, 16), w=(4, 4, 3, 3), op="Conv", **attrs) -> onnx.ModelProto:
    return build(node(op, ["xq", "w"], **attrs), shape=shape, consts={"w": np.ones(w, np.float32)})


def dq_weight(op: str, dtype, w=(4, 4, 3, 3), **attrs) -> onnx.ModelProto:
    """`op` whose weight is a (per-channel, axis 0) DequantizeLinear of an integer initializer."""
    dq = helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="wdq", axis=0)
    consts = {"wq": np.ones(w, dtype), "ws": np.full(w[0], 0.1, np.float32)}
    return build(dq, node(op, ["xq", "wd"], **attrs), consts=consts)


def resize(scales=(1, 1, 2, 2), **attrs) -> onnx.ModelProto:
    return build(node("Resize", ["xq", "", "sc"], **attrs), consts={"sc": np.array(scales, np.float32)})


def sized(sizes) -> onnx.ModelProto:
    return build(node("Resize", ["xq", "", "", "sz"], **NEAREST), consts={"sz": np.array(sizes, np.int64)})


def per_channel(axis: int, channels: int) -> onnx.ModelProto:
    consts = {"pc": np.full(channels, 0.1, np.float32), "pz": np.zeros(channels, np.int8)}
    q = helper.make_node("QuantizeLinear", ["xq", "pc", "pz"], ["q2"], name="n", axis=axis)
    return build(
        q, helper.make_node("DequantizeLinear", ["q2", "pc", "pz"], ["y"], name="n2", axis=axis), consts=consts
    )


def relu_then(op: str, inputs: list[str], consts=None, **attrs) -> onnx.ModelProto:
    return build(helper.make_node("Relu", ["xq"], ["r"], name="r"), node(op, inputs, **attrs), consts=consts)


def gelu(x: str = "xq") -> list[onnx.NodeProto]:
    return [
        helper.make_node("Div", [x, "sqrt2"], ["d"], name="d"),
        helper.make_node("Erf", ["d"], ["e"], name="n"),
        helper.make_node("Add", ["e", "one"], ["a"], name="a"),
        helper.make_node("Mul", [x, "a"], ["m"], name="m"),
        helper.make_node("Mul", ["m", "half"], ["y"], name="m2"),
    ]


NEAREST = {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
F32, I64 = np.float32, np.int64
BN = {k: np.ones(4, F32) for k in ("g", "b", "mu", "var")}
PADS = {"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], I64)}
# (rule id, device, a model whose node "n" breaks the rule, a model that keeps it)
CASES = [
    ("supported-op", "AM68A", build(node("Einsum", ["xq"], equation="nchw->nchw")), build(node("Relu", ["xq"]))),
    (
        "reduce-mean",
        "AM68A",
        build(node("ReduceMean", ["xq", "ax"]), consts={"ax": np.array([2, 3], I64)}),
        build(node("GlobalAveragePool", ["xq"])),
    ),
    (
        "erf-alone",
        "AM68A",
        build(node("Erf", ["xq"])),
        build(*gelu(), consts={"sqrt2": F32(1.41), "one": F32(1), "half": F32(0.5)}),
    ),
    ("conv-stride-equal", "AM68A", conv(strides=[1, 2]), conv(strides=[2, 2])),
    (
        "conv-depthwise-kernel",
        "AM68A",
        conv(w=(4, 1, 5, 5), group=4, pads=[2] * 4),
        conv(w=(4, 1, 5, 5), group=4, pads=[2] * 4, strides=[2, 2]),
    ),
    (
        "conv-large-kernel-stride2",
        "AM68A",
        conv(w=(4, 4, 9, 9), pads=[4] * 4, strides=[2, 2]),
        conv(w=(4, 4, 9, 9), pads=[4] * 4),
    ),
    ("conv-stride4", "AM68A", conv(strides=[4, 4]), conv(w=(4, 4, 11, 11), pads=[5] * 4, strides=[4, 4])),
    ("conv-3x3-stride3", "AM62A", conv(strides=[3, 3]), conv(strides=[2, 2])),
    (
        "conv-pad-wider-than-input",
        "AM67A",
        conv(shape=(1, 4, 3, 3), w=(4, 4, 5, 5), pads=[2] * 4),
        conv(shape=(1, 4, 3, 3), pads=[1] * 4),
    ),
    (
        "conv-input-narrower-than-pad",
        "AM68A",
        conv(shape=(1, 4, 2, 2), w=(4, 4, 7, 7), pads=[3] * 4),
        conv(shape=(1, 4, 8, 8), w=(4, 4, 7, 7), pads=[3] * 4),
    ),
    (
        "conv-one-variable-input",
        "AM68A",
        build(
            helper.make_node("Relu", ["w0"], ["wr"], name="r"),
            node("Conv", ["xq", "wr"]),
            consts={"w0": np.ones((4, 4, 3, 3), F32)},
        ),
        dq_weight("Conv", np.int8),
    ),
    (
        "max-4-dims",
        "AM68A",
        build(node("MatMul", ["xq", "m"]), shape=(2, 3, 4, 5, 6), consts={"m": np.ones((6, 6), F32)}),
        build(node("MatMul", ["xq", "m"]), shape=(1, 3, 4, 5, 6), consts={"m": np.ones((6, 6), F32)}),
    ),
    (
        "max-6-dims",
        "AM68A",
        build(node("Relu", ["xq"]), shape=(2,) * 7),
        build(node("Relu", ["xq"]), shape=(1,) + (2,) * 6),
    ),
    ("convtranspose", "AM68A", conv(op="ConvTranspose"), conv(op="ConvTranspose", w=(4, 4, 2, 2), strides=[2, 2])),
    (
        "convtranspose-16bit",
        "AM62A",
        dq_weight("ConvTranspose", np.int16, w=(4, 4, 2, 2), strides=[2, 2]),
        dq_weight("ConvTranspose", np.int8, w=(4, 4, 2, 2), strides=[2, 2]),
    ),
    ("resize-mode", "AM68A", resize(mode="cubic"), resize(mode="nearest", **NEAREST)),
    ("resize-scales", "AM68A", resize((1, 1, 2, 3), **NEAREST), resize((1, 1, 4, 4), **NEAREST)),
    ("resize-scales", "AM68A", resize((1, 2, 2, 2), **NEAREST), resize((1, 1, 1, 1), **NEAREST)),
    ("resize-scales", "AM68A", sized([1, 4, 16, 8]), sized([1, 4, 16, 16])),
    ("resize-coordinates", "AM68A", resize(nearest_mode="round_prefer_floor"), resize(**NEAREST)),
    (
        "resize-coordinates",
        "AM68A",
        resize(mode="linear", coordinate_transformation_mode="asymmetric"),
        resize(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
    ),
    (
        "reshape-variable-shape",
        "AM68A",
        build(helper.make_node("Shape", ["xq"], ["sh"], name="s"), node("Reshape", ["xq", "sh"])),
        build(node("Reshape", ["xq", "sh"]), consts={"sh": np.array([1, -1], I64)}),
    ),
    (
        "gather",
        "AM68A",
        build(node("Gather", ["xq", "i"], axis=1), consts={"i": np.array([[0, 1]], I64)}),
        build(node("Gather", ["xq", "i"], axis=1), consts={"i": np.array([0, 1], I64)}),
    ),
    (
        "gather",
        "AM68A",
        relu_then("Gather", ["t", "i"], consts={"t": np.ones((5, 4), F32), "i": np.array([0], I64)}),
        build(node("Gather", ["xq", "i"], axis=2), consts={"i": np.array([3], I64)}),
    ),
    ("qdq-axis", "AM68A", per_channel(axis=2, channels=8), per_channel(axis=1, channels=4)),
    (
        "pool",
        "AM68A",
        build(node("MaxPool", ["xq"], kernel_shape=[2, 2], dilations=[2, 2])),
        build(node("MaxPool", ["xq"], kernel_shape=[2, 2], dilations=[1, 1])),
    ),
    (
        "pool",
        "AM68A",
        build(node("MaxPool", ["xq"], kernel_shape=[2, 2], storage_order=1)),
        build(node("AveragePool", ["xq"], kernel_shape=[2, 2], strides=[2, 2])),
    ),
    ("concat-axis", "AM68A", build(node("Concat", ["xq", "xq"], axis=0)), build(node("Concat", ["xq", "xq"], axis=-3))),
    ("eltwise-inputs", "AM68A", relu_then("Sub", ["xq", "r"]), relu_then("Add", ["xq", "r"])),
    (
        "eltwise-inputs",
        "AM68A",
        build(node("Add", ["xq", "xq", "xq"])),
        build(node("Sub", ["xq", "c"]), consts={"c": F32(1)}),
    ),
    (
        "matmul-signedness",
        "TDA4VM",
        dq_weight("MatMul", np.uint8, w=(8, 8)),
        dq_weight("MatMul", np.int8, w=(8, 8)),
    ),
    (
        "gemm-params",
        "AM68A",
        build(node("Gemm", ["xq", "g"], transA=1), shape=(4, 1), consts={"g": np.ones((4, 3), F32)}),
        build(node("Gemm", ["xq", "g"], alpha=1.0), shape=(1, 4), consts={"g": np.ones((4, 3), F32)}),
    ),
    (
        "batchnorm-training",
        "AM68A",
        build(node("BatchNormalization", ["xq", "g", "b", "mu", "var"], training_mode=1), consts=BN),
        build(node("BatchNormalization", ["xq", "g", "b", "mu", "var"]), consts=BN),
    ),
    ("softmax-axis", "AM68A", build(node("Softmax", ["xq"], axis=1)), build(node("Softmax", ["xq"], axis=-2))),
    (
        "pad-mode",
        "AM68A",
        build(node("Pad", ["xq", "p"], mode="reflect"), consts=PADS),
        build(node("Pad", ["xq", "p"]), consts=PADS),
    ),
    (
        "argmax-params",
        "AM68A",
        build(node("ArgMax", ["xq"], axis=1, keepdims=0)),
        build(node("ArgMax", ["xq"], axis=1)),
    ),
    (
        "clip-range",
        "AM68A",
        build(node("Clip", ["xq", "lo", "hi"]), consts={"lo": F32(1), "hi": F32(6)}),
        build(node("Clip", ["xq", "lo", "hi"]), consts={"lo": F32(0), "hi": F32(6)}),
    ),
]


def gate(op: str = "Mul") -> onnx.ModelProto:
    """Squeeze-excitation's end: the feature map times a per-channel gate computed from it."""
    pool = helper.make_node("GlobalAveragePool", ["xq"], ["g"], name="p")
    sigmoid = helper.make_node("Sigmoid", ["g"], ["s2"], name="s2")
    return build(pool, sigmoid, node(op, ["xq", "s2"]))


# Advisory rules: (rule id, device, a model whose node "n" the rule advises on, one it does not)
ADVICE = [
    ("conv-even-kernel", "AM68A", conv(w=(4, 4, 2, 2), strides=[2, 2]), conv()),
    (
        "pool-kernel",
        "AM68A",
        build(node("MaxPool", ["xq"], kernel_shape=[5, 5], pads=[2] * 4)),
        build(node("MaxPool", ["xq"], kernel_shape=[3, 3], strides=[2, 2])),
    ),
    ("lite-activation", "TDA4VM", build(node("HardSwish", ["xq"])), build(node("Relu", ["xq"]))),
    ("lut-activation", "AM62A", build(node("Sigmoid", ["xq"])), build(node("HardSwish", ["xq"]))),
    ("squeeze-excitation", "TDA4VM", gate(), relu_then("Mul", ["xq", "r"])),
    (
        "layer-norm",
        "TDA4VM",
        build(node("LayerNormalization", ["xq", "g"], axis=-1), consts={"g": np.ones(8, F32)}),
        build(node("BatchNormalization", ["xq", "g", "b", "mu", "var"]), consts=BN),
    ),
]


def test_every_rule_has_cases():
    assert {case[0] for case in CASES} | {case[0] for case in ADVICE} | {"dynamic-dims"} == {r.id for r in RULES}
    assert {case[0] for case in ADVICE} == {r.id for r in RULES if not r.fallback}


@pytest.mark.parametrize(("rule", "device", "bad", "good"), ADVICE, ids=[c[0] for c in ADVICE])
def test_advice_is_not_fallback(rule, device, bad, good):
    report = tidl_check(bad, device)
    assert any(f.rule == rule and f.node == "n" for f in report.advice), str(report)
    assert rule not in {f.rule for f in report.findings} and "n" not in report.fallback
    assert "TI's model surgery would replace (eq.adapt)" in report.summary and "  advice: n (" in str(report)
    assert report.to_dict()["advice"][0]["rule"] in {r.id for r in RULES}
    assert rule not in {f.rule for f in tidl_check(good, device).advice}


def test_advice_follows_the_device():
    assert [f.rule for f in tidl_check(build(node("HardSwish", ["xq"])), "AM68A").advice] == []
    assert [f.rule for f in tidl_check(gate(), "AM69A").advice] == []
    assert {f.rule for f in tidl_check(build(node("Sigmoid", ["xq"])), "TDA4VM").advice} == {"lite-activation"}
    assert all(isinstance(rule, Rule) and rule.message and rule.fix and rule.source for rule in RULES)


@pytest.mark.parametrize(("rule", "device", "bad", "good"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_rule_broken_and_kept(rule, device, bad, good):
    report = tidl_check(bad, device)
    assert any(f.rule == rule and f.node == "n" for f in report.findings), str(report)
    assert "n" in report.fallback
    kept = tidl_check(good, device)
    assert rule not in {f.rule for f in kept.findings}, str(kept)


def test_reasons_say_what_is_wrong():
    report = tidl_check(conv(w=(4, 1, 5, 5), group=4, pads=[2] * 4), "AM68A")
    assert report.findings == [
        NodeFinding(
            "n",
            "Conv",
            "conv-depthwise-kernel",
            "depthwise 5x5 stride 1 is not supported",
            "use 3x3 (stride 1 or 2), 5x5 with stride 2, or 7x7 (stride 1 or 2)",
            "docs/supported_ops_rts_versions.md, Conv",
        )
    ]
    scales = tidl_check(resize((1, 1, 0.5, 3), **NEAREST), "AM68A").findings[0].message
    assert "below 1" in scales and "differ (0.5 vs 3)" in scales and "not powers of 2" in scales


def test_device_rules_apply_to_their_devices_only():
    model = conv(strides=[3, 3])
    assert "conv-3x3-stride3" in {f.rule for f in tidl_check(model, "AM62A").findings}
    on_am68a = tidl_check(model, "am68a")
    assert on_am68a.findings == [] and "conv-3x3-stride3" not in on_am68a.rules
    with pytest.raises(UsageError, match="unknown device"):
        tidl_check(model, "AM99X")


def test_counts_and_text():
    model = build(helper.make_node("Relu", ["xq"], ["r"], name="relu"), node("Einsum", ["r"], equation="nchw->nchw"))
    report = tidl_check(model, "AM68A")
    assert isinstance(report, TidlCheckReport) and report.device.name == "AM68A"
    assert (report.nodes, report.accelerated, report.fallback) == (2, 1, ["n"])
    text = str(report).splitlines()
    assert text[0] == "TIDL import check for AM68A: 1 of 2 nodes on the accelerator; 1 fall back to the ARM core (n):"
    assert report.summary == text[0][:-1]  # the one line export() prints
    assert report.to_dict()["fallback"] == ["n"] and report.to_dict()["findings"][0]["rule"] == "supported-op"
    assert text[1].startswith("  n (Einsum): Einsum is not in TIDL's ONNX operator list; fix: ")
    assert text[1].endswith("[docs/supported_ops_rts_versions.md]") and "rules checked: supported-op" in text[-1]
    clean = str(tidl_check(build(node("Relu", ["xq"])), "AM68A"))
    assert clean.startswith(
        "TIDL import check for AM68A: all 1 nodes on the accelerator (rules checked: supported-op, "
    )


def test_dynamic_dims_reported_once_per_tensor():
    report = tidl_check(build(node("Relu", ["xq"]), shape=("N", 4, 8, 8)), "AM68A")
    assert [(f.node, f.op_type, f.rule) for f in report.findings] == [
        ("x", "input", "dynamic-dims"),
        ("y", "output", "dynamic-dims"),
    ]
    assert "shape ?x4x8x8" in report.findings[0].message and "static batch" in report.findings[0].fix
    assert report.accelerated == report.nodes == 1 and report.fallback == []


def test_path_and_model_proto_and_bad_files(tmp_path):
    model = conv(strides=[1, 2])
    onnx.save(model, str(tmp_path / "m.onnx"))
    from_path = tidl_check(tmp_path / "m.onnx", "AM68A")
    assert from_path.findings == tidl_check(str(tmp_path / "m.onnx"), "AM68A").findings == tidl_check(model).findings
    (tmp_path / "bad.onnx").write_text("not a model at all")
    with pytest.raises(UsageError, match=r"bad\.onnx is not an ONNX model: "):
        tidl_check(tmp_path / "bad.onnx")
    with pytest.raises(UsageError, match=r"missing\.onnx does not exist"):
        tidl_check(tmp_path / "missing.onnx")
    float_model = build(node("Relu", ["xq"]))
    del float_model.graph.node[:2]
    float_model.graph.node[0].input[0] = "x"
    with pytest.raises(
        UsageError, match=r"float model .*export it with edgequant \(PTQModule/QATModule .export\) first"
    ):
        tidl_check(float_model)


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.up = torch.nn.Upsample(scale_factor=2)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.up(torch.relu(self.depthwise(torch.relu(self.conv(x))))))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8_pow2", "int8"])
def test_edgequant_export_runs_on_the_accelerator(tmp_path, scheme):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    result = eq.PTQModule(ConvNet().eval(), (x,), scheme).calibrate([(x,)], progress=False).export(tmp_path / "m.onnx")
    report = tidl_check(result.path, "AM68A")
    convs = [n.name for n in onnx.load(str(result.path)).graph.node if n.op_type == "Conv"]
    assert len(convs) == 3 and not set(convs) & set(report.fallback)
    assert {f.rule for f in report.findings} == {"dynamic-dims"}, str(report)
    assert report.accelerated == report.nodes
