"""TIDL's quantization-params prototxt: our calibrated ranges, so that TIDL skips its own calibration.

TIDL imports pre-quantized (QDQ) ONNX at 8 bit only. For 16-bit and mixed-precision
models it calibrates the float model itself, unless `quant_params_proto_path` names a
file with the min/max of every layer's output, weights and bias (TI's
docs/tidl_quantParams.md, "read mode"). This module writes that file from our QDQ export.

Facts from TI's importer (edgeai-tidl-tools, tidl_import_quantization_params):
- a layer is keyed by its first output tensor's name plus its TIDL layer type;
- bit_depth is written in bytes (1 or 2); element_type is TIDL's (0 uint8, 1 int8, 2 uint16,
  3 int16); only min/max are read back, and calibration is bypassed only when every layer
  has them and every bias has `size` values.
The range written for a tensor is the one its scale and zero point imply:
[(qmin - zp) * s, (qmax - zp) * s], with qmin = -qmax for symmetric signed grids, so that
TIDL's range-to-scale step lands back on our scale. TIDL's `scale` is the reciprocal of
ONNX's (integers per unit); it is written for reference only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from . import prototxt
from .prototxt import F, message_classes

# The message definition from docs/tidl_quantParams.md, built in code (no protoc at run time).
_FIELDS = {
    "TIDLNetQuantParams": [
        ("num_layers", 1, F.TYPE_INT32, F.LABEL_OPTIONAL, None),
        ("quant_type", 2, F.TYPE_ENUM, F.LABEL_OPTIONAL, "TidlQuantType"),
        ("calib_type", 3, F.TYPE_ENUM, F.LABEL_OPTIONAL, "TidlCalibType"),
        ("layers", 4, F.TYPE_MESSAGE, F.LABEL_REPEATED, "TidlLayerQuantParams"),
    ],
    "TidlLayerQuantParams": [
        ("layer_name", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, None),
        ("layer_type", 2, F.TYPE_STRING, F.LABEL_OPTIONAL, None),
        ("bit_depth", 3, F.TYPE_UINT32, F.LABEL_OPTIONAL, None),
        *(
            (name, number, F.TYPE_MESSAGE, F.LABEL_REPEATED, "TidlTensorQuantParams")
            for name, number in (("outputs", 4), ("weights", 5), ("bias", 6), ("slope", 7))
        ),
    ],
    "TidlTensorQuantParams": [
        ("min", 1, F.TYPE_FLOAT, F.LABEL_OPTIONAL, None),
        ("max", 2, F.TYPE_FLOAT, F.LABEL_OPTIONAL, None),
        ("size", 3, F.TYPE_UINT32, F.LABEL_OPTIONAL, None),
        ("element_type", 4, F.TYPE_UINT32, F.LABEL_OPTIONAL, None),
        ("scale", 5, F.TYPE_DOUBLE, F.LABEL_REPEATED, None),
        ("zero_point", 6, F.TYPE_UINT32, F.LABEL_REPEATED, None),
        ("value", 7, F.TYPE_DOUBLE, F.LABEL_REPEATED, None),
    ],
}
_ENUMS = {"TidlQuantType": {"SYMMETRIC": 1, "ASYMMETRIC": 2}, "TidlCalibType": {"PERTENSOR": 1, "PERCHANNEL": 2}}
_CLASSES = message_classes("tidl_quant_params", _FIELDS, _ENUMS)
NetQuantParams = _CLASSES["TIDLNetQuantParams"]


# TIDL layer types of the ONNX ops (docs/supported_ops_rts_versions.md, "Operator Mapping (ONNX)").
TIDL_LAYER_TYPES = {
    "Conv": "TIDL_ConvolutionLayer",
    "ConvTranspose": "TIDL_Deconv2DLayer",
    "Gemm": "TIDL_InnerProductLayer",
    "MatMul": "TIDL_InnerProductLayer",
    **dict.fromkeys(("Add", "Sum", "Mul", "Sub", "Div", "Max"), "TIDL_EltWiseLayer"),
    **dict.fromkeys(("AveragePool", "GlobalAveragePool", "MaxPool"), "TIDL_PoolingLayer"),
    "Relu": "TIDL_ReLULayer",
    "PRelu": "TIDL_PReLULayer",
    "LeakyRelu": "TIDL_LeakyReluLayer",
    "Clip": "TIDL_ClipLayer",
    "Sigmoid": "TIDL_SigmoidLayer",
    "HardSigmoid": "TIDL_HardSigmoidLayer",
    "HardSwish": "TIDL_HardSwishLayer",
    "Tanh": "TIDL_TanhLayer",
    "Softmax": "TIDL_SoftMaxLayer",
    "BatchNormalization": "TIDL_BatchNormLayer",
    "Concat": "TIDL_ConcatLayer",
    "Resize": "TIDL_ResizeLayer",
    "Flatten": "TIDL_FlattenLayer",
    "Reshape": "TIDL_ReshapeLayer",
    "Transpose": "TIDL_TransposeLayer",
    "Pad": "TIDL_PadLayer",
    "DepthToSpace": "TIDL_DepthToSpaceLayer",
    "Slice": "TIDL_SliceLayer",
    "Split": "TIDL_SliceLayer",
    "Squeeze": "TIDL_SqueezeLayer",
    "Unsqueeze": "TIDL_UnsqueezeLayer",
    "ArgMax": "TIDL_ArgMaxLayer",
}
DATA_LAYER = "TIDL_DataLayer"
# Activations TIDL merges into the conv / eltwise layer before them: no layer of their own.
MERGED_ACTIVATIONS = ("Relu", "Clip")
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that move values without changing them: a tensor they make has the grid of their input.
SHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose")
# ONNX Q/DQ integer types -> TIDL element types (eTIDL_ElementType) and bit depth in bytes.
_ELEMENT_TYPES = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.uint16): 2, np.dtype(np.int16): 3}
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """DequantizeLinear on constants: (q - zero_point) * scale, per channel along `axis` for 1-D scales."""
    scale = np.asarray(scale, np.float64)
    zero = np.zeros_like(scale) if zero_point is None else np.asarray(zero_point, np.float64)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q.astype(np.float64) - zero) * scale).astype(np.float32)


@dataclass(frozen=True)
class Grid:
    """One Q/DQ's grid: scale and zero point (per tensor or per channel) and integer type."""

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: np.dtype

    @property
    def range(self) -> tuple[float, float]:
        """The float range the grid implies; symmetric signed grids are taken as [-qmax, qmax]."""
        info = np.iinfo(self.dtype)
        qmin = -info.max if info.min < 0 and not self.zero_point.any() else info.min
        low = (qmin - self.zero_point.astype(np.float64)) * self.scale.astype(np.float64)
        high = (info.max - self.zero_point.astype(np.float64)) * self.scale.astype(np.float64)
        return float(low.min()), float(high.max())

    @property
    def bits(self) -> int:
        return 8 * self.dtype.itemsize


class _Constants(Mapping):
    """Initializers and Constant outputs as arrays, each converted when first read.

    Lazy, so that a model saved with external data (over 2 GB) can be walked for its
    structure and small constants without reading every weight.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._protos = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
                self._protos[node.output[0]] = node.attribute[0].t
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = onnx.numpy_helper.to_array(self._protos[name])
        return self._arrays[name]

    def dtype(self, name: str) -> int:
        """The ONNX element type of a constant, without reading its value."""
        return self._protos[name].data_type

    def __contains__(self, name: object) -> bool:  # without reading the value (Mapping's default would)
        return name in self._protos

    def __iter__(self) -> Iterator[str]:
        return iter(self._protos)

    def __len__(self) -> int:
        return len(self._protos)


class OnnxGraph:
    """Lookups over an ONNX graph: constants, producers, consumers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.values = _Constants(graph)
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def grid(self, node: onnx.NodeProto) -> Grid:
        """The grid of a QuantizeLinear / DequantizeLinear node."""
        scale = np.atleast_1d(self.values[node.input[1]])
        zp = self.values.get(node.input[2]) if len(node.input) > 2 else None
        if zp is None:
            dtype = self.values[node.input[0]].dtype if node.op_type == "DequantizeLinear" else np.dtype(np.uint8)
            zp = np.zeros_like(scale, dtype=dtype)
        zp = np.atleast_1d(zp)
        return Grid(scale, zp, zp.dtype)

    def quantizer_of(self, tensor: str) -> onnx.NodeProto | None:
        """The Q that sets `tensor`'s grid: one that reads it, the one behind the DQ that made it,
        or, through shape-only ops (Flatten, Reshape, ...), the one of the tensor it reshapes."""
        for user in self.consumers.get(tensor, []):
            if user.op_type == "QuantizeLinear":
                return user
        producer = self.producer.get(tensor)
        if producer is not None and producer.op_type == "DequantizeLinear":
            source = self.producer.get(producer.input[0])
            return source if source is not None and source.op_type == "QuantizeLinear" else None
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type in SHAPE_OPS:
            return self.quantizer_of(users[0].output[0])
        if producer is not None and producer.op_type in SHAPE_OPS:
            return self.quantizer_of(producer.input[0])
        return None

    def feature(self, node: onnx.NodeProto) -> str:
        """The layer's output as TIDL names it: after the activations merged into it."""
        tensor = node.output[0]
        while len(users := self.consumers.get(tensor, [])) == 1 and users[0].op_type in MERGED_ACTIVATIONS:
            tensor = users[0].output[0]
        return tensor

    def merged(self, node: onnx.NodeProto) -> bool:
        """True for an activation TIDL merges into the layer that produces its input."""
        if node.op_type not in MERGED_ACTIVATIONS:
            return False
        producer = self.producer.get(node.input[0])
        return (
            producer is not None
            and producer.op_type in TIDL_LAYER_TYPES
            and len(self.consumers.get(node.input[0], [])) == 1
        )

    def weight_grid(self, node: onnx.NodeProto, index: int) -> tuple[Grid, str] | None:
        """(grid, name of the integer constant) of a weighted node's input `index` behind its DQ."""
        if len(node.input) <= index:
            return None
        dq = self.producer.get(node.input[index])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in self.values:
            return None
        return self.grid(dq), dq.input[0]


def _tensor(message: object, grid: Grid) -> None:
    message.min, message.max = grid.range
    message.size = grid.scale.size
    message.element_type = _ELEMENT_TYPES.get(grid.dtype, 1)
    message.scale.extend(float(1.0 / s) for s in grid.scale.astype(np.float64))
    message.zero_point.extend(int(z) & 0xFFFFFFFF for z in grid.zero_point.astype(np.int64))  # uint32 in the proto


def _layer(net: object, name: str, layer_type: str, output: onnx.NodeProto | None, graph: OnnxGraph) -> object:
    layer = net.layers.add(layer_name=name, layer_type=layer_type)
    if output is not None:
        grid = graph.grid(output)
        layer.bit_depth = grid.dtype.itemsize
        _tensor(layer.outputs.add(), grid)
    return layer


def quant_params(model: onnx.ModelProto) -> object:
    """The TIDLNetQuantParams message for a QDQ model: every input and every layer TIDL builds."""
    graph = OnnxGraph(model)
    net = NetQuantParams()
    for value in model.graph.input:
        _layer(net, value.name, DATA_LAYER, graph.quantizer_of(value.name), graph)
    per_channel, symmetric = False, True
    for node in model.graph.node:
        if node.op_type not in TIDL_LAYER_TYPES or graph.merged(node):
            continue
        feature = graph.feature(node)
        layer = _layer(net, feature, TIDL_LAYER_TYPES[node.op_type], graph.quantizer_of(feature), graph)
        if node.op_type not in WEIGHTED:
            continue
        weight = graph.weight_grid(node, 1)
        if weight is not None:
            _tensor(layer.weights.add(), weight[0])
            per_channel |= weight[0].scale.size > 1
            symmetric &= not weight[0].zero_point.any()
        bias = graph.weight_grid(node, 2)
        if bias is not None:
            grid, name = bias
            values = (graph.values[name].astype(np.float64) - grid.zero_point) * grid.scale.astype(np.float64)
            message = layer.bias.add(min=float(values.min()), max=float(values.max()), size=values.size)
            message.element_type = 5  # TIDL_SignedWord: int32 bias
            message.value.extend(float(v) for v in values)
    for layer in net.layers:
        symmetric &= all(z == 0 for t in layer.outputs for z in t.zero_point)
    net.num_layers = len(net.layers)
    net.quant_type = 1 if symmetric else 2
    net.calib_type = 2 if per_channel else 1
    return net


def parse(text: str) -> object:
    """A prototxt read back into the message (for checks and tests)."""
    return prototxt.parse(text, NetQuantParams)
