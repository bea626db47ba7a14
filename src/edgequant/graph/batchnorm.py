"""Conv+BN in exported graphs: the QAT fused form, the final fold, train/eval switches.

QAT trains conv+BN in folded form. The engine will run conv(x, Q(w * s)) with
s = gamma / sqrt(var + eps) per output channel, so the weight quantizer must see
w * s. Because conv is linear in each output channel,

    conv(x, Q(w * s)) / s  ==  conv(x, Q(w * s) / s),

so the fused form keeps the conv and BN nodes as exported and only hands s to the
weight quantizer, which fake-quantizes w on the per-channel grid q / |s| (q being
the per-tensor step of w * s). BN keeps its own eps and momentum (torchao's own
rewrite resets them to 1e-5 / 0.1), and no extra pass over activations is needed.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .ops import (
    BN_OP,
    BN_OPS,
    CONV_OPS,
    DROPOUT_OPS,
    ENGINE_BN_OP,
    FUSED_BN_OP,
    STANDALONE_BN_OPS,
    SYNC_BN_OPS,
    constant,
    module_name,
    replace_constant,
)

aten = torch.ops.aten

_LOCAL_BN_OPS = {ENGINE_BN_OP: BN_OP} | {sync: local for local, sync in SYNC_BN_OPS.items()}
# batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, ...)
_BN_TRAINING = 5
FUSED_TAG = "edgequant_fused_bn"
# A BN channel whose running variance is below this fraction of its eps saw a constant
# conv output: that channel's conv weights only ever multiplied zeros.
DEAD_VARIANCE = 1e-3


def _bn_args(bn: Node) -> list[Any]:
    args = list(bn.args)
    defaults = [None, None, None, None, None, False, 0.1, 1e-5]
    return args[:8] + defaults[len(args[:8]) :]


def _with_meta(node: Node, like: Node, val: Any = None) -> Node:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    if val is not None:
        node.meta["val"] = val
    return node


def fuse_conv_bn_for_qat(gm: GraphModule) -> int:
    """Mark every conv -> BN pair for folded QAT; return how many pairs were fused.

    The BN node becomes `_native_batch_norm_legit` (+ getitem) and the conv is
    tagged; `attach_bn_factors` later connects the BN factor to the weight quantizer.
    """
    graph = gm.graph
    fused = 0
    for conv, bn in conv_bn_pairs(gm):
        args = _bn_args(bn)
        if args[1] is None or args[4] is None:  # no affine weight or no running stats
            continue
        with graph.inserting_after(bn):
            native = graph.call_function(FUSED_BN_OP, tuple(args))
        with graph.inserting_after(native):
            out = graph.call_function(operator.getitem, (native, 0))
        _with_meta(native, bn)
        _with_meta(out, bn, bn.meta.get("val"))
        bn.replace_all_uses_with(out)
        graph.erase_node(bn)
        native.meta[FUSED_TAG] = True
        conv.meta[FUSED_TAG] = True
        fused += 1
    graph.lint()
    gm.recompile()
    return fused


def conv_bn_pairs(gm: GraphModule) -> list[tuple[Node, Node]]:
    """(conv, BN) pairs of a captured graph where the BN reads only that conv's output."""
    pairs = []
    for bn in gm.graph.nodes:
        conv = bn.args[0] if bn.target in STANDALONE_BN_OPS else None
        if isinstance(conv, Node) and conv.target in CONV_OPS and len(conv.users) == 1:
            pairs.append((conv, bn))
    return pairs


@torch.no_grad()
def zero_dead_channels(gm: GraphModule) -> dict[str, list[int]]:
    """Zero the conv weights of output channels whose BN saw a constant; return them by module.

    A channel whose input is always zero (a dead channel upstream, typical for the
    depthwise conv after a dead stem channel) has BN running variance ~0, so its fold
    factor gamma / sqrt(var + eps) is ~1/sqrt(eps): its folded weights are hundreds of
    times the others' and alone set a per-tensor weight range, rounding every other
    channel to zero. They only ever multiply zeros, so zeroing them (and setting the
    running mean to the conv bias) leaves BN's output, beta, unchanged in train and eval.
    Edited tensors are replaced, never written into: the graph may share them with the caller's model.
    """
    found: dict[str, list[int]] = {}
    for conv, bn in conv_bn_pairs(gm):
        _, _, _, mean_node, var_node, _, _, eps = _bn_args(bn)
        var, mean, weight = constant(gm, var_node), constant(gm, mean_node), constant(gm, conv.args[1])
        if var is None or mean is None or weight is None:
            continue
        dead = torch.nonzero(var <= DEAD_VARIANCE * eps).flatten()
        if not len(dead) or len(dead) == len(var):
            continue  # nothing dead, or a layer that never saw data (leave it to the user)
        weight, mean = weight.clone(), mean.clone()
        weight[dead] = 0.0
        bias = constant(gm, conv.args[2]) if len(conv.args) > 2 else None
        mean[dead] = 0.0 if bias is None else bias[dead]
        replace_constant(gm, conv.args[1], weight)
        replace_constant(gm, mean_node, mean)
        found[module_name(conv) or conv.name] = dead.tolist()
    return found


def _fused_pairs(gm: GraphModule) -> list[tuple[Node, Node]]:
    pairs = []
    for conv in gm.graph.nodes:
        if conv.meta.get(FUSED_TAG) and conv.target in CONV_OPS:
            (bn,) = conv.users
            pairs.append((conv, bn))
    return pairs


def attach_bn_factors(gm: GraphModule) -> int:
    """After prepare: feed s = gamma / sqrt(var + eps) (no gradient) to each weight quantizer."""
    graph = gm.graph
    attached = 0
    for conv, bn in _fused_pairs(gm):
        weight_fq = conv.args[1]
        if not (isinstance(weight_fq, Node) and weight_fq.op == "call_module"):
            continue
        _, gamma, _, _, var, _, _, eps = _bn_args(bn)
        with graph.inserting_before(weight_fq):
            # Fresh get_attr nodes: the BN's own may come later in graph order.
            gamma, var = graph.get_attr(gamma.target), graph.get_attr(var.target)
            var_eps = graph.call_function(aten.add.Tensor, (var, eps))
            std = graph.call_function(aten.sqrt.default, (var_eps,))
            factor = graph.call_function(aten.div.Tensor, (gamma, std))
            # s is a constant for autograd: conv(x, Q(w s) / s) depends on s only
            # through rounding; gamma learns through BN itself.
            factor = graph.call_function(aten.detach.default, (factor,))
        weight_fq.args = (weight_fq.args[0], factor)
        attached += 1
    graph.lint()
    gm.recompile()
    return attached


def _new_attr(gm: GraphModule, name: str, value: torch.Tensor, before: Node) -> Node:
    """Register a freshly computed tensor (no copy: large models must not hold two)."""
    value = value.detach()
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


def _drop_unused_attrs(gm: GraphModule, candidates: set[str]) -> None:
    """Delete the tensors among `candidates` that no get_attr node reads any more.

    Folding replaces each conv weight and BN's parameters by one new tensor; keeping
    the old ones would double the model's memory and its state_dict.
    """
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in candidates - used:
        owner_name, _, attr = target.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if hasattr(owner, attr):
            delattr(owner, attr)


def fold_fused_bn(gm: GraphModule) -> int:
    """Fold every fused BN into its conv, for convert and export.

    The weight quantizer now receives the folded weight w * s itself and keeps the
    per-tensor range it learned for exactly that tensor.
    """
    graph = gm.graph
    folded = 0
    before = {n.target for n in graph.nodes if n.op == "get_attr"}
    for conv, bn in _fused_pairs(gm):
        _, bn_w, bn_b, mean, var, _, _, eps = _bn_args(bn)
        gamma, running_mean, running_var = constant(gm, bn_w), constant(gm, mean), constant(gm, var)
        beta = constant(gm, bn_b) if bn_b is not None else torch.zeros_like(running_mean)
        factor = gamma / torch.sqrt(running_var + eps)
        weight_in = conv.args[1]
        fq = weight_in if weight_in.op == "call_module" else None
        raw_w = constant(gm, fq.args[0] if fq is not None else weight_in)
        conv_bias = conv.args[2] if len(conv.args) > 2 else None
        b0 = constant(gm, conv_bias) if conv_bias is not None else torch.zeros_like(running_mean)
        w = raw_w * factor.reshape([-1] + [1] * (raw_w.dim() - 1))
        w_node = _new_attr(gm, f"{conv.name}_folded_weight", w, fq if fq is not None else conv)
        b_node = _new_attr(gm, f"{conv.name}_folded_bias", beta + factor * (b0 - running_mean), conv)
        if fq is not None:
            fq.args = (w_node,)
        args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
        args[1] = fq if fq is not None else w_node
        args[2] = b_node
        conv.args = tuple(args)
        for user in list(bn.users):
            user.replace_all_uses_with(conv)
            graph.erase_node(user)
        graph.erase_node(bn)
        del conv.meta[FUSED_TAG]
        folded += 1
    _drop_bn_counters(gm)
    graph.eliminate_dead_code()
    _drop_unused_attrs(gm, before)
    graph.lint()
    gm.recompile()
    return folded


def _drop_bn_counters(gm: GraphModule) -> None:
    """Remove `num_batches_tracked += 1` updates, which have no meaning after folding."""
    for node in list(gm.graph.nodes):
        if node.target == aten.add_.Tensor and not node.users:
            target = node.args[0]
            if (
                isinstance(target, Node)
                and target.op == "get_attr"
                and str(target.target).endswith("num_batches_tracked")
            ):
                gm.graph.erase_node(node)


def set_graph_training(gm: GraphModule, dropout: bool, batchnorm: bool, sync_bn: bool = False) -> None:
    """Switch dropout and BN nodes between train and eval behaviour in place.

    Only the `training` literal is edited, so eps and momentum stay as exported.
    With `sync_bn`, training-mode BN nodes call the cross-rank versions in
    `distributed.py`, so convert and export never see them. In eval mode a BN with no
    conv before it calls `numerics.batchnorm` (onnxruntime's roundings).
    """
    changed = False
    for node in gm.graph.nodes:
        if node.target in BN_OPS:
            local = _LOCAL_BN_OPS.get(node.target, node.target)
            if batchnorm:
                target = SYNC_BN_OPS[local] if sync_bn else local
            else:
                target = ENGINE_BN_OP if local == BN_OP else local
            if node.target != target:
                node.target = target
                changed = True
            args = _bn_args(node) + list(node.args[8:])
            if args[_BN_TRAINING] != batchnorm:
                args[_BN_TRAINING] = batchnorm
                node.args = tuple(args)
                changed = True
        elif node.target in DROPOUT_OPS:
            args = list(node.args) + [True] * (3 - len(node.args))
            if args[2] != dropout:
                args[2] = dropout
                node.args = tuple(args)
                changed = True
    if changed:
        gm.recompile()


def use_aten_bn(gm: GraphModule) -> list[Node]:
    """Point eval-mode standalone BN nodes back at aten's op, for torch.export; return them.

    torch.export would trace `numerics.batchnorm` into its float64 arithmetic, where
    aten's op exports as one BatchNormalization (which onnxruntime computes the same way).
    """
    nodes = [node for node in gm.graph.nodes if node.target == ENGINE_BN_OP]
    for node in nodes:
        node.target = BN_OP
    if nodes:
        gm.recompile()
    return nodes


@contextmanager
def aten_bn(gm: GraphModule) -> Iterator[None]:
    """`use_aten_bn` for the duration of a torch.export, then the engine's arithmetic again."""
    nodes = use_aten_bn(gm)
    try:
        yield
    finally:
        for node in nodes:
            node.target = ENGINE_BN_OP
        if nodes:
            gm.recompile()


def fold_bn(gm: GraphModule) -> int:
    """Fold every conv -> BN pair into the conv, using BN's running statistics (PTQ)."""
    fuse_conv_bn_for_qat(gm)
    return fold_fused_bn(gm)


@torch.no_grad()
def reestimate_bn(gm: GraphModule, batches: list[tuple[torch.Tensor, ...]]) -> int:
    """Recompute every BN's running statistics as the average over `batches`.

    Useful when the data the model will see differs from its training data (other
    preprocessing, another camera). Each batch gets weight 1/k via BN's momentum, so
    the result is the plain mean of the per-batch statistics. Returns how many BNs.
    """
    bns = [n for n in gm.graph.nodes if n.target in BN_OPS]
    original = {n: _bn_args(n)[6] for n in bns}
    for n in bns:
        _, _, _, mean, var, *_ = _bn_args(n)
        constant(gm, mean).zero_()
        constant(gm, var).fill_(1.0)
    set_graph_training(gm, dropout=False, batchnorm=True)
    for k, inputs in enumerate(batches, start=1):
        for n in bns:
            args = _bn_args(n) + list(n.args[8:])
            args[6] = 1.0 / k
            n.args = tuple(args)
        gm.recompile()
        gm(*inputs)
    for n in bns:
        args = _bn_args(n) + list(n.args[8:])
        args[6] = original[n]
        n.args = tuple(args)
    set_graph_training(gm, dropout=False, batchnorm=False)
    gm.recompile()
    return len(bns)
