import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgequant.export.prototxt import to_text
from edgequant.export.tidl_params import Grid, parse, quant_params


def test_grid_range_by_hand():
    def grid(scale, zp):
        return Grid(np.array(scale, np.float32), np.array(zp), np.array(zp).dtype)

    assert grid([0.5], np.array([0], np.int8)).range == (-63.5, 63.5)  # symmetric: [-127 s, 127 s]
    assert grid([0.5], np.array([0], np.uint8)).range == (0.0, 127.5)  # unsigned, zero point 0
    assert grid([0.5], np.array([128], np.uint8)).range == (-64.0, 63.5)  # asymmetric
    assert grid([1 / 1024], np.array([0], np.int16)).range == pytest.approx((-32767 / 1024, 32767 / 1024))
    per_channel = grid([0.1, 0.2], np.array([0, 0], np.int8))
    assert per_channel.range == pytest.approx((-25.4, 25.4)) and per_channel.bits == 8


def _conv_graph() -> onnx.ModelProto:
    """x -> Q/DQ (0.5) -> Conv (per-channel int8 weights, int32 bias) -> Relu -> Q/DQ (0.25) -> y."""
    inits = [
        numpy_helper.from_array(np.array(0.5, np.float32), "sx"),
        numpy_helper.from_array(np.array(0, np.int8), "zx"),
        numpy_helper.from_array(np.array(0.25, np.float32), "sy"),
        numpy_helper.from_array(np.array(0, np.int8), "zy"),
        numpy_helper.from_array(np.array([[[[3]]], [[[-5]]]], np.int8), "wq"),
        numpy_helper.from_array(np.array([0.1, 0.2], np.float32), "sw"),
        numpy_helper.from_array(np.array([0, 0], np.int8), "zw"),
        numpy_helper.from_array(np.array([10, -20], np.int32), "bq"),
        numpy_helper.from_array(np.array([0.05, 0.1], np.float32), "sb"),
        numpy_helper.from_array(np.array([0, 0], np.int32), "zb"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w"], axis=0),
        helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["b"], axis=0),
        helper.make_node("Conv", ["xd", "w", "b"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "sy", "zy"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "sy", "zy"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_quant_params_of_a_hand_built_graph_round_trip():
    net = parse(to_text(quant_params(_conv_graph())))
    assert (net.num_layers, net.quant_type, net.calib_type) == (2, 1, 2)  # SYMMETRIC, PERCHANNEL
    data, conv = net.layers
    assert (data.layer_name, data.layer_type, data.bit_depth) == ("x", "TIDL_DataLayer", 1)
    assert (data.outputs[0].min, data.outputs[0].max) == (-63.5, 63.5)
    # The Relu is merged into the conv: the layer is named after its output.
    assert (conv.layer_name, conv.layer_type) == ("r", "TIDL_ConvolutionLayer")
    assert (conv.outputs[0].min, conv.outputs[0].max, conv.outputs[0].element_type) == (-31.75, 31.75, 1)
    weights = conv.weights[0]
    assert (weights.min, weights.max, weights.size) == pytest.approx((-25.4, 25.4, 2))
    assert list(weights.scale) == pytest.approx([10.0, 5.0])  # TIDL's scale: integers per unit
    bias = conv.bias[0]
    assert list(bias.value) == pytest.approx([0.5, -2.0]) and bias.size == 2
    assert (bias.min, bias.max) == pytest.approx((-2.0, 0.5))
