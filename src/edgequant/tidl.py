"""TIDL deployment files: the compiler options and an 8-bit-only model for its importer.

TIDL imports pre-quantized ONNX with 8-bit Q/DQ only; layers that should run in
16 bit are requested by name through its options instead. From the exported QDQ
model this writes:

- ``<stem>.options.json``: the TIDL compiler options (pre-quantized or not, scale
  type, default tensor bits, and the ONNX names of the 16-bit layers);
- ``<stem>.tidl.onnx`` when the model has 16-bit tensors: the same graph with every
  int16 Q/DQ pair removed (those tensors stay float and TIDL quantizes them to 16
  bit itself), and int16 weights stored dequantized.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch.fx import GraphModule, Node

from .parity import DQ_OPS, Q_OPS
from .scheme import Scheme

aten = torch.ops.aten
WEIGHTED_OPS = (aten.conv1d.default, aten.conv2d.default, aten.linear.default)
SCALE_TYPE_POW2, SCALE_TYPE_PER_CHANNEL = 1, 4


@dataclass(frozen=True)
class Layer:
    """A conv / linear layer as named in the ONNX graph, with its precisions."""

    name: str  # output of the Conv / Gemm node
    feature: str  # the layer's quantized output tensor (after BN / activation)
    weight_bits: int
    output_bits: int


def _bits(node: Node) -> int:
    return 16 if node.args[-1] == torch.int16 else 8


def _quantized_output(node: Node) -> Node | None:
    """Follow single users to the quantize node that closes this layer."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.target in Q_OPS:
            return user
        node = user
    return next((u for u in node.users if u.target in Q_OPS), None)


def layers(reference: GraphModule) -> list[Layer]:
    """Every conv / linear of the re-exported graph, whose node names are the ONNX names."""
    found = []
    for node in reference.graph.nodes:
        if node.target not in WEIGHTED_OPS:
            continue
        weight = node.args[1]
        q_out = _quantized_output(node)
        weight_bits = _bits(weight) if isinstance(weight, Node) and weight.target in DQ_OPS else 32
        output_bits = _bits(q_out) if q_out is not None else 32
        feature = q_out.args[0].name if q_out is not None else node.name
        found.append(Layer(node.name, feature, weight_bits, output_bits))
    return found


def options(scheme: Scheme, model_layers: list[Layer]) -> dict[str, object]:
    """TIDL compiler options for a model exported with `scheme`."""
    base_bits = scheme.activation_bits
    sixteen = [layer for layer in model_layers if layer.output_bits == 16 or layer.weight_bits == 16]
    # TIDL's pre-quantized import reads 8-bit Q/DQ; an all-16-bit model goes in float.
    prequantized = base_bits == 8
    result: dict[str, object] = {
        "advanced_options:prequantized_model": int(prequantized),
        "advanced_options:quantization_scale_type": SCALE_TYPE_POW2 if scheme.power_of_2 else SCALE_TYPE_PER_CHANNEL,
        "tensor_bits": base_bits,
        "accuracy_level": 0,
    }
    if base_bits == 8 and sixteen:
        result["advanced_options:output_feature_16bit_names_list"] = ",".join(
            layer.feature for layer in sixteen if layer.output_bits == 16
        )
        result["advanced_options:params_16bit_names_list"] = ",".join(
            layer.name for layer in sixteen if layer.weight_bits == 16
        )
    return result


def _int16_outputs(graph: onnx.GraphProto, values: dict[str, np.ndarray]) -> set[str]:
    int16 = set()
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2:
            zp = values.get(node.input[2])
            if zp is not None and zp.dtype == np.int16:
                int16.add(node.output[0])
    return int16


def strip_int16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Remove int16 Q/DQ pairs and dequantize int16 weights; return (model, pairs removed)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    q16 = _int16_outputs(graph, values)
    rename: dict[str, str] = {}
    drop = []
    new_inits = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] in q16:
            drop.append(node)
        elif node.op_type == "DequantizeLinear":
            source = node.input[0]
            if source in q16:
                q_node = next(n for n in graph.node if n.output[0] == source)
                rename[node.output[0]] = q_node.input[0]
                drop.append(node)
            elif source in values and values[source].dtype == np.int16:
                scale = values[node.input[1]].astype(np.float32)
                zp = values[node.input[2]].astype(np.float32) if len(node.input) > 2 else np.float32(0)
                q = values[source].astype(np.float32)
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                if scale.ndim == 1 and scale.size > 1:
                    shape = [1] * q.ndim
                    shape[axis] = -1
                    scale, zp = scale.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
                new_inits.append(numpy_helper.from_array(((q - zp) * scale).astype(np.float32), node.output[0]))
                drop.append(node)
    for node in drop:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for output in graph.output:
        if output.name in rename:  # a graph output was an int16 DQ: keep its name
            graph.node.append(onnx.helper.make_node("Identity", [rename[output.name]], [output.name]))
    graph.initializer.extend(new_inits)
    used = {i for node in graph.node for i in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for info in list(graph.value_info):
        if info.type.tensor_type.elem_type == TensorProto.INT16:
            graph.value_info.remove(info)
    onnx.checker.check_model(model)
    return model, len(q16)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_deploy_files(onnx_path: Path, reference: GraphModule, scheme: Scheme) -> tuple[Path, Path | None]:
    """Write the options file, and the TIDL model when 16-bit tensors must be stripped."""
    model_layers = layers(reference)
    opts = options(scheme, model_layers)
    options_path = onnx_path.with_name(f"{onnx_path.stem}.options.json")
    _write_atomic(options_path, (json.dumps(opts, indent=2) + "\n").encode())
    if not any(layer.output_bits == 16 or layer.weight_bits == 16 for layer in model_layers):
        return options_path, None
    stripped, _ = strip_int16(onnx.load(str(onnx_path)))
    tidl_path = onnx_path.with_name(f"{onnx_path.stem}.tidl.onnx")
    _write_atomic(tidl_path, stripped.SerializeToString())
    return options_path, tidl_path
