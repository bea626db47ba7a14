"""Run an exported ONNX file in onnxruntime and hold it to the converted torch model.

The check is strict on purpose: with int32 biases and power-of-2 scales the two
compute the same integers, so any difference is a bug to report, with the first
quantized tensor where they part. Elsewhere the two may round a tie differently, and a
deep model can amplify one such tie until the outputs part; so the file is also checked
op by op, each quantized tensor computed by onnxruntime from torch's own values of its
inputs, where a fault cannot hide behind drift.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.utils._pytree import tree_leaves

from ..core.errors import EdgequantError, ParityDriftWarning
from ..graph.batchnorm import aten_bn, set_graph_training
from ..graph.ops import DQ_OPS, EXACT_OPS, Q_OPS, module_name
from ..numerics.scales import is_power_of_2, to_grid
from .runtime import run_onnx, session

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed


class ParityError(EdgequantError, RuntimeError):
    """onnxruntime and the converted torch model disagree."""


# A rounding-level difference: the first diverging tensor is off by one step on at
# most this fraction of its values. Anything larger is a real disagreement.
ROUNDING_FRACTION = 0.01
# Samples per forward pass of the checks (torch and onnxruntime alike).
CHECK_BATCH = 4
# Rounding-level drift usually keeps the two runtimes' outputs this close (SQNR of
# onnxruntime's outputs against torch's, over every sample compared); below it, the
# export warns (ParityDriftWarning) and the zoo benchmark counts a model as failed.
PARITY_SQNR_DB = 30.0


@dataclass(frozen=True)
class Divergence:
    """The first quantized tensor, in graph order, where the two runtimes differ."""

    tensor: str
    module: str
    count: int
    size: int
    max_lsb: int

    @property
    def is_rounding(self) -> bool:
        """One step off on a few values; a single value always counts (a tie in a tiny head tensor)."""
        return self.max_lsb <= 1 and self.count <= max(1.0, ROUNDING_FRACTION * self.size)

    def __str__(self) -> str:
        return (
            f"first divergence at `{self.tensor}` (output of `{self.module}`): "
            f"{self.count} of {self.size} values differ, by up to {self.max_lsb} LSB"
        )


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    output_step: float | None
    top1_agreement: float
    samples: int
    sqnr_db: float = math.inf  # onnxruntime's outputs against torch's
    # Op by op (each quantized tensor from torch's values of its inputs): those that differ, all by rounding.
    local: tuple[Divergence, ...] = ()
    # Under drift: torch's outputs against torch's own with as many flips, at the tensors of `local`,
    # made in torch alone (`flip_sqnr_db`): how far the model itself amplifies that much rounding.
    flip_sqnr_db: float | None = None
    # (max |diff|, top-1 agreement) of the wrapper's eval mode vs the converted model.
    eval_agreement: tuple[float, float] | None = None

    @property
    def rounding(self) -> Divergence | None:
        """The first tensor where the runtimes part, by rounding only (None when they agree)."""
        return self.local[0] if self.local else None

    def __str__(self) -> str:
        step = f"{self.output_step:g}" if self.output_step else "float output"
        text = (
            f"onnxruntime vs torch: max |diff| {self.max_abs_diff:g} (output step {step}), "
            f"top-1 agreement {100 * self.top1_agreement:.2f}% on {self.samples} samples"
        )
        if math.isfinite(self.sqnr_db):
            text += f", SQNR {self.sqnr_db:.1f} dB"
        if self.rounding:
            text += f"; rounding-level differences only ({self.rounding})"
        if self.local:
            worst = max(self.local, key=lambda d: d.count / d.size)
            text += (
                f"; op by op, from the same inputs, quantized tensors that differ: {len(self.local)}, each by "
                f"rounding only (most: {worst.count} of {worst.size} values of `{worst.tensor}`)"
            )
        if self.flip_sqnr_db is not None:
            text += f"; as many flips made in torch alone move its outputs to {self.flip_sqnr_db:.1f} dB"
        if self.eval_agreement is not None:
            diff, agree = self.eval_agreement
            text += f"; eval mode vs converted model: max |diff| {diff:g}, top-1 agreement {100 * agree:.2f}%"
        return text


def _computes_in_float(node: Node) -> bool:
    value = node.meta.get("val")
    return (
        node.op == "call_function"
        and node.target not in EXACT_OPS
        and isinstance(value, torch.Tensor)
        and value.is_floating_point()
    )


def is_exact(model: GraphModule) -> bool:
    """True when torch and onnxruntime must agree bit for bit: 8-bit Q/DQ (int8 or uint8), power-of-2 scales.

    Then every rescale is a shift and every accumulator stays far below 2**24, so
    float32 on either side computes the exact integer result. Free scales, 16-bit
    tensors or ops left in float (layer norm, softmax, ...) leave room for ties that
    the two runtimes round differently.
    """
    for node in model.graph.nodes:
        if _computes_in_float(node):
            return False
        if node.target not in Q_OPS + DQ_OPS:
            continue
        dtype = node.args[-1]
        scale = node.args[1]
        if isinstance(scale, Node):
            scale = operator.attrgetter(scale.target)(model)
        if dtype not in (torch.int8, torch.uint8, torch.int32) or not is_power_of_2(torch.as_tensor(scale)):
            return False
    return True


def chunks(inputs: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """`inputs` split into batches of CHECK_BATCH samples: the checks' memory stays bounded at large inputs."""
    n = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
    if n <= CHECK_BATCH:
        return [inputs]
    return [tuple(x[i : i + CHECK_BATCH] for x in inputs) for i in range(0, n, CHECK_BATCH)]


def torch_outputs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The model's output tensors (flattened) over `inputs`, computed a chunk at a time."""
    with torch.no_grad():
        parts = [tree_leaves(model(*part)) for part in chunks(inputs)]
    return parts[0] if len(parts) == 1 else [torch.cat(leaves) for leaves in zip(*parts, strict=True)]


def output_steps(model: GraphModule) -> list[float | None]:
    """Quantization step of each graph output (None for outputs left in float)."""
    out = next(n for n in model.graph.nodes if n.op == "output")
    flat = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    steps = []
    for node in flat:
        if isinstance(node, Node) and node.target in DQ_OPS and not isinstance(node.args[1], Node):
            steps.append(float(node.args[1]))
        else:
            steps.append(None)
    return steps


def _as_list(y: object) -> list[torch.Tensor]:
    return list(y) if isinstance(y, (tuple, list)) else [y]


def _joined(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per-chunk output lists joined along the batch."""
    return parts[0] if len(parts) == 1 else [np.concatenate(arrays) for arrays in zip(*parts, strict=True)]


def output_sqnr_db(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """10 log10(sum e^2 / sum (a - e)^2) over all outputs: inf when they are equal."""
    signal = sum(float(np.square(e.astype(np.float64)).sum()) for e in expected)
    noise = sum(float(np.square(a.astype(np.float64) - e).sum()) for e, a in zip(expected, actual, strict=True))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def compare(
    onnx_path: str, model: GraphModule, inputs: tuple[torch.Tensor, ...], sess: ort.InferenceSession | None = None
) -> ParityReport:
    """Compare outputs; raise ParityError naming where the two diverge.

    Passes when top-1 agrees on every sample and each output is within one step of its
    quantization. For schemes that are not exact in float32 (see `is_exact`) it also
    passes when the only disagreement is rounding-level: the first diverging tensor is
    off by one step on under 1% of its values. A wrong op, weight or scale fails that
    test at the tensor it breaks, whatever the number of samples; rounding passes it,
    and top-1 changes it causes are near-ties, reported in the agreement. Where that
    drift compounds to outputs further apart than PARITY_SQNR_DB, a ParityDriftWarning
    says so.
    """
    sess = sess or session(onnx_path)
    parts = chunks(inputs)
    with torch.no_grad():
        expected = _joined([[t.detach().numpy() for t in _as_list(model(*part))] for part in parts])
    actual = _joined([run_onnx(sess, part) for part in parts])
    steps = output_steps(model)
    worst, agree, total, too_far, flips = 0.0, 0, 0, [], []
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        if e.shape != a.shape:
            raise ParityError(f"output {i}: onnxruntime shape {a.shape} != torch shape {e.shape}")
        diff = float(np.abs(e - a).max()) if e.size else 0.0
        worst = max(worst, diff)
        step = steps[i] if i < len(steps) else None
        tol = (step * 1.0001) if step else 1e-4 * max(1.0, float(np.abs(e).max()))
        if diff > tol:
            too_far.append(f"output {i} differs by {diff:g} (allowed {tol:g})")
        if e.ndim >= 2 and e.shape[1] > 1:
            same = (e.argmax(1) == a.argmax(1)).reshape(e.shape[0], -1).all(axis=1)
            agree += int(same.sum())
            total += e.shape[0]
            if not same.all():
                flips.append(f"output {i}: top-1 differs on {int((~same).sum())} of {e.shape[0]} samples")
    sqnr = output_sqnr_db(expected, actual)
    report = ParityReport(worst, steps[0] if steps else None, agree / total if total else 1.0, inputs[0].shape[0], sqnr)
    if not too_far and not flips:
        return report
    local = local_divergences(onnx_path, model, inputs)
    faults = [d for d in local if not d.is_rounding]
    if local and not faults and not is_exact(model):
        report = replace(report, local=tuple(local))
        if sqnr >= PARITY_SQNR_DB:
            return report
        flip_db = flip_sqnr_db(model, inputs, local)
        warnings.warn(
            ParityDriftWarning(
                f"onnxruntime and torch part only by rounding ({local[0]}; op by op, from the same inputs, "
                f"every quantized tensor agrees up to rounding), but the model amplifies it: their outputs "
                f"agree at {sqnr:.1f} dB SQNR, under {PARITY_SQNR_DB:g} dB; as many one-step flips at the same "
                f"tensors made in torch alone move torch's outputs to {flip_db:.1f} dB. The engine will see the same "
                "drift; a trained model usually amplifies far less than a random one"
            ),
            stacklevel=3,
        )
        return replace(report, flip_sqnr_db=flip_db)
    if faults and local[0].is_rounding:  # drift first, then a real fault further on
        where = f"{faults[0]}, computed from the same inputs as torch (before it, rounding only: {local[0]})"
    elif local:
        where = str(local[0])
    else:
        where = "all quantized tensors agree; the difference arises after the last one"
    raise ParityError("onnxruntime disagrees with the converted model: " + "; ".join(too_far + flips) + f"; {where}.")


class _Recorder(Interpreter):
    def __init__(self, module: GraphModule) -> None:
        super().__init__(module)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: Node) -> object:
        result = super().run_node(n)
        if n.target in Q_OPS:
            self.values[n.name] = result
        return result


class _Flipper(Interpreter):
    """Runs the model with, for each quantized tensor named in `flips`, that many of its values nearest a
    rounding tie rounded the other way.

    Those are the values another float32 runtime is likeliest to round differently.
    """

    def __init__(self, module: GraphModule, flips: dict[str, int]) -> None:
        super().__init__(module)
        self.flips = flips

    def run_node(self, n: Node) -> object:
        result = super().run_node(n)
        count = self.flips.get(n.name, 0)
        if not count:
            return result
        x, scale, zero_point = (self.env[a] if isinstance(a, Node) else a for a in n.args[:3])
        scale, zero_point = torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(zero_point)
        if n.target == qd.quantize_per_channel.default:  # (x, scales, zero_points, axis, ...): along axis
            shape = [1] * x.dim()
            shape[n.args[3]] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        exact = x / scale
        nearest = to_grid(x, scale)  # the one rounding: what the quantize node computed before clamping
        away = (exact - exact.floor() - 0.5).abs()  # 0 at a tie
        away[nearest + zero_point != result] = math.inf  # clamped values are no ties
        where = torch.topk(away.reshape(-1), min(count, away.numel()), largest=False).indices
        down = (exact < nearest).reshape(-1)[where]  # rounded up, so the other way is down
        flat = result.clone().reshape(-1)
        qmin, qmax = n.args[-3], n.args[-2]  # quantize ops end with (..., quant_min, quant_max, dtype)
        flat[where] = torch.clamp(torch.where(down, flat[where] - 1, flat[where] + 1), qmin, qmax).to(flat.dtype)
        return flat.reshape(result.shape)


def flip_sqnr_db(model: GraphModule, inputs: tuple[torch.Tensor, ...], divergences: list[Divergence]) -> float:
    """Torch's outputs against torch's own with, in each tensor of `divergences`, `count` values moved one step.

    The counterfactual for rounding drift: if rounding, in torch alone, as many values
    the other way as onnxruntime did, at the same tensors (those values nearest a tie),
    moves the outputs about as far as onnxruntime's are, the distance is the model's
    amplification of rounding ties, not a fault of the file. The flips are spread over
    the chunks.
    """
    parts = chunks(inputs)
    expected, actual = [], []
    with torch.no_grad():
        for i, part in enumerate(parts):
            flips = {d.tensor: d.count // len(parts) + (i < d.count % len(parts)) for d in divergences}
            expected.append([t.numpy() for t in _as_list(model(*part))])
            flipped = _Flipper(model, flips).run(*part)
            actual.append([t.numpy() for t in _as_list(flipped)])
    return output_sqnr_db(_joined(expected), _joined(actual))


MODULE_KEY = "edgequant_module"


def _module_path(node: Node) -> str:
    if MODULE_KEY in node.meta:
        return node.meta[MODULE_KEY]
    # Walk up from the quantizer to the nearest op that belongs to a named submodule:
    # for conv -> relu -> quantize in a root forward(), that is the conv.
    frontier = [a for a in node.args if isinstance(a, Node)]
    seen: set[Node] = set()
    while frontier:
        producer = frontier.pop(0)
        if producer in seen or producer.target in Q_OPS:
            continue
        seen.add(producer)
        if path := module_name(producer):
            return path
        frontier.extend(a for a in producer.args if isinstance(a, Node))
    return node.name


def reexport(
    converted: GraphModule, inputs: tuple[torch.Tensor, ...]
) -> tuple[torch.export.ExportedProgram, GraphModule]:
    """Export the converted model once more, for ONNX, keeping where each quantizer came from.

    ONNX value names follow this program's node names, so its module is the reference
    the parity check compares against. The user-facing module paths of the converted
    graph are carried over to its quantize nodes, which appear in the same order.
    """
    batch = torch.export.Dim("batch", min=1)
    with aten_bn(converted):
        program = torch.export.export(converted, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs))
    reference = program.module()
    set_graph_training(reference, dropout=False, batchnorm=False)
    ours = [n for n in converted.graph.nodes if n.target in Q_OPS]
    theirs = [n for n in reference.graph.nodes if n.target in Q_OPS]
    if len(ours) == len(theirs):
        for a, b in zip(ours, theirs, strict=True):
            b.meta[MODULE_KEY] = _module_path(a)
    return program, reference


FED_SUFFIX = "__torch"  # graph input that carries torch's values of a quantized tensor


def _fed_from_torch(proto: onnx.ModelProto, values: dict[str, torch.Tensor]) -> tuple[onnx.ModelProto, list[str]]:
    """`proto` with every op that reads a quantized tensor `t` of `values` reading a graph input `t__torch` instead.

    Each quantized tensor (made a graph output) is then computed from torch's values of
    its inputs: a difference there is that op's own, not one carried in from upstream.
    Returns the model and the tensors fed, in order: the extra inputs to pass after the model's own.
    """
    outputs = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in values if n not in outputs)
    consumed = {i for node in proto.graph.node for i in node.input}
    fed = [n for n in values if n in consumed]
    for name in fed:
        elem = onnx.helper.np_dtype_to_tensor_dtype(values[name].numpy().dtype)
        proto.graph.input.append(onnx.helper.make_tensor_value_info(name + FED_SUFFIX, elem, None))
    rewired = set(fed)
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in rewired:
                node.input[i] = name + FED_SUFFIX
    return proto, fed


def local_divergences(onnx_path: str, model: GraphModule, inputs: tuple[torch.Tensor, ...]) -> list[Divergence]:
    """Every quantized tensor (in graph order) that onnxruntime computes differently from torch's values of its inputs.

    The first is also the first tensor where the two runtimes part when run end to end
    (its inputs agree there); the later ones are each op's own difference, free of the
    drift the ones before it set off.
    """
    proto = onnx.load(onnx_path)
    produced = {o for node in proto.graph.node for o in node.output}
    sess, names, fed = None, [], []
    # Per quantized tensor, over all chunks: [values that differ, values, largest difference in steps].
    tally: dict[str, list[int]] = {}
    for part in chunks(inputs):
        recorder = _Recorder(model)
        with torch.no_grad():
            recorder.run(*part)
        if sess is None:
            names = [n for n in recorder.values if n in produced]
            rewired, fed = _fed_from_torch(proto, {n: recorder.values[n] for n in names})
            sess = session(rewired.SerializeToString())
            del proto, rewired
        graph_inputs = tuple(part) + tuple(recorder.values[n] for n in fed)
        got = dict(zip([o.name for o in sess.get_outputs()], run_onnx(sess, graph_inputs), strict=True))
        for name in names:
            want, have = recorder.values[name].numpy(), got.get(name)
            if have is None:
                continue
            count = tally.setdefault(name, [0, 0, 0])
            count[1] += want.size
            if not np.array_equal(want, have):
                count[0] += int((want != have).sum())
                count[2] = max(count[2], int(np.abs(want.astype(np.int64) - have.astype(np.int64)).max()))
    nodes = {n.name: n for n in model.graph.nodes}
    return [
        Divergence(name, _module_path(nodes[name]), differ, size, lsb)
        for name in names
        for differ, size, lsb in [tally.get(name, (0, 0, 0))]
        if differ
    ]


def locate_divergence(onnx_path: str, model: GraphModule, inputs: tuple[torch.Tensor, ...]) -> Divergence | None:
    """The first quantized tensor (in graph order) where torch and onnxruntime differ, if any."""
    local = local_divergences(onnx_path, model, inputs)
    return local[0] if local else None
