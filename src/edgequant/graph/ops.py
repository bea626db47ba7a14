"""The op vocabulary and the node helpers that every graph pass shares.

Each set of aten ops that a pass or check treats alike is named here once: a new op
rule starts by adding the op to the right set, and every pass that reads the set
follows.
"""

from __future__ import annotations

import operator
from typing import TypeVar

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..numerics import batchnorm, distributed

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
_Module = TypeVar("_Module", bound=nn.Module)

# --- layers with weights -------------------------------------------------------------
CONV_OPS = (aten.conv1d.default, aten.conv2d.default)
# Layers with weights (and a bias) that the engine quantizes.
WEIGHTED_OPS = (*CONV_OPS, aten.linear.default)
# Layers whose weight rounding AdaRound learns: 2-d convolutions (as im2col) and linear.
ROUNDED_OPS = (aten.conv2d.default, aten.linear.default)

# --- batch norm and dropout ----------------------------------------------------------
BN_OP = aten.batch_norm.default
# A fused BN is re-targeted to this op: same arguments, same running-stat updates,
# but torchao's prepare_qat_pt2e does not pattern-match it into its own fusion.
FUSED_BN_OP = aten._native_batch_norm_legit.default
# Under DDP, training-mode BN nodes call these instead: same arguments, statistics over all ranks.
SYNC_BN_OPS = {BN_OP: distributed.batch_norm, FUSED_BN_OP: distributed.native_batch_norm_legit}
# In eval mode a BN with no conv before it calls this instead: same arguments, onnxruntime's roundings.
ENGINE_BN_OP = batchnorm.batch_norm
STANDALONE_BN_OPS = (BN_OP, ENGINE_BN_OP)
BN_OPS = (BN_OP, FUSED_BN_OP, ENGINE_BN_OP, *SYNC_BN_OPS.values())
DROPOUT_OPS = (aten.dropout.default, aten.dropout_.default)

# --- activations ---------------------------------------------------------------------
RELU_OPS = (aten.relu.default, aten.relu_.default)
RELU6_OPS = (aten.hardtanh.default, aten.hardtanh_.default)
# Equalization rewrites relu6 as relu followed by a minimum with a per-channel bound.
BOUND_OP = aten.minimum.default
# Activations fused into the preceding conv / linear / add: no requantization between.
FUSED_ACTIVATIONS = (*RELU_OPS, *RELU6_OPS, aten.relu6.default, aten.clamp.default)

# --- quantization rules --------------------------------------------------------------
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
    *STANDALONE_BN_OPS,  # a BN with no conv before it (pre-activation blocks): the engine's scale layer
    *FUSED_ACTIVATIONS,
)
# Ops whose output keeps the input's quantization (the values are a subset of the input's).
SHARED_OPS = (aten.max_pool2d.default,)
# Ops that only move or reshape values: a quantized input stays quantized at the same precision.
PASS_THROUGH_OPS = (
    aten.flatten.using_ints,
    aten.reshape.default,
    aten.view.default,
    aten.permute.default,
    aten.squeeze.dim,
    aten.unsqueeze.default,
    *DROPOUT_OPS,
    aten.clone.default,
    aten.contiguous.default,
    *SHARED_OPS,
)
# Ops that move, select or reshape values without computing new ones: a float op
# between Q/DQ pairs, but one that changes no value, so nothing to warn about.
MOVEMENT_OPS = (
    *PASS_THROUGH_OPS,
    operator.getitem,
    aten.slice.Tensor,
    aten.select.int,
    aten.narrow.default,
    aten.transpose.int,
    aten.t.default,
    aten.expand.default,
    aten.repeat.default,
    aten.chunk.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.unbind.int,
    aten.unflatten.int,
    aten._unsafe_view.default,
    aten.alias.default,
    aten.detach.default,
    aten.roll.default,
    aten.pixel_shuffle.default,
    aten.channel_shuffle.default,
    aten.native_channel_shuffle.default,
    aten.stack.default,
)

# Products of two activations: TDA4VM runs a MatMul only on inputs of one signedness.
MATMUL_OPS = (aten.matmul.default, aten.bmm.default, aten.mm.default)

# --- signs ---------------------------------------------------------------------------
# Ops whose output is never negative when every tensor (and number) they read is not:
# selections, pools, means, nearest / bilinear resampling, concatenation, sums,
# products and the relu6 bound. Sigmoid-like gates are left out on purpose: their
# outputs crowd near 0 and 1, where the unsigned grid's gain is measured to hurt.
_SIGN_KEEPING_OPS = frozenset(
    {
        *MOVEMENT_OPS,
        aten.adaptive_avg_pool2d.default,
        aten.avg_pool2d.default,
        aten.mean.dim,
        aten.upsample_bilinear2d.vec,
        aten.upsample_nearest2d.vec,
        aten.upsample_nearest2d.default,
        aten.cat.default,
        aten.add.Tensor,
        aten.add_.Tensor,
        aten.mul.Tensor,
        BOUND_OP,
    }
)


def _lower_bound(node: Node) -> float | None:
    """The least value a relu / relu6 / clamp / hardtanh node can output, or None for other ops."""
    if node.target in (*RELU_OPS, aten.relu6.default):
        return 0.0
    if node.target in RELU6_OPS:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    if node.target == aten.clamp.default:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    return None


def nonnegative_nodes(gm: GraphModule) -> set[Node]:
    """The nodes whose tensor can never hold a negative value, by the ops that made it.

    One pass in graph (topological) order: an activation's lower bound, a constant's
    values, or an op from `_SIGN_KEEPING_OPS` whose every input is non-negative.
    """
    found: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = constant(gm, node)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and bool((value >= 0).all()):
                found.add(node)
        elif node.op == "call_function":
            low = _lower_bound(node)
            if low is not None:
                if isinstance(low, int | float) and low >= 0:
                    found.add(node)
            elif node.target in _SIGN_KEEPING_OPS and _reads_nonnegative(node, found):
                found.add(node)
    return found


def _reads_nonnegative(node: Node, found: set[Node]) -> bool:
    """Every tensor and number `node` reads is non-negative (shape and index arguments aside)."""
    if node.target in (aten.cat.default, aten.stack.default):
        values = node.args[0]
    elif node.target in (aten.add.Tensor, aten.add_.Tensor, aten.mul.Tensor, BOUND_OP):
        values = node.args
    else:
        values = node.args[:1]  # movement, pools, means: the rest are sizes, dims, indices
    values = list(values) + ([node.kwargs["alpha"]] if "alpha" in node.kwargs else [])
    if not values:
        return False
    for value in values:
        if isinstance(value, Node):
            if value not in found:
                return False
        elif not (isinstance(value, int | float) and value >= 0):
            return False
    return True


def reaches(node: Node, targets: tuple[object, ...]) -> bool:
    """`node`'s tensor is read by one of `targets`, directly or through movement ops."""
    frontier, seen = list(node.users), set()
    while frontier:
        user = frontier.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.target in targets:
            return True
        if user.target in MOVEMENT_OPS:
            frontier.extend(user.users)
    return False


# --- the converted (integer) model ---------------------------------------------------
Q_OPS = (qd.quantize_per_tensor.default, qd.quantize_per_channel.default)
DQ_OPS = (qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default)
# Float ops that torch and onnxruntime compute to the same bits on dequantized int8
# power-of-2 values: integer sums far below 2**24, comparisons, data movement, the
# pools and means whose rescale both sides round at the next quantizer, and BN as
# onnxruntime computes it. Anything else
# (layer norm, softmax, GELU, ...) computes in float with implementation-specific rounding.
EXACT_OPS = frozenset(
    {
        *MOVEMENT_OPS,
        *Q_OPS,
        *DQ_OPS,
        *WEIGHTED_OPS,
        *FUSED_ACTIVATIONS,
        aten.add.Tensor,
        aten.add_.Tensor,
        aten.sub.Tensor,
        BOUND_OP,
        aten.cat.default,
        aten.adaptive_avg_pool2d.default,
        aten.avg_pool2d.default,
        aten.mean.dim,
        ENGINE_BN_OP,  # standalone BN computed with onnxruntime's roundings (numerics/batchnorm.py)
        # nearest upsampling copies values: exact (bilinear interpolates in float and is not)
        aten.upsample_nearest2d.default,
        aten.upsample_nearest2d.vec,
    }
)


# --- node helpers --------------------------------------------------------------------
def module_name(node: Node) -> str:
    """Qualified name of the innermost module a node came from ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def producer_module(node: Node) -> str:
    """The module that computed `node`: its own, or the nearest producer's for a functional op.

    conv -> torch.relu -> quantizer in a root forward() names the conv.
    """
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop(0)
        if current in seen:
            continue
        seen.add(current)
        if current.op != "get_attr" and (name := module_name(current)):
            return name
        frontier.extend(a for a in current.all_input_nodes if a.op != "get_attr")
    return node.name


def sole_user(node: Node) -> Node | None:
    """The one node that reads `node`, or None when several (or none) do."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def constant(gm: GraphModule, node: object) -> torch.Tensor | None:
    """The tensor a get_attr node reads, or None for anything else (an activation, None)."""
    if isinstance(node, Node) and node.op == "get_attr":
        return operator.attrgetter(node.target)(gm)
    return None


def _set_tensor(owner: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Give `owner.attr` a new tensor: a parameter stays a parameter, a buffer keeps its persistence."""
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, old.requires_grad))
    else:
        owner.register_buffer(attr, value, persistent=attr not in owner._non_persistent_buffers_set)


def replace_constant(gm: GraphModule, node: Node, value: torch.Tensor) -> None:
    """Point a get_attr node's attribute at a new tensor."""
    owner_path, _, attr = node.target.rpartition(".")
    _set_tensor(gm.get_submodule(owner_path), attr, value)


def unshare_tensors(model: nn.Module, shared: set[int]) -> None:
    """Give `model` its own copy of each parameter and buffer whose id is in `shared`."""
    for module in model.modules():
        named = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for attr, value in named:
            if id(value) in shared:
                _set_tensor(module, attr, value.detach().clone())


def conv_groups(node: Node) -> int:
    """The group count of a conv node (1 for linear layers and convs that leave it out)."""
    return node.args[6] if node.target in CONV_OPS and len(node.args) > 6 else 1


def is_depthwise(node: Node, weight: torch.Tensor | None = None) -> bool:
    """A conv with one input channel per group (`weight` where the graph has no shape for it)."""
    if node.target not in CONV_OPS:
        return False
    weight = weight if weight is not None else node.args[1].meta.get("val")
    return conv_groups(node) > 1 and weight is not None and weight.shape[1] == 1


def activation_quantizer_nodes(gm: GraphModule, kind: type[_Module]) -> list[tuple[Node, _Module]]:
    """The `kind` modules (observers or fake-quantizers) of a prepared graph that see activations, in graph order.

    What tells them from weight quantizers is what they read: a weight quantizer reads
    a get_attr node (the parameter), an activation quantizer any other node. Each comes
    with its graph node, whose users and input say where the activation goes and comes from.
    """
    found = []
    for node in gm.graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if isinstance(source, Node) and source.op != "get_attr":
            module = gm.get_submodule(node.target)
            if isinstance(module, kind):
                found.append((node, module))
    return found
