"""Graph annotation rules: which tensors of an exported model get quantized, and how.

The rules follow what fixed-point engines such as TIDL run: every conv / linear
reads a quantized input and quantized weights and writes a quantized output
after its fused BN and activation; residual adds and pools requantize their
outputs; shape-only ops pass the quantized tensor through. Biases are left to
`convert.quantize_biases`, which gives them the int32 scale s_in * s_w.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
    SharedQuantizationSpec,
)

from .batchnorm import CONV_OPS, FUSED_BN_OP, FUSED_TAG, fuse_conv_bn_for_qat
from .observers import FakeQuantize, RangeObserver
from .scheme import Scheme

aten = torch.ops.aten

WEIGHTED_OPS = (*CONV_OPS, aten.linear.default)
# Activations fused into the preceding conv / linear / add: no requantization between.
FUSED_ACTIVATIONS = (
    aten.relu.default,
    aten.relu_.default,
    aten.hardtanh.default,
    aten.hardtanh_.default,
    aten.clamp.default,
)
# Ops the engine requantizes at its output.
REQUANT_OPS = (
    aten.add.Tensor,
    aten.add_.Tensor,
    aten.mul.Tensor,
    aten.cat.default,
    aten.adaptive_avg_pool2d.default,
    aten.avg_pool2d.default,
    aten.mean.dim,
    aten.hardswish.default,
    aten.hardswish_.default,
    aten.hardsigmoid.default,
    aten.hardsigmoid_.default,
    aten.sigmoid.default,
    aten.silu.default,
    aten.silu_.default,
    aten.gelu.default,
    aten.upsample_bilinear2d.vec,
    aten.upsample_nearest2d.vec,
    *FUSED_ACTIVATIONS,
)
# Ops whose output keeps the input's quantization (the values are a subset of the input's).
SHARED_OPS = (aten.max_pool2d.default,)


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


def _sole_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


class EdgeQuantizer(Quantizer):
    """Annotates an exported graph for one `Scheme`, for PTQ (observers) or QAT (fake-quant)."""

    def __init__(self, scheme: Scheme, qat: bool) -> None:
        super().__init__()
        self.scheme = scheme
        self.qat = qat
        wmin, wmax = scheme.weight_range
        amin, amax = scheme.activation_range
        wdtype = torch.int8 if scheme.weight_bits == 8 else torch.int16
        adtype = torch.int8 if scheme.activation_bits == 8 else torch.int16
        act_kwargs = dict(
            dtype=adtype,
            quant_min=amin,
            quant_max=amax,
            power_of_2=scheme.power_of_2,
            symmetric=scheme.symmetric_activations,
        )
        weight_kwargs = dict(
            dtype=wdtype, quant_min=wmin, quant_max=wmax, power_of_2=scheme.power_of_2, symmetric=True
        )
        if qat:
            # Activations follow a moving average; weights are re-ranged every step.
            act_ctr = FakeQuantize.with_args(observer=RangeObserver, averaging_constant=0.01, **act_kwargs)
            weight_ctr = FakeQuantize.with_args(observer=RangeObserver, averaging_constant=1.0, **weight_kwargs)
        else:
            act_ctr = RangeObserver.with_args(**act_kwargs)
            weight_ctr = RangeObserver.with_args(**weight_kwargs)
        act_qscheme = torch.per_tensor_symmetric if scheme.symmetric_activations else torch.per_tensor_affine
        self.act_spec = QuantizationSpec(
            dtype=adtype, quant_min=amin, quant_max=amax, qscheme=act_qscheme, observer_or_fake_quant_ctr=act_ctr
        )
        self.weight_spec = QuantizationSpec(
            dtype=wdtype,
            quant_min=wmin,
            quant_max=wmax,
            qscheme=torch.per_tensor_symmetric,
            observer_or_fake_quant_ctr=weight_ctr,
        )

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        if self.qat:
            fuse_conv_bn_for_qat(model)
        return model

    def annotate(self, model: GraphModule) -> GraphModule:
        for node in model.graph.nodes:
            if node.op != "call_function" or _annotated(node):
                continue
            if node.target in WEIGHTED_OPS:
                self._annotate_weighted(node)
            elif node.target in REQUANT_OPS:
                self._annotate_requant(node)
            elif node.target in SHARED_OPS:
                self._annotate_shared(node)
        return model

    def validate(self, model: GraphModule) -> None:
        return None

    def _input_specs(self, node: Node) -> dict[Node, object]:
        args = node.args[0] if node.target == aten.cat.default else node.args
        return {a: self.act_spec for a in args if _is_tensor(a)}

    def _fused_tail(self, node: Node) -> tuple[Node, list[Node]]:
        """Follow a fused BN (conv -> bn -> getitem) and one activation; return (output, inner nodes)."""
        inner: list[Node] = []
        end = node
        bn = _sole_user(node) if node.meta.get(FUSED_TAG) else None
        if bn is not None and bn.target == FUSED_BN_OP and (item := _sole_user(bn)) is not None:
            inner += [node, bn]
            end = item
        user = _sole_user(end)
        if user is not None and user.target in FUSED_ACTIVATIONS:
            inner.append(end)
            end = user
        return end, inner

    def _annotate_weighted(self, node: Node) -> None:
        x, weight = node.args[0], node.args[1]
        out, inner = self._fused_tail(node)
        inputs = {x: self.act_spec, weight: self.weight_spec}
        if out is node:
            _mark(node, inputs, self.act_spec)
            return
        _mark(node, inputs)
        for n in inner[1:]:
            _mark(n)
        _mark(out, output=self.act_spec)

    def _annotate_requant(self, node: Node) -> None:
        if not _is_tensor(node):
            return
        out = node
        user = _sole_user(node)
        if node.target not in FUSED_ACTIVATIONS and user is not None and user.target in FUSED_ACTIVATIONS:
            out = user
        if out is node:
            _mark(node, self._input_specs(node), self.act_spec)
            return
        _mark(node, self._input_specs(node))
        _mark(out, output=self.act_spec)

    def _annotate_shared(self, node: Node) -> None:
        x = node.args[0]
        _mark(node, {x: self.act_spec}, SharedQuantizationSpec((x, node)))
