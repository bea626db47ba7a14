"""Conv+BN in exported graphs: the QAT fused form, the final fold, train/eval switches.

torchao's own conv-BN QAT rewrite hard-codes eps=1e-5 and momentum=0.1, which is
wrong for models such as mobilenet_v3 (eps=1e-3) and badly wrong for channels whose
running variance is ~0. Here the original `batch_norm` node is kept untouched and
the fused form is inserted around the conv, so every BN keeps its own eps and
momentum, in training and in the fold.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

CONV_OPS = (aten.conv1d.default, aten.conv2d.default)
BN_OP = aten.batch_norm.default
DROPOUT_OPS = (aten.dropout.default, aten.dropout_.default)
# batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
_BN_TRAINING = 5
_BN_EPS = 7
FUSED_TAG = "edgequant_fused_bn"
# Marks the helper nodes of the fused form, which the quantizer must not treat as activations.
HELPER_TAG = "edgequant_bn_helper"


def _fake_val(arg: Any) -> Any:
    if isinstance(arg, Node):
        return arg.meta.get("val")
    if isinstance(arg, (list, tuple)):
        return type(arg)(_fake_val(a) for a in arg)
    return arg


def _call(graph: torch.fx.Graph, target: Any, args: tuple, like: Node) -> Node:
    """Insert a call with the metadata later passes rely on (fake value, module stack)."""
    node = graph.call_function(target, args)
    node.meta[HELPER_TAG] = True
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    fake_args = _fake_val(args)
    fake = next((a for a in fake_args if isinstance(a, torch.Tensor)), None)
    if fake is not None and hasattr(fake, "fake_mode"):
        with fake.fake_mode:
            node.meta["val"] = target(*fake_args)
    return node


def _bn_args(bn: Node) -> list[Any]:
    args = list(bn.args)
    defaults = [None, None, None, None, None, False, 0.1, 1e-5, True]
    return args + defaults[len(args):]


def _conv_args(conv: Node) -> list[Any]:
    args = list(conv.args)
    return args + [None] * (3 - len(args)) if len(args) < 3 else args


def fuse_conv_bn_for_qat(gm: GraphModule) -> int:
    """Rewrite conv -> BN into the scaled-weight form; return how many pairs were fused.

    conv(x, w) -> bn  becomes  conv(x, w * s) / s [+ b] -> bn,  s = gamma / sqrt(var + eps).
    The weight quantizer then sees the folded weight the engine will run, while BN
    keeps updating its statistics from the (unfolded) conv output.
    """
    graph = gm.graph
    fused = 0
    for bn in list(graph.nodes):
        if bn.target != BN_OP:
            continue
        conv = bn.args[0]
        if not isinstance(conv, Node) or conv.target not in CONV_OPS or len(conv.users) != 1:
            continue
        _, bn_w, _, _, running_var, _, _, eps, _ = _bn_args(bn)
        if bn_w is None or running_var is None:
            continue
        cargs = _conv_args(conv)
        weight, bias = cargs[1], cargs[2]
        ndim = weight.meta["val"].dim()
        with graph.inserting_before(conv):
            var_eps = _call(graph, aten.add.Tensor, (running_var, eps), conv)
            std = _call(graph, aten.sqrt.default, (var_eps,), conv)
            factor = _call(graph, aten.div.Tensor, (bn_w, std), conv)
            w_factor = _call(graph, aten.reshape.default, (factor, [-1] + [1] * (ndim - 1)), conv)
            scaled_w = _call(graph, aten.mul.Tensor, (weight, w_factor), conv)
        cargs[1], cargs[2] = scaled_w, None
        conv.args = tuple(cargs)
        conv.meta[FUSED_TAG] = True
        out_shape = [1, -1] + [1] * (ndim - 2)
        with graph.inserting_after(conv):
            o_factor = _call(graph, aten.reshape.default, (factor, out_shape), conv)
        with graph.inserting_after(o_factor):
            out = _call(graph, aten.div.Tensor, (conv, o_factor), conv)
        if bias is not None:
            with graph.inserting_after(out):
                b = _call(graph, aten.reshape.default, (bias, out_shape), conv)
            with graph.inserting_after(b):
                out = _call(graph, aten.add.Tensor, (out, b), conv)
        bn.replace_input_with(conv, out)
        fused += 1
    graph.lint()
    gm.recompile()
    return fused


def _attr(gm: GraphModule, node: Node | None) -> torch.Tensor | None:
    if node is None:
        return None
    if node.op != "get_attr":
        raise ValueError(f"expected a constant, got node {node.name} ({node.op})")
    return operator.attrgetter(node.target)(gm)


def _new_attr(gm: GraphModule, graph: torch.fx.Graph, name: str, value: torch.Tensor, before: Node) -> Node:
    gm.register_buffer(name, value.detach().clone())
    with graph.inserting_before(before):
        node = graph.get_attr(name)
    node.meta["val"] = value
    return node


def fold_fused_bn(gm: GraphModule) -> int:
    """Fold every BN fused by `fuse_conv_bn_for_qat` into its conv, for convert and export.

    Works on a prepared model (weight fake-quant modules in place): the weight
    quantizer keeps its learned range and now quantizes the folded weight directly.
    """
    graph = gm.graph
    folded = 0
    for conv in list(graph.nodes):
        if not conv.meta.get(FUSED_TAG):
            continue
        (div,) = conv.users
        out = div
        conv_bias = None
        if len(div.users) == 1 and next(iter(div.users)).target == aten.add.Tensor:
            out = next(iter(div.users))
            conv_bias = out.args[1].args[0]
        (bn,) = out.users
        _, bn_w, bn_b, mean, var, _, _, eps, _ = _bn_args(bn)
        weight_path = conv.args[1]
        # weight_path is the weight fake-quant (call_module) or the mul itself.
        mul = weight_path.args[0] if weight_path.op == "call_module" else weight_path
        raw_w = _attr(gm, mul.args[0])
        gamma, beta = _attr(gm, bn_w), _attr(gm, bn_b)
        running_mean, running_var = _attr(gm, mean), _attr(gm, var)
        factor = gamma / torch.sqrt(running_var + eps)
        w = raw_w * factor.reshape([-1] + [1] * (raw_w.dim() - 1))
        b0 = _attr(gm, conv_bias) if conv_bias is not None else torch.zeros_like(running_mean)
        beta = beta if beta is not None else torch.zeros_like(running_mean)
        b = beta + factor * (b0 - running_mean)
        w_node = _new_attr(gm, graph, f"{conv.name}_folded_weight", w, mul)
        b_node = _new_attr(gm, graph, f"{conv.name}_folded_bias", b, conv)
        mul.replace_all_uses_with(w_node)
        cargs = _conv_args(conv)
        cargs[2] = b_node
        conv.args = tuple(cargs)
        bn.replace_all_uses_with(conv)
        del conv.meta[FUSED_TAG]
        folded += 1
    _drop_bn_counters(gm)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return folded


def _drop_bn_counters(gm: GraphModule) -> None:
    """Remove `num_batches_tracked += 1` updates, which have no meaning after folding."""
    for node in list(gm.graph.nodes):
        if node.target in (aten.add_.Tensor,) and not node.users:
            target = node.args[0]
            if isinstance(target, Node) and target.op == "get_attr" and str(target.target).endswith(
                "num_batches_tracked"
            ):
                gm.graph.erase_node(node)


def set_graph_training(gm: GraphModule, dropout: bool, batchnorm: bool) -> None:
    """Switch dropout and BN nodes between train and eval behaviour in place.

    Only the `training` literal is edited, so eps and momentum stay as exported.
    """
    changed = False
    for node in gm.graph.nodes:
        if node.target == BN_OP:
            args = _bn_args(node)
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
