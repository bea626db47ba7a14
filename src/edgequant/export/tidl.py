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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..core.files import write_atomic
from ..numerics.scheme import Scheme

SCALE_TYPE_POW2, SCALE_TYPE_PER_CHANNEL = 1, 4


@dataclass(frozen=True)
class Layer:
    """A conv / linear layer as named in the ONNX graph, with its precisions."""

    name: str  # output of the Conv / Gemm node
    feature: str  # the layer's output tensor as quantized (after its activation)
    weight_bits: int
    output_bits: int


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _dtype_bits(array: np.ndarray | None) -> int:
    return {np.dtype(np.int8): 8, np.dtype(np.int16): 16}.get(np.dtype(array.dtype), 32) if array is not None else 32


def layers(model: onnx.ModelProto) -> list[Layer]:
    """Every Conv / Gemm of the ONNX graph with its weight and output precision."""
    graph = model.graph
    values = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        weight_dq = producer.get(node.input[1])
        weight_bits = 32
        if weight_dq is not None and weight_dq.op_type == "DequantizeLinear":
            weight_bits = _dtype_bits(values.get(weight_dq.input[0]))
        # Follow single consumers (Relu, Clip, ...) to the QuantizeLinear that closes the layer.
        tensor, output_bits = node.output[0], 32
        while len(users := consumers.get(tensor, [])) == 1:
            if users[0].op_type == "QuantizeLinear":
                output_bits = _dtype_bits(values.get(users[0].input[2]))
                break
            tensor = users[0].output[0]
        found.append(Layer(node.output[0], tensor, weight_bits, output_bits))
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
    values = _constants(graph)
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

    def source_of(name: str) -> str:
        # Q16 -> DQ16 -> op -> Q16 -> DQ16 chains: a renamed tensor may itself be renamed.
        while name in rename:
            name = rename[name]
        return name

    for node in drop:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = source_of(name)
    for output in graph.output:
        if output.name in rename:  # a graph output was an int16 DQ: keep its name
            graph.node.append(onnx.helper.make_node("Identity", [source_of(output.name)], [output.name]))
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


def write_deploy_files(onnx_path: Path, scheme: Scheme) -> tuple[Path, Path | None]:
    """Write the options file, and the TIDL model when 16-bit tensors must be stripped."""
    model = onnx.load(str(onnx_path))
    model_layers = layers(model)
    opts = options(scheme, model_layers)
    options_path = onnx_path.with_name(f"{onnx_path.stem}.options.json")
    write_atomic(options_path, (json.dumps(opts, indent=2) + "\n").encode())
    if not any(layer.output_bits == 16 or layer.weight_bits == 16 for layer in model_layers):
        return options_path, None
    stripped, _ = strip_int16(model)
    tidl_path = onnx_path.with_name(f"{onnx_path.stem}.tidl.onnx")
    write_atomic(tidl_path, stripped.SerializeToString())
    return options_path, tidl_path
