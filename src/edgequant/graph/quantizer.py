"""Graph annotation rules: which tensors of an exported model get quantized, and how.

The rules follow what fixed-point engines such as TIDL run: every conv / linear
reads a quantized input and quantized weights and writes a quantized output
after its fused BN and activation; residual adds, pools and other requantizing ops
quantize their outputs; shape-only ops pass the quantized tensor through. Biases
are left to `convert.quantize_biases`, which gives them the int32 scale s_in * s_w.

Mixed precision: a 16-bit layer gets 16-bit weights and a 16-bit output. Every
input is read at the precision its producer wrote it in, so an 8 -> 16 or 16 -> 8
transition is a single Q/DQ pair and nothing is rounded twice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
    SharedQuantizationSpec,
)

from ..core.errors import UnquantizedOpsWarning, UsageError
from ..numerics.observers import FakeQuantize, RangeObserver
from ..numerics.scales import qrange
from ..numerics.scheme import Scheme
from .batchnorm import FUSED_TAG, fuse_conv_bn_for_qat
from .ops import (
    BOUND_OP,
    FUSED_ACTIVATIONS,
    FUSED_BN_OP,
    MATMUL_OPS,
    MOVEMENT_OPS,
    PASS_THROUGH_OPS,
    REQUANT_OPS,
    SHARED_OPS,
    WEIGHTED_OPS,
    is_depthwise,
    module_name,
    nonnegative_nodes,
    reaches,
    sole_user,
)

aten = torch.ops.aten

_BITS_KEY = "edgequant_bits"
# Weight of each batch in the moving average of a QAT activation range (QATConfig's default).
DEFAULT_AVERAGING_CONSTANT = 0.01


@dataclass(frozen=True)
class _Specs:
    activation: QuantizationSpec
    weight: QuantizationSpec
    depthwise_weight: QuantizationSpec


def _annotated(node: Node) -> bool:
    ann = node.meta.get("quantization_annotation")
    return ann is not None and ann._annotated


def _mark(node: Node, inputs: dict[Node, object] | None = None, output: object | None = None) -> None:
    node.meta["quantization_annotation"] = QuantizationAnnotation(
        input_qspec_map=inputs or {}, output_qspec=output, _annotated=True
    )


def _is_tensor(node: object) -> bool:
    """A floating-point activation (not a constant, counter or shape)."""
    if not isinstance(node, Node) or node.op == "get_attr":
        return False
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def unquantized_ops(model: GraphModule) -> dict[str, list[str]]:
    """Ops that compute in float, unannotated, by op name: the modules they come from.

    The exported file keeps them as float ops between Q/DQ pairs; an engine must run
    them in float (or they need a rule here).
    """
    found: dict[str, list[str]] = {}
    for node in model.graph.nodes:
        if node.op != "call_function" or _annotated(node) or node.target in MOVEMENT_OPS:
            continue
        if not _is_tensor(node) or not any(_is_tensor(a) for a in node.all_input_nodes):
            continue  # constants, shapes, counters
        name = str(getattr(node.target, "_overloadpacket", node.target))
        found.setdefault(name, []).append(module_name(node) or "<root>")
    return found


def high_precision_layers(model: GraphModule, scheme: Scheme) -> set[Node]:
    """The conv / linear nodes the scheme runs in 16 bit."""
    choice = scheme.high_precision
    if choice is None or not scheme.is_mixed:
        return set()
    weighted = [n for n in model.graph.nodes if n.op == "call_function" and n.target in WEIGHTED_OPS]
    if choice == "first_last":
        return {weighted[0], weighted[-1]} if weighted else set()
    if callable(choice):
        return {n for n in weighted if choice(module_name(n))}
    chosen = {n for n in weighted if any(module_name(n) == c or module_name(n).startswith(c + ".") for c in choice)}
    named = {module_name(n) for n in weighted}
    missing = [c for c in choice if not any(m == c or m.startswith(c + ".") for m in named)]
    if missing:
        raise UsageError(
            f"high_precision names no conv or linear layer: {', '.join(missing)}. "
            f"Quantizable layers include: {', '.join(sorted(named)[:12])}{' ...' if len(named) > 12 else ''}"
        )
    return chosen


class EdgeQuantizer(Quantizer):
    """Annotates an exported graph for one `Scheme`, for PTQ (observers) or QAT (fake-quant).

    With ``qat``, activation ranges follow a moving average with weight ``averaging_constant``.
    """

    def __init__(self, scheme: Scheme, qat: bool, averaging_constant: float = DEFAULT_AVERAGING_CONSTANT) -> None:
        super().__init__()
        self.scheme = scheme
        self.qat = qat
        self.averaging_constant = averaging_constant
        self.specs = {bits: self._make_specs(bits) for bits in {scheme.activation_bits, 16}}
        self.default_bits = scheme.activation_bits

    def _make_specs(self, bits: int) -> _Specs:
        scheme = self.scheme
        dtype = torch.int8 if bits == 8 else torch.int16
        wbits = scheme.weight_bits if bits == scheme.activation_bits else 16
        wdtype = torch.int8 if wbits == 8 else torch.int16
        amin, amax = qrange(bits)
        wmin, wmax = qrange(wbits)
        # torchao adds dtype / range / qscheme from the spec when it builds each module.
        common = dict(power_of_2=scheme.power_of_2)
        if self.qat:
            # Activations follow a moving average; weights are re-ranged every step.
            act_ctr = FakeQuantize.with_args(
                observer=RangeObserver,
                averaging_constant=self.averaging_constant,
                symmetric=scheme.symmetric_activations,
                **common,
            )
        else:
            act_ctr = RangeObserver.with_args(symmetric=scheme.symmetric_activations, **common)

        def weight_ctr(axis: int | None) -> object:
            if self.qat:
                return FakeQuantize.with_args(
                    observer=RangeObserver, averaging_constant=1.0, symmetric=True, channel_axis=axis, **common
                )
            return RangeObserver.with_args(symmetric=True, channel_axis=axis, **common)

        sym = scheme.symmetric_activations
        act = QuantizationSpec(
            dtype=dtype,
            quant_min=amin,
            quant_max=amax,
            qscheme=torch.per_tensor_symmetric if sym else torch.per_tensor_affine,
            observer_or_fake_quant_ctr=act_ctr,
        )

        def weight_spec(per_channel: bool) -> QuantizationSpec:
            return QuantizationSpec(
                dtype=wdtype,
                quant_min=wmin,
                quant_max=wmax,
                qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
                ch_axis=0 if per_channel else None,
                observer_or_fake_quant_ctr=weight_ctr(0 if per_channel else None),
            )

        granularity = scheme.weight_granularity
        return _Specs(
            activation=act,
            weight=weight_spec(granularity == "per_channel"),
            depthwise_weight=weight_spec(granularity != "per_tensor"),
        )

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        # QAT trains conv+BN in folded form; PTQModule folds BN before it gets here.
        if self.qat:
            fuse_conv_bn_for_qat(model)
        return model

    def annotate(self, model: GraphModule) -> GraphModule:
        high = high_precision_layers(model, self.scheme)
        for node in model.graph.nodes:
            if node.op != "call_function" or _annotated(node):
                continue
            if node.target in WEIGHTED_OPS:
                self._annotate_weighted(node, 16 if node in high else self.default_bits)
            elif node.target in REQUANT_OPS:
                self._annotate_requant(node)
            elif node.target in SHARED_OPS:
                self._annotate_shared(node)
        found = unquantized_ops(model)
        if found:
            warnings.warn(UnquantizedOpsWarning(found), stacklevel=2)
        return model

    def validate(self, model: GraphModule) -> None:
        return None

    def prepare_obs_or_fq_callback(self, model: GraphModule, edge_or_node_to_obs_or_fq: dict) -> None:
        if self.scheme.unsigned_activations:
            make_nonnegative_unsigned(model, edge_or_node_to_obs_or_fq)

    def _input_bits(self, node: Node, fallback: int) -> int:
        """Precision the input was written in: its producer's, through pass-through ops."""
        while isinstance(node, Node):
            if _BITS_KEY in node.meta:
                return node.meta[_BITS_KEY]
            if node.target not in PASS_THROUGH_OPS or not node.args:
                break
            node = node.args[0]
        return fallback

    def _inputs(self, node: Node, fallback: int) -> dict[Node, object]:
        args = node.args[0] if node.target == aten.cat.default else node.args
        return {a: self.specs[self._input_bits(a, fallback)].activation for a in args if _is_tensor(a)}

    def _fused_tail(self, node: Node) -> tuple[Node, list[Node]]:
        """Follow a fused BN (conv -> bn -> getitem) and one activation; return (output, inner nodes)."""
        inner: list[Node] = []
        end = node
        bn = sole_user(node) if node.meta.get(FUSED_TAG) else None
        if bn is not None and bn.target == FUSED_BN_OP and (item := sole_user(bn)) is not None:
            inner += [node, bn]
            end = item
        user = sole_user(end)
        if user is not None and user.target in FUSED_ACTIVATIONS:
            inner.append(end)
            end = user
            bound = sole_user(end)
            if bound is not None and bound.target == BOUND_OP:  # relu6 after equalization
                inner.append(end)
                end = bound
        return end, inner

    def _annotate_weighted(self, node: Node, bits: int) -> None:
        x, weight = node.args[0], node.args[1]
        specs = self.specs[bits]
        out, inner = self._fused_tail(node)
        inputs = {
            x: self.specs[self._input_bits(x, bits)].activation,
            weight: specs.depthwise_weight if is_depthwise(node) else specs.weight,
        }
        out.meta[_BITS_KEY] = bits
        if out is node:
            _mark(node, inputs, specs.activation)
            return
        _mark(node, inputs)
        for n in inner[1:]:
            _mark(n)
        _mark(out, output=specs.activation)

    def _annotate_requant(self, node: Node) -> None:
        if not _is_tensor(node):
            return
        out = node
        user = sole_user(node)
        if node.target not in FUSED_ACTIVATIONS and user is not None and user.target in FUSED_ACTIVATIONS:
            out = user
        bits = self.default_bits
        out.meta[_BITS_KEY] = bits
        inputs = self._inputs(node, bits)
        if out is node:
            _mark(node, inputs, self.specs[bits].activation)
            return
        _mark(node, inputs)
        _mark(out, output=self.specs[bits].activation)

    def _annotate_shared(self, node: Node) -> None:
        x = node.args[0]
        bits = self._input_bits(x, self.default_bits)
        node.meta[_BITS_KEY] = bits
        _mark(node, {x: self.specs[bits].activation}, SharedQuantizationSpec((x, node)))


def make_nonnegative_unsigned(model: GraphModule, edge_or_node_to_obs_or_fq: dict) -> None:
    """Give uint8 [0, 255] to each int8 symmetric per-tensor activation quantizer that sees no negative value.

    A quantizer (torchao's map shares one among several tensors) qualifies when every
    tensor it quantizes is non-negative by construction (`ops.nonnegative_nodes`), none
    is a weight, and none reaches a MatMul (which TDA4VM runs only on inputs of one
    signedness). Its range [0, max] then gets 255 steps instead of 127.
    """
    nonnegative = nonnegative_nodes(model)
    groups: dict[int, tuple[object, set[Node]]] = {}
    for key, quantizer in edge_or_node_to_obs_or_fq.items():
        tensor = key[0] if isinstance(key, tuple) else key
        groups.setdefault(id(quantizer), (quantizer, set()))[1].add(tensor)
    for quantizer, tensors in groups.values():
        observer = quantizer.activation_post_process if isinstance(quantizer, FakeQuantize) else quantizer
        if not isinstance(observer, RangeObserver) or (observer.dtype, observer.symmetric, observer.ch_axis) != (
            torch.int8,
            True,
            None,
        ):
            continue
        if all(t in nonnegative and t.op != "get_attr" and not reaches(t, MATMUL_OPS) for t in tensors):
            quantizer.make_unsigned()
