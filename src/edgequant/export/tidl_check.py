"""Which nodes of a QDQ ONNX model TIDL runs on its accelerator, before a slow compile says so.

TIDL's importer (TDA4VM / AM6xA) offloads a node only when it follows the rules of TI's
docs/supported_ops_rts_versions.md (TexasInstruments/edgeai-tidl-tools); other nodes run on
the ARM core. Each rule is one `Rule` in `RULES`: the ops it applies to, a predicate that
says why a node breaks it, and what to change.

Advisory rules (`fallback=False`) mark nodes the accelerator runs, but that TI's own model
surgery ("lite" models) replaces on that device: slow or lossy in 8 bit. They are reported
as `advice`, never as fallback, and `eq.adapt` reads them to decide what it replaces.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core.errors import UsageError
from .devices import Device, get_device
from .tidl_params import OnnxGraph, dequantize

DOC = "docs/supported_ops_rts_versions.md"
SURGERY = "edgeai-tensorlab edgeai-modeloptimization, xmodelopt surgery (lite models)"
QDQ = ("QuantizeLinear", "DequantizeLinear")
REMOVED = ("Constant", "Identity", "Dropout")  # the importer drops them: not layers
PSEUDO = ("input", "output")  # graph inputs / outputs, checked as nodes of these op types
# The doc's ONNX operator table. ReduceMean and Erf are listed as "not supported as an
# individual operator": their own rules decide.
SUPPORTED = frozenset(
    "Conv AveragePool GlobalAveragePool MaxPool Relu PRelu Sum Add Mul Div Sub Max Gemm MatMul Softmax "
    "BatchNormalization ConvTranspose Concat Slice Split Flatten ArgMax Upsample Resize DepthToSpace Sigmoid Pad "
    "ReduceMin ReduceMax ScatterND ScatterElements Squeeze Tanh HardSigmoid Elu Reshape Gather Transpose "
    "LayerNormalization GridSample TopK DeformConv Clip LeakyRelu Sqrt Pow Cast Asin Asinh HardSwish Mish Log "
    "Unsqueeze Abs Floor Exp Sin InstanceNormalization SpaceToDepth Acos Atan Sinh Neg Cos Cosh Tan "
    "ReduceMean Erf".split()
).union(QDQ, REMOVED)
FOUR_DIMS = "Conv ConvTranspose Gemm MatMul AveragePool GlobalAveragePool MaxPool Resize Upsample Slice Split ArgMax"
SIX_DIMS = (
    "Relu PRelu Add Mul Div Sub Softmax BatchNormalization Concat Flatten Sigmoid Pad Squeeze Unsqueeze Tanh "
    "HardSigmoid Elu Reshape Transpose LayerNormalization Clip LeakyRelu Sqrt Pow Asin Asinh HardSwish Mish Log Abs "
    "Floor Exp Sin InstanceNormalization Acos Atan Sinh Neg Cos Cosh Tan"
)
Shape = tuple[int | None, ...]
# (kernel h, kernel w, stride) of the depthwise convs TIDL runs (the doc's Conv row).
DEPTHWISE_KERNELS = frozenset({(3, 3, 1), (3, 3, 2), (5, 5, 2), (7, 7, 1), (7, 7, 2)})
# Pooling kernels and strides TI has validated (the doc's pooling row).
POOL_KERNELS = frozenset({1, 2, 3})
POOL_STRIDES = frozenset({1, 2})
# Activations TI's lite models for TDA4VM replace by ReLU (edgeai-tensorlab model surgery).
LITE_ACTIVATIONS = ("Sigmoid", "HardSigmoid", "HardSwish", "Mish", "LeakyRelu", "Clip", "Elu", "Gelu", "Erf")
# Activations the other devices run through look-up tables, which AM62A lacks (the doc's device table).
LUT_ACTIVATIONS = ("Sigmoid", "HardSigmoid", "Gelu", "Erf", "Tanh", "Elu")


class Context:
    """What the rules read from a graph: shapes, dtypes, constants, producers, consumers, attributes."""

    def __init__(self, model: onnx.ModelProto, device: Device) -> None:
        self.device = device
        try:  # shapes are extra information: a graph shape inference cannot follow is still checked
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:
            pass
        graph = model.graph
        self.shapes: dict[str, Shape] = {}
        self.types: dict[str, int] = {}
        for info in (*graph.input, *graph.value_info, *graph.output):
            tensor = info.type.tensor_type
            self.types[info.name] = tensor.elem_type
            if tensor.HasField("shape"):
                self.shapes[info.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim
                )
        lookups = OnnxGraph(model)
        self.producer, self.consumers = lookups.producer, lookups.consumers
        self._values = lookups.values  # initializers and Constants, read when first asked for
        self._initializers = {t.name: tuple(t.dims) for t in graph.initializer}
        # Tensors computed from constants only (a Constant, an Identity or a DQ of one), in
        # topological order; their values are computed when a rule asks.
        self._derived: dict[str, onnx.NodeProto] = {}
        self._folded: dict[str, np.ndarray | None] = {}
        for node in graph.node:
            foldable = node.op_type == "Constant" or (
                node.op_type in ("Identity", "DequantizeLinear")
                and all(self.is_const(name) for name in node.input if name)
            )
            if foldable and node.output:
                self._derived[node.output[0]] = node

    def _fold(self, node: onnx.NodeProto) -> np.ndarray | None:
        """The value of a Constant, of an Identity of a constant, or of a DQ of a constant."""
        if node.op_type == "Constant":
            attr = node.attribute[0]
            return numpy_helper.to_array(attr.t) if attr.name == "value" else np.array(self.attr(node, attr.name))
        args = [self.const(name) for name in node.input]
        if node.op_type == "Identity":
            return args[0]
        if node.op_type != "DequantizeLinear" or any(a is None for a in args) or args[1].ndim > 1:
            return None
        return dequantize(args[0], args[1], args[2] if len(args) > 2 else None, self.attr(node, "axis", 1))

    def attr(self, node: onnx.NodeProto, name: str, default: object = None) -> object:
        """An attribute's value (strings decoded, lists as tuples), or `default`."""
        for attr in node.attribute:
            if attr.name == name:
                value = helper.get_attribute_value(attr)
                return (
                    value.decode() if isinstance(value, bytes) else tuple(value) if isinstance(value, list) else value
                )
        return default

    def const(self, name: str) -> np.ndarray | None:
        if name in self._initializers:
            return self._values[name]
        if name not in self._derived:
            return None
        if name not in self._folded:
            self._folded[name] = self._fold(self._derived[name])
        return self._folded[name]

    def is_const(self, name: str) -> bool:
        return name in self._initializers or name in self._derived

    def shape(self, name: str) -> Shape | None:
        if name in self._initializers:  # from the proto: a weight's shape without reading it
            return self._initializers[name]
        node = self._derived.get(name)
        if node is not None and node.op_type != "Constant":  # DQ and Identity keep their input's shape
            return self.shape(node.input[0])
        value = self.const(name) if node is not None else None
        return tuple(value.shape) if value is not None else self.shapes.get(name)

    def variables(self, node: onnx.NodeProto) -> list[str]:
        """The node's inputs computed at run time."""
        return [name for name in node.input if name and not self.is_const(name)]

    def int_dtype(self, name: str) -> np.dtype | None:
        """The integer type behind a dequantized tensor (int8, uint8, int16, ...), or None."""
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        for source in (dq.input[0], *dq.input[2:3]):
            if source in self._initializers:
                return np.dtype(helper.tensor_dtype_to_np_dtype(self._values.dtype(source)))
        elem = self.types.get(dq.input[0])
        return helper.tensor_dtype_to_np_dtype(elem) if elem else None


Predicate = Callable[[onnx.NodeProto, Context], str | None]


@dataclass(frozen=True)
class Rule:
    """One TIDL import rule: `broken` says why a node of `ops` (any op if empty) breaks it, else None."""

    id: str
    ops: tuple[str, ...]
    broken: Predicate
    message: str  # may use {reason}
    fix: str
    source: str
    devices: tuple[str, ...] = ()  # empty: every device
    fallback: bool = True  # False: advisory, the node runs on the accelerator but TI's surgery replaces it

    def on(self, device: Device) -> bool:
        """Whether the rule is checked on `device`."""
        return not self.devices or device.name in self.devices

    def applies(self, op_type: str) -> bool:
        """Whether the rule looks at nodes of this op type (graph inputs / outputs only when named)."""
        return op_type in self.ops if self.ops else op_type not in PSEUDO


@dataclass(frozen=True)
class NodeFinding:
    """A broken rule at one node (or graph input / output)."""

    node: str
    op_type: str
    rule: str
    message: str
    fix: str
    source: str


@dataclass(frozen=True)
class TidlCheckReport:
    """What TIDL would offload, and for each node it would not, why and what to change."""

    device: Device
    nodes: int
    accelerated: int
    findings: list[NodeFinding]
    fallback: list[str]
    rules: tuple[str, ...]  # ids of the rules checked on this device
    advice: list[NodeFinding] = dataclasses.field(default_factory=list)  # advisory rules: accelerated nodes

    @property
    def summary(self) -> str:
        """One line: how many nodes TIDL offloads, and which fall back."""
        head = f"TIDL import check for {self.device.name}: "
        advice = len({f.node for f in self.advice})
        tail = f"; {advice} nodes TI's model surgery would replace (eq.adapt)" if advice else ""
        if not self.findings:
            return head + f"all {self.nodes} nodes on the accelerator" + tail
        head += f"{self.accelerated} of {self.nodes} nodes on the accelerator"
        if self.fallback:
            shown = ", ".join(self.fallback[:5]) + (", ..." if len(self.fallback) > 5 else "")
            head += f"; {len(self.fallback)} fall back to the ARM core ({shown})"
        others = len([f for f in self.findings if f.op_type in PSEUDO])
        return head + (f"; {others} input/output findings" if others else "") + tail

    def to_dict(self) -> dict[str, object]:
        """The report as plain data (for --json)."""
        return {
            "device": self.device.name,
            "nodes": self.nodes,
            "accelerated": self.accelerated,
            "fallback": list(self.fallback),
            "findings": [dataclasses.asdict(f) for f in self.findings],
            "advice": [dataclasses.asdict(f) for f in self.advice],
            "rules": list(self.rules),
        }

    def __str__(self) -> str:
        checked = f"rules checked: {', '.join(self.rules)}"
        if not self.findings and not self.advice:
            return f"{self.summary} ({checked})"
        lines = [f"  {f.node} ({f.op_type}): {f.message}; fix: {f.fix} [{f.source}]" for f in self.findings]
        lines += [f"  advice: {f.node} ({f.op_type}): {f.message}; fix: {f.fix} [{f.source}]" for f in self.advice]
        return "\n".join([self.summary + ":", *lines, f"  ({checked})"])


# Per-rule predicates: each returns the concrete reason a node breaks its rule, or None.


def _dims(shape: Shape) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


def _conv(node: onnx.NodeProto, ctx: Context) -> tuple[Shape, Shape]:
    """(kernel, strides) of a Conv / ConvTranspose."""
    weight = ctx.shape(node.input[1]) or ()
    kernel = ctx.attr(node, "kernel_shape") or tuple(weight[2:])
    return kernel, ctx.attr(node, "strides") or (1,) * len(kernel)


def _stride_unequal(node: onnx.NodeProto, ctx: Context) -> str | None:
    strides = _conv(node, ctx)[1]
    return f"strides {_dims(strides)}" if len(set(strides)) > 1 else None


def _depthwise(node: onnx.NodeProto, ctx: Context) -> str | None:
    weight, (kernel, strides) = ctx.shape(node.input[1]), _conv(node, ctx)
    if ctx.attr(node, "group", 1) == 1 or not weight or weight[1] != 1:
        return None  # not fully grouped
    stride = strides[0] if len(set(strides)) == 1 else _dims(strides)
    return None if (*kernel, stride) in DEPTHWISE_KERNELS else f"depthwise {_dims(kernel)} stride {stride}"


def _large_kernel_stride2(node: onnx.NodeProto, ctx: Context) -> str | None:
    kernel, strides = _conv(node, ctx)
    return f"{_dims(kernel)} kernel with stride 2" if kernel and max(kernel) > 7 and 2 in strides else None


def _stride4(node: onnx.NodeProto, ctx: Context) -> str | None:
    kernel, strides = _conv(node, ctx)
    return f"stride 4 with a {_dims(kernel)} kernel" if 4 in strides and tuple(kernel) != (11, 11) else None


def _3x3_stride3(node: onnx.NodeProto, ctx: Context) -> str | None:
    kernel, strides = _conv(node, ctx)
    return "3x3 kernel with stride 3" if tuple(kernel) == (3, 3) and 3 in strides else None


def _width_pads(node: onnx.NodeProto, ctx: Context) -> tuple[int, int, int] | None:
    """(input width, pad left, pad right) of a Conv, when the input width is known."""
    shape, (kernel, strides) = ctx.shape(node.input[0]), _conv(node, ctx)
    if not shape or shape[-1] is None or not kernel:
        return None
    width = shape[-1]
    auto = ctx.attr(node, "auto_pad", "NOTSET")
    if auto.startswith("SAME"):
        dilation = (ctx.attr(node, "dilations") or (1,))[-1]
        total = max((math.ceil(width / strides[-1]) - 1) * strides[-1] + (kernel[-1] - 1) * dilation + 1 - width, 0)
        small, big = total // 2, total - total // 2
        return (width, small, big) if auto == "SAME_UPPER" else (width, big, small)
    pads = ctx.attr(node, "pads") if auto == "NOTSET" else None
    pads = pads or (0,) * (2 * len(kernel))
    return width, pads[len(pads) // 2 - 1], pads[-1]


def _pad_wider(node: onnx.NodeProto, ctx: Context) -> str | None:
    found = _width_pads(node, ctx)
    if found is None or found[1] + found[2] <= found[0]:
        return None
    return f"padding {found[1]}+{found[2]} on an input {found[0]} wide"


def _input_narrower(node: onnx.NodeProto, ctx: Context) -> str | None:
    found = _width_pads(node, ctx)
    if found is None or found[0] >= max(found[1:]):
        return None
    return f"an input {found[0]} wide with padding {max(found[1:])}"


def _variable_weight(node: onnx.NodeProto, ctx: Context) -> str | None:
    names = ("weight", "bias")
    variable = [names[i] for i, name in enumerate(node.input[1:3]) if name and not ctx.is_const(name)]
    return " and ".join(variable) + " computed at run time" if variable else None


def _max_dims(limit: int) -> Predicate:
    def broken(node: onnx.NodeProto, ctx: Context) -> str | None:
        for name in ctx.variables(node):
            shape = ctx.shape(name) or ()
            big = sum(d is not None and d > 1 for d in shape)
            if big > limit:
                return f"input {name} of shape {_dims(shape)} has {big} dims larger than 1"
        return None

    return broken


def _convtranspose(node: onnx.NodeProto, ctx: Context) -> str | None:
    kernel, strides = _conv(node, ctx)
    group = ctx.attr(node, "group", 1)
    reasons = [
        f"a {_dims(kernel)} kernel" if tuple(kernel) not in ((2, 2), (4, 4)) else "",
        f"stride {_dims(strides)}" if tuple(strides) != (2, 2) else "",
        f"group {group}" if group != 1 else "",
    ]
    return ", ".join(r for r in reasons if r) or None


def _sixteen_bit(node: onnx.NodeProto, ctx: Context) -> str | None:
    wide = [name for name in node.input[:2] if ctx.int_dtype(name) in (np.int16, np.uint16)]
    return "16-bit ConvTranspose" if wide else None


def _attrs(**allowed: tuple[object, ...]) -> Predicate:
    """A predicate for attributes that must keep one of a few values (the first is ONNX's default)."""

    def broken(node: onnx.NodeProto, ctx: Context) -> str | None:
        values = {name: ctx.attr(node, name, ok[0]) for name, ok in allowed.items()}
        bad = [f"{name}={value!r}" for name, value in values.items() if value not in allowed[name]]
        return ", ".join(bad) or None

    return broken


def _resize_scales(node: onnx.NodeProto, ctx: Context) -> list[float] | None:
    """The scale of each axis of a Resize / Upsample, when constant or known from `sizes` and the input shape."""
    inputs, shape = list(node.input), ctx.shape(node.input[0])
    scales = ctx.const(inputs[1] if len(inputs) == 2 else inputs[2]) if len(inputs) > 1 else None
    if (scales is None or scales.size == 0) and len(inputs) > 3:
        sizes = ctx.const(inputs[3])
        axes = ctx.attr(node, "axes") or range(len(shape or ()))
        known = sizes is not None and shape and all(shape[a] for a in axes)
        scales = np.array([s / shape[a] for s, a in zip(sizes, axes, strict=True)]) if known else None
    if scales is None or scales.size == 0:
        return None
    axes = ctx.attr(node, "axes")
    if axes is None:
        return [float(s) for s in scales]
    if shape is None:
        return None
    full = [1.0] * len(shape)
    for axis, scale in zip(axes, scales, strict=True):
        full[axis] = float(scale)
    return full


def _resize_scale(node: onnx.NodeProto, ctx: Context) -> str | None:
    scales = _resize_scales(node, ctx)
    if scales is None or len(scales) < 2:
        return None
    h, w = scales[-2:]
    text = ", ".join(f"{s:g}" for s in scales)
    reasons = [
        f"scales axes other than H and W ({text})" if any(s != 1 for s in scales[:-2]) else "",
        f"scales below 1 ({h:g}, {w:g})" if min(h, w) < 1 else "",
        f"H and W scales differ ({h:g} vs {w:g})" if h != w else "",
        f"scales {h:g}, {w:g} are not powers of 2"
        if any(s <= 0 or not math.log2(s).is_integer() for s in (h, w))
        else "",
    ]
    return ", ".join(r for r in reasons if r) or None


def _resize_coordinates(node: onnx.NodeProto, ctx: Context) -> str | None:
    mode = ctx.attr(node, "mode", "nearest")
    ctm = ctx.attr(node, "coordinate_transformation_mode", "half_pixel")
    nearest = ctx.attr(node, "nearest_mode", "round_prefer_floor")
    want = {"half_pixel": "round_prefer_ceil", "pytorch_half_pixel": "round_prefer_ceil", "asymmetric": "floor"}
    if ctm not in want:
        return f"coordinate_transformation_mode {ctm!r}"
    if mode == "nearest" and nearest != want[ctm]:
        return f"nearest_mode {nearest!r} with {ctm} (needs {want[ctm]!r})"
    return "linear mode and asymmetric coordinates" if mode == "linear" and ctm == "asymmetric" else None


def _variable_shape(node: onnx.NodeProto, ctx: Context) -> str | None:
    return None if ctx.is_const(node.input[1]) else "shape computed at run time"


def _gather(node: onnx.NodeProto, ctx: Context) -> str | None:
    data, indices = ctx.shape(node.input[0]), ctx.shape(node.input[1])
    reasons = [
        "constant data" if ctx.is_const(node.input[0]) else "",
        "1-D data" if data is not None and len(data) < 2 else "",
        f"{len(indices)}-D indices" if indices is not None and len(indices) != 1 else "",
    ]
    return ", ".join(r for r in reasons if r) or None


def _qdq_axis(node: onnx.NodeProto, ctx: Context) -> str | None:
    # Weight / bias DQs are folded into their layer (per-channel weights use axis 0); the
    # axis = 1 rule is for the Q/DQ layers on feature maps.
    scale, shape = ctx.const(node.input[1]), ctx.shape(node.input[0])
    if ctx.is_const(node.input[0]) or scale is None or scale.ndim != 1 or scale.size < 2:
        return None
    axis = ctx.attr(node, "axis", 1)
    axis = axis % len(shape) if shape and axis < 0 else axis
    return None if axis == 1 else f"per-channel axis {axis}"


def _dynamic(node: onnx.NodeProto, ctx: Context) -> str | None:
    shape = ctx.shape([*node.input, *node.output][0])
    return f"shape {_dims(shape)}" if shape is not None and None in shape else None


def _concat_axis(node: onnx.NodeProto, ctx: Context) -> str | None:
    axis, shape = ctx.attr(node, "axis"), ctx.shape(node.output[0])
    where = axis + len(shape) if shape and axis < 0 else axis
    batch = where == 0 or (shape and where < len(shape) - 3) or (not shape and where < -3)
    return f"axis {axis}" + (f" of a {len(shape)}-D tensor" if shape else "") if batch else None


def _eltwise(node: onnx.NodeProto, ctx: Context) -> str | None:
    if len(node.input) > 2:
        return f"{len(node.input)} inputs"
    two = node.op_type == "Sub" and len(ctx.variables(node)) == 2
    return "two inputs computed at run time" if two else None


def _matmul_signs(node: onnx.NodeProto, ctx: Context) -> str | None:
    types = [ctx.int_dtype(name) for name in node.input]
    signs = {t.kind for t in types if t is not None}
    return " x ".join(str(t) for t in types) + " inputs" if signs == {"i", "u"} else None


def _softmax_axis(node: onnx.NodeProto, ctx: Context) -> str | None:
    axis, shape = ctx.attr(node, "axis", -1), ctx.shape(node.input[0])
    return None if not shape or axis % len(shape) >= len(shape) - 2 else f"axis {axis} of a {len(shape)}-D tensor"


def _clip_range(node: onnx.NodeProto, ctx: Context) -> str | None:
    bounds = [ctx.const(name) for name in (*node.input[1:3], "", "")[:2]]
    low, high = (None if b is None else float(np.ravel(b)[0]) for b in bounds)
    low, high = ctx.attr(node, "min", low), ctx.attr(node, "max", high)
    bad = (low is not None and low > 0) or (high is not None and high <= 0)
    return f"range [{low}, {high}]" if bad else None


def _unsupported(node: onnx.NodeProto, ctx: Context) -> str | None:
    return None if node.op_type in SUPPORTED else f"{node.op_type} is not in TIDL's ONNX operator list"


def _reduce_mean(node: onnx.NodeProto, ctx: Context) -> str | None:
    return "ReduceMean on its own"


def _erf_alone(node: onnx.NodeProto, ctx: Context) -> str | None:
    # x * 0.5 * (1 + erf(x / sqrt 2)): Erf -> Add -> Mul is GELU, which TIDL fuses.
    adds = [n for n in ctx.consumers.get(node.output[0], []) if n.op_type == "Add"]
    muls = [n for add in adds for n in ctx.consumers.get(add.output[0], []) if n.op_type == "Mul"]
    return None if muls else "Erf outside a GELU pattern"


def _even_kernel(node: onnx.NodeProto, ctx: Context) -> str | None:
    kernel = _conv(node, ctx)[0]
    return f"an even {_dims(kernel)} kernel" if any(k % 2 == 0 for k in kernel) else None


def _pool_kernel(node: onnx.NodeProto, ctx: Context) -> str | None:
    kernel = ctx.attr(node, "kernel_shape") or ()
    strides = ctx.attr(node, "strides") or (1,) * len(kernel)
    odd = set(kernel) - POOL_KERNELS or set(strides) - POOL_STRIDES
    return f"a {_dims(kernel)} kernel with stride {_dims(strides)}" if odd else None


def _always(node: onnx.NodeProto, ctx: Context) -> str | None:
    return node.op_type


def _channel_gate(node: onnx.NodeProto, ctx: Context) -> str | None:
    """A Mul of a feature map by a computed per-channel (N, C, 1, 1) tensor: squeeze-excitation's gate."""
    shapes = [ctx.shape(name) for name in ctx.variables(node)]
    if len(shapes) != 2 or any(s is None or len(s) != 4 for s in shapes):
        return None
    planes = sorted(math.prod(d or 0 for d in s[2:]) for s in shapes)
    return "a per-channel gate (squeeze-excitation)" if planes[0] == 1 and planes[1] > 1 else None


def _src(op: str) -> str:
    return f"{DOC}, {op}"


RULES: tuple[Rule, ...] = (
    Rule(
        "supported-op", (), _unsupported, "{reason}", "replace it with ops from TIDL's list, or let it run on ARM", DOC
    ),
    Rule(
        "reduce-mean",
        ("ReduceMean",),
        _reduce_mean,
        "{reason} is not supported",
        "use GlobalAveragePool (nn.AdaptiveAvgPool2d(1) exports as ReduceMean; torch.mean over H, W keepdim too) "
        "or TI's tidl-onnx-model-optimizer",
        _src("ReduceMean"),
    ),
    Rule("erf-alone", ("Erf",), _erf_alone, "{reason} is not supported", "use nn.GELU (fused by TIDL)", _src("Erf")),
    Rule(
        "conv-stride-equal",
        ("Conv",),
        _stride_unequal,
        "{reason} are not supported (H and W strides must be equal)",
        "use the same stride along H and W",
        _src("Conv"),
    ),
    Rule(
        "conv-depthwise-kernel",
        ("Conv",),
        _depthwise,
        "{reason} is not supported",
        "use 3x3 (stride 1 or 2), 5x5 with stride 2, or 7x7 (stride 1 or 2)",
        _src("Conv"),
    ),
    Rule(
        "conv-large-kernel-stride2",
        ("Conv",),
        _large_kernel_stride2,
        "a {reason} is not supported",
        "use a kernel of 7x7 or less with stride 2, or stride 1 and a pooling",
        _src("Conv"),
    ),
    Rule(
        "conv-stride4",
        ("Conv",),
        _stride4,
        "{reason} is not supported",
        "use stride 4 only with an 11x11 kernel; else two stride-2 layers",
        _src("Conv"),
    ),
    Rule(
        "conv-3x3-stride3",
        ("Conv",),
        _3x3_stride3,
        "a {reason} is not supported on this device",
        "use stride 1 or 2, or another kernel size",
        _src("Conv"),
        ("AM62A", "AM67A"),
    ),
    Rule(
        "conv-pad-wider-than-input",
        ("Conv",),
        _pad_wider,
        "{reason} is not supported on this device",
        "pad less than the input width (smaller padding or kernel on small feature maps)",
        _src("Conv"),
        ("AM62A", "AM67A"),
    ),
    Rule(
        "conv-input-narrower-than-pad",
        ("Conv",),
        _input_narrower,
        "{reason} is not supported",
        "pad less than the input width (smaller padding or kernel on small feature maps)",
        _src("Conv"),
    ),
    Rule(
        "conv-one-variable-input",
        ("Conv", "ConvTranspose"),
        _variable_weight,
        "{op} with a {reason} is not supported (only the input may be variable)",
        "make the weights parameters (initializers), not tensors computed in the graph",
        _src("Conv"),
    ),
    Rule(
        "max-4-dims",
        tuple(FOUR_DIMS.split()),
        _max_dims(4),
        "{reason} (at most 4 are supported)",
        "merge dimensions with a Reshape so that at most 4 are larger than 1",
        _src("Conv, Pooling, Gemm, MatMul, ConvTranspose, Slice, ArgMax, Resize"),
    ),
    Rule(
        "max-6-dims",
        tuple(SIX_DIMS.split()),
        _max_dims(6),
        "{reason} (at most 6 are supported)",
        "merge dimensions with a Reshape so that at most 6 are larger than 1",
        DOC,
    ),
    Rule(
        "convtranspose",
        ("ConvTranspose",),
        _convtranspose,
        "ConvTranspose with {reason} is not supported (only 2x2 or 4x4, stride 2, group 1)",
        "prefer Resize (nn.Upsample) + Conv, which TIDL runs faster; or a 2x2 / 4x4 kernel, stride 2, group 1",
        _src("ConvTranspose"),
    ),
    Rule(
        "convtranspose-16bit",
        ("ConvTranspose",),
        _sixteen_bit,
        "{reason} is not supported on this device",
        "keep ConvTranspose in 8 bit (leave it out of with_high_precision), or use Resize + Conv",
        _src("ConvTranspose"),
        ("AM62A", "AM67A"),
    ),
    Rule(
        "resize-mode",
        ("Resize", "Upsample"),
        _attrs(mode=("nearest", "linear"), antialias=(0,), keep_aspect_ratio_policy=("stretch",), exclude_outside=(0,)),
        "Resize with {reason} is not supported",
        "use mode 'nearest' or 'linear' (nn.Upsample / F.interpolate nearest or bilinear) with default options",
        _src("Resize"),
    ),
    Rule(
        "resize-scales",
        ("Resize", "Upsample"),
        _resize_scale,
        "Resize scales not supported: {reason} (only H and W, by the same power of 2)",
        "upsample H and W by the same power of 2 (F.interpolate(scale_factor=2))",
        _src("Resize"),
    ),
    Rule(
        "resize-coordinates",
        ("Resize",),
        _resize_coordinates,
        "Resize with {reason} is not supported",
        "use F.interpolate nearest (asymmetric, floor) or bilinear with align_corners=False (half_pixel)",
        _src("Resize"),
    ),
    Rule(
        "reshape-variable-shape",
        ("Reshape",),
        _variable_shape,
        "Reshape with a {reason} is not supported",
        "give Reshape a constant shape: fixed sizes or -1, not arithmetic on x.shape; export with a static batch",
        _src("Reshape"),
    ),
    Rule(
        "gather",
        ("Gather",),
        _gather,
        "Gather with {reason} is not supported (only variable data of 2+ dims with 1-D indices)",
        "gather from a computed tensor with 1-D indices (x[:, [i]], not x[:, i]); a constant table stays on ARM",
        _src("Gather"),
    ),
    Rule(
        "qdq-axis",
        QDQ,
        _qdq_axis,
        "{reason} on a feature map is not supported (only axis 1, the channels)",
        "quantize feature maps per tensor, or per channel along axis 1",
        _src("QuantizeLinear / DequantizeLinear"),
    ),
    Rule(
        "dynamic-dims",
        PSEUDO,
        _dynamic,
        "{reason} has dims that are not fixed",
        "export with a static batch; edgequant's .tidl.onnx file has one",
        "TIDL compiles for fixed shapes",
    ),
    Rule(
        "pool",
        ("AveragePool", "MaxPool"),
        _attrs(dilations=(None, (1, 1), (1,)), storage_order=(0,)),
        "pooling with {reason} is not supported",
        "use default dilations (1, 1) and storage_order 0",
        _src("AveragePool / MaxPool"),
    ),
    Rule(
        "concat-axis",
        ("Concat",),
        _concat_axis,
        "Concat along {reason} is not supported (only axis -3, -2 or -1, never the batch)",
        "concatenate along channels, height or width (axis -3, -2 or -1)",
        _src("Concat"),
    ),
    Rule(
        "eltwise-inputs",
        ("Add", "Mul", "Sub", "Div"),
        _eltwise,
        "{op} with {reason} is not supported",
        "chain two-input ops; for a - b of two computed tensors use a + (-1 * b)",
        _src("Add / Mul / Sub / Div"),
    ),
    Rule(
        "matmul-signedness",
        ("MatMul",),
        _matmul_signs,
        "MatMul with {reason} (signed with unsigned) is not supported on TDA4VM",
        "quantize both MatMul inputs with the same signedness",
        _src("MatMul"),
        ("TDA4VM",),
    ),
    Rule(
        "gemm-params",
        ("Gemm",),
        _attrs(transA=(0,), alpha=(1.0,), beta=(1.0,)),
        "Gemm with {reason} is not supported",
        "use transA=0, alpha=1, beta=1 (nn.Linear exports so)",
        _src("Gemm"),
    ),
    Rule(
        "batchnorm-training",
        ("BatchNormalization",),
        _attrs(training_mode=(0,)),
        "BatchNormalization with {reason} is not supported",
        "export the model in eval mode",
        _src("BatchNormalization"),
    ),
    Rule(
        "softmax-axis",
        ("Softmax",),
        _softmax_axis,
        "Softmax along {reason} is not supported (only width or height)",
        "apply softmax along the last two axes (transpose first)",
        _src("Softmax"),
    ),
    Rule(
        "pad-mode",
        ("Pad",),
        _attrs(mode=("constant",)),
        "Pad with {reason} is not supported",
        "use constant (zero) padding",
        _src("Pad"),
    ),
    Rule(
        "argmax-params",
        ("ArgMax",),
        _attrs(keepdims=(1,), select_last_index=(0,)),
        "ArgMax with {reason} is not supported",
        "use keepdims=True and the first index (torch.argmax(x, 1, keepdim=True))",
        _src("ArgMax"),
    ),
    Rule(
        "clip-range",
        ("Clip",),
        _clip_range,
        "Clip to {reason} is not supported (needs min <= 0 < max)",
        "clip to a range around 0 (ReLU6 style), or shift the input",
        _src("Clip"),
    ),
    # Advisory: the accelerator runs these nodes; TI's model surgery replaces them on the device.
    Rule(
        "conv-even-kernel",
        ("Conv",),
        _even_kernel,
        "a Conv with {reason}: TI's model surgery makes kernels odd",
        "eq.adapt pads the kernel with zeros to an odd size (exact)",
        SURGERY,
        fallback=False,
    ),
    Rule(
        "pool-kernel",
        ("MaxPool", "AveragePool"),
        _pool_kernel,
        "pooling with {reason} is outside the sizes TI validated (1x1, 2x2, 3x3; stride 1 or 2)",
        "eq.adapt turns a large max-pool into a cascade of 3x3 pools (exact); average over the whole map "
        "(a global pool) or with a 2x2 / 3x3 kernel instead of a large average pool",
        _src("AveragePool / MaxPool"),
        fallback=False,
    ),
    Rule(
        "lite-activation",
        LITE_ACTIVATIONS,
        _always,
        "{reason}: TI's lite models for this device use ReLU (power-of-2 8-bit ranges lose on smooth activations)",
        "eq.adapt replaces it with ReLU (approximate: fine-tune with eq.finetune_adapted)",
        SURGERY,
        ("TDA4VM",),
        fallback=False,
    ),
    Rule(
        "lut-activation",
        LUT_ACTIVATIONS,
        _always,
        "{reason} runs without look-up-table acceleration on this device",
        "eq.adapt replaces it with ReLU (approximate: fine-tune with eq.finetune_adapted)",
        DOC + ", feature set comparison across devices",
        ("AM62A",),
        fallback=False,
    ),
    Rule(
        "squeeze-excitation",
        ("Mul",),
        _channel_gate,
        "{reason}: TI's lite models for this device drop squeeze-excitation",
        "eq.adapt replaces the block with identity (approximate: fine-tune with eq.finetune_adapted)",
        SURGERY,
        ("TDA4VM",),
        fallback=False,
    ),
    Rule(
        "layer-norm",
        ("LayerNormalization",),
        _always,
        "{reason}: TI's lite models for this device use batch norm",
        "eq.adapt replaces a layer norm over channels with batch norm (approximate: fine-tune)",
        SURGERY,
        ("TDA4VM",),
        fallback=False,
    ),
)


def device_rules(device: str | Device) -> tuple[Rule, ...]:
    """The rules checked on `device`, advisory ones included."""
    dev = get_device(device)
    return tuple(rule for rule in RULES if rule.on(dev))


def _load(model: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    try:
        loaded = onnx.load(str(path))
    except Exception as error:  # protobuf's DecodeError, OSError, ...
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"{path} is not an ONNX model: {reason}") from error
    if not loaded.graph.node:
        raise UsageError(f"{path} is not an ONNX model: it has no graph nodes")
    return loaded


def _name(node: onnx.NodeProto) -> str:
    return node.name or ([*node.output, *node.input] or [""])[0]


def tidl_check(model: str | os.PathLike[str] | onnx.ModelProto, device: str | Device = "TDA4VM") -> TidlCheckReport:
    """Check a QDQ ONNX model against TIDL's import rules for `device`, node by node."""
    dev = get_device(device)
    proto = _load(model)
    graph = proto.graph
    if not any(node.op_type in QDQ for node in graph.node):
        label = "the model" if isinstance(model, onnx.ModelProto) else str(model)
        raise UsageError(
            f"{label} is a float model (no QuantizeLinear/DequantizeLinear), which TIDL would calibrate itself; "
            "export it with edgequant (PTQModule/QATModule .export) first"
        )
    ctx = Context(proto, dev)
    initializers = {t.name for t in graph.initializer}
    inputs = [helper.make_node("input", [], [t.name], name=t.name) for t in graph.input if t.name not in initializers]
    outputs = [helper.make_node("output", [t.name], [], name=t.name) for t in graph.output]
    rules = device_rules(dev)
    found = [
        (
            rule.fallback,
            NodeFinding(
                _name(node),
                node.op_type,
                rule.id,
                rule.message.format(reason=reason, op=node.op_type),
                rule.fix,
                rule.source,
            ),
        )
        for node in (*inputs, *graph.node, *outputs)
        for rule in rules
        if rule.applies(node.op_type) and (reason := rule.broken(node, ctx)) is not None
    ]
    findings = [f for fallback, f in found if fallback]
    advice = [f for fallback, f in found if not fallback]
    fallback = list(dict.fromkeys(f.node for f in findings if f.op_type not in PSEUDO))
    counted = {_name(node) for node in graph.node if node.op_type not in (*QDQ, *REMOVED)}
    nodes = sum(node.op_type not in (*QDQ, *REMOVED) for node in graph.node)
    return TidlCheckReport(
        dev, nodes, nodes - len(counted & set(fallback)), findings, fallback, tuple(r.id for r in rules), advice
    )
