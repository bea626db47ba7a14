"""TIDL deployment files, per device: the compiler options, the model it imports, our ranges.

From the exported QDQ model (dynamic batch, for onnxruntime users) this writes:

- ``<stem>.tidl.onnx``: the model TIDL imports. Static shapes (batch 1 unless asked
  otherwise) with every tensor's shape inferred, as TIDL's compiler needs. An 8-bit model
  keeps its Q/DQ (TIDL's pre-quantized import, 8-bit only); a model with 16-bit layers goes
  in float, every Q/DQ removed and weights dequantized, and its ranges go in the next file.
- ``<stem>.quant_params.prototxt`` (16-bit and mixed precision): the min/max of every
  layer's output, weights and bias from our calibration, so that TIDL bypasses its own
  (tidl_params.py).
- ``<stem>.options.json``: the compiler options for the device (devices.py).

The TIDL model computes what the exported one does, with ReduceMean over H and W (how
torch exports global average pooling) written as GlobalAveragePool, which TIDL accelerates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import TensorProto, numpy_helper, version_converter
from onnx.external_data_helper import load_external_data_for_model
from onnx.reference import ReferenceEvaluator

from ..core.files import write_atomic
from ..numerics.scheme import Scheme
from .devices import Device
from .meta_arch import META_ARCH_TYPES, kind_of
from .prototxt import to_text
from .tidl_params import OnnxGraph, dequantize, quant_params


@dataclass(frozen=True)
class Layer:
    """A conv / linear layer as named in the ONNX graph, with its precisions."""

    name: str  # output of the Conv / Gemm node
    feature: str  # the layer's output tensor as quantized (after its activation)
    weight_bits: int
    output_bits: int

    @property
    def sixteen_bit(self) -> bool:
        return self.weight_bits == 16 or self.output_bits == 16


@dataclass(frozen=True)
class DeployFiles:
    """The files TIDL takes for one device."""

    options: Path
    model: Path
    quant_params: Path | None
    meta_arch: Path | None = None  # a detector's post-processing (meta_arch.py)


def layers(model: onnx.ModelProto) -> list[Layer]:
    """Every Conv / Gemm of the ONNX graph with its weight and output precision."""
    graph = OnnxGraph(model)
    found = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        weight = graph.weight_grid(node, 1)
        feature = graph.feature(node)
        output = graph.quantizer_of(feature)
        found.append(
            Layer(
                node.output[0],
                feature,
                weight[0].bits if weight else 32,
                graph.grid(output).bits if output is not None else 32,
            )
        )
    return found


def options(device: Device, scheme: Scheme, model_layers: list[Layer], params_file: str | None) -> dict[str, object]:
    """The TIDL compiler options for a model exported with `scheme`, for `device`.

    Keys and values: examples/osrt_python/README.md and docs/tidl_fsg_quantization.md of
    TI's edgeai-tidl-tools. An 8-bit model is pre-quantized (TIDL reads our Q/DQ); one with
    16-bit layers is float, with our ranges in the quantization-params file.
    """
    sixteen = [layer for layer in model_layers if layer.sixteen_bit]
    prequantized = scheme.activation_bits == 8 and not sixteen
    result: dict[str, object] = {
        "tensor_bits": scheme.activation_bits,
        "accuracy_level": 0,  # simple calibration: ranges from min/max (ours), nothing tuned by TIDL
        "advanced_options:prequantized_model": int(prequantized),
        "advanced_options:quantization_scale_type": device.scale_type(scheme),
    }
    if scheme.activation_bits == 8 and sixteen:
        result["advanced_options:output_feature_16bit_names_list"] = ",".join(
            layer.feature for layer in sixteen if layer.output_bits == 16
        )
        result["advanced_options:params_16bit_names_list"] = ",".join(
            layer.name for layer in sixteen if layer.weight_bits == 16
        )
    if params_file is not None:
        result["advanced_options:quant_params_proto_path"] = params_file
    return result


def strip_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Remove every activation Q/DQ pair and dequantize quantized constants; return (model, pairs removed).

    The float graph keeps the tensor names of the QDQ one (a layer's output is the
    tensor its QuantizeLinear read), so the names in the options and the prototxt hold.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    lookups = OnnxGraph(model)
    rename: dict[str, str] = {}
    drop, new_inits, pairs = [], [], 0
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            drop.append(node)
            pairs += 1
        elif node.op_type == "DequantizeLinear":
            source = lookups.producer.get(node.input[0])
            if source is not None and source.op_type == "QuantizeLinear":
                rename[node.output[0]] = source.input[0]
            else:
                new_inits.append(numpy_helper.from_array(_dequantized(lookups, node), node.output[0]))
            drop.append(node)

    def source_of(name: str) -> str:
        # Q -> DQ -> Q -> DQ chains (a requantization with nothing between): follow to the float tensor.
        while name in rename:
            name = rename[name]
        return name

    for node in drop:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = source_of(name)
    for output in graph.output:
        if output.name in rename:  # a graph output was a DQ: keep its name
            graph.node.append(onnx.helper.make_node("Identity", [source_of(output.name)], [output.name]))
    graph.initializer.extend(new_inits)
    used = {i for node in graph.node for i in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    float_types = (TensorProto.FLOAT, TensorProto.UNDEFINED)
    for info in list(graph.value_info):
        if info.type.tensor_type.elem_type not in float_types:
            graph.value_info.remove(info)
    onnx.checker.check_model(model)
    return model, pairs


def _dequantized(graph: OnnxGraph, node: onnx.NodeProto) -> np.ndarray:
    grid = graph.grid(node)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return dequantize(graph.values[node.input[0]], grid.scale, grid.zero_point, axis)


def average_pools(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """ReduceMean over H and W as GlobalAveragePool (+ Flatten without keepdims); return (model, rewritten).

    TIDL runs ReduceMean on the ARM core ("not supported as an individual operator",
    docs/supported_ops_rts_versions.md); torch exports nn.AdaptiveAvgPool2d(1) and
    x.mean((2, 3)) as ReduceMean. GlobalAveragePool computes the same mean on the accelerator.
    """
    model = onnx.shape_inference.infer_shapes(onnx.ModelProto.FromString(model.SerializeToString()))
    graph = OnnxGraph(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*model.graph.input, *model.graph.value_info)}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        axes = graph.values.get(node.input[1]) if node.op_type == "ReduceMean" and len(node.input) > 1 else None
        if axes is None or ranks.get(node.input[0]) != 4 or sorted(int(a) % 4 for a in np.ravel(axes)) != [2, 3]:
            nodes.append(node)
            continue
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        pooled = node.output[0] if keepdims else f"{node.output[0]}_pooled"
        nodes.append(onnx.helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=node.name))
        if not keepdims:
            nodes.append(onnx.helper.make_node("Flatten", [pooled], [node.output[0]], name=f"{node.name}_flatten"))
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model, rewritten


# Ops of the shape computations torch exports (x.shape[-2:], view sizes); folded when their inputs are known.
SHAPE_ARITHMETIC = frozenset(
    "Constant Identity Gather Slice Concat Unsqueeze Squeeze Cast Add Sub Mul Div Neg Abs Floor Ceil Min Max "
    "Range Reshape Expand ConstantOfShape Equal Where ReduceProd".split()
)


def fold_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace shape arithmetic (Shape, then Gather, Concat, ... on integers) by its constant result.

    With a static batch every shape is known, yet torch's export computes some of them at
    run time (F.interpolate(size=x.shape[-2:]) in segmentation heads): TIDL runs Shape on
    the ARM core and refuses a Resize whose sizes are not constant. Only integer and bool
    tensors are folded, so the Q/DQ of weights stay as they are. Returns (model, nodes folded).
    """
    graph = model.graph
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in (*graph.input, *graph.value_info)
    }
    constants = OnnxGraph(model).values  # read when used: weights in an external file stay there
    known: dict[str, np.ndarray] = {}

    def value_of(name: str) -> np.ndarray:
        return known[name] if name in known else constants[name]

    keep, folded = [], []
    for node in graph.node:
        value = None
        if node.op_type == "Shape" and None not in shapes.get(node.input[0], [None]):
            dims = shapes[node.input[0]]
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), len(dims))
            value = np.array(dims[start:end], np.int64)
        elif node.op_type in SHAPE_ARITHMETIC and all(n in known or n in constants for n in node.input if n):
            feeds = {name: value_of(name) for name in node.input if name}
            outputs = ReferenceEvaluator(node).run(None, feeds)
            if len(outputs) == 1 and np.asarray(outputs[0]).dtype.kind in "iub":
                value = np.asarray(outputs[0])
        if value is None or len(node.output) != 1:
            keep.append(node)
            continue
        known[node.output[0]] = value
        folded.append(numpy_helper.from_array(value, node.output[0]))
    if folded:
        used = {name for node in keep for name in node.input} | {o.name for o in graph.output}
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(t for t in folded if t.name in used)
    return model, len(folded)


# TI validates its ONNX import up to opset 19 (docs/supported_ops_rts_versions.md); int16 Q/DQ
# needed 21, but the float TIDL model has none left.
TIDL_OPSET = 18


def _lowest_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float model at TIDL_OPSET when ONNX's converter can take it there; else as it is."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), TIDL_OPSET)
    if current <= TIDL_OPSET:
        return model
    try:
        converted = version_converter.convert_version(model, TIDL_OPSET)
        onnx.checker.check_model(converted)
    except (RuntimeError, onnx.checker.ValidationError):  # an op the converter cannot step down
        return model
    return converted


def static_model(model: onnx.ModelProto, batch: int = 1) -> onnx.ModelProto:
    """The model with a fixed batch and every tensor's shape inferred (TIDL's compiler needs both)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    for value in model.graph.output:  # re-inferred below, with the batch fixed
        for dim in value.type.tensor_type.shape.dim[1:]:
            if not dim.HasField("dim_value"):
                dim.Clear()
    del model.graph.value_info[:]
    # Not strict: an op ONNX cannot infer leaves its tensors without shapes (the import checker
    # reports what TIDL then cannot take) instead of failing the whole export.
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    model, folded = fold_shapes(model)
    if folded:  # sizes that were computed are constants now: infer the shapes behind them again
        del model.graph.value_info[:]
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return model


def write_deploy_files(
    onnx_path: Path, scheme: Scheme, device: Device, batch: int = 1, meta_arch: Message | None = None
) -> tuple[DeployFiles, onnx.ModelProto]:
    """Write the TIDL model, options, (for 16-bit layers) our ranges and a detector's prototxt next to `onnx_path`.

    Also returns the static model with its Q/DQ, as TIDL's import rules should see it
    (for an 8-bit model, the TIDL model itself).
    """
    # Weights stay where they are: a model over 2 GB keeps them in its side file, which the
    # static model (written next to it) refers to as well.
    model = onnx.load(str(onnx_path), load_external_data=False)
    model, _ = average_pools(model)
    model_layers = layers(model)
    float_model = scheme.activation_bits == 16 or any(layer.sixteen_bit for layer in model_layers)
    params_path, quantized = None, static_model(model, batch)
    if float_model:
        load_external_data_for_model(model, str(onnx_path.parent))
        params_path = onnx_path.with_name(f"{onnx_path.stem}.quant_params.prototxt")
        write_atomic(params_path, to_text(quant_params(model)).encode())
        model = static_model(_lowest_opset(strip_qdq(model)[0]), batch)
    else:
        model = quantized
    tidl_path = onnx_path.with_name(f"{onnx_path.stem}.tidl.onnx")
    write_atomic(tidl_path, model.SerializeToString())
    opts = options(device, scheme, model_layers, params_path.name if params_path else None)
    meta_path = None
    if meta_arch is not None:
        meta_path = onnx_path.with_name(f"{onnx_path.stem}.meta_arch.prototxt")
        write_atomic(meta_path, to_text(meta_arch).encode())
        opts["object_detection:meta_arch_type"] = META_ARCH_TYPES[kind_of(meta_arch)]
        opts["object_detection:meta_layers_names_list"] = meta_path.name
    options_path = onnx_path.with_name(f"{onnx_path.stem}.options.json")
    write_atomic(options_path, (json.dumps(opts, indent=2) + "\n").encode())
    return DeployFiles(options_path, tidl_path, params_path, meta_path), quantized
