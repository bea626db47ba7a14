"""From a prepared (observed / fake-quantized) graph to the integer model the engine runs."""

from __future__ import annotations

import copy
import math
import operator

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_manager import PassManager
from torchao.quantization.pt2e.constant_fold import constant_fold
from torchao.quantization.pt2e.convert import _convert_to_reference_decomposed_fx
from torchao.quantization.pt2e.quantize_pt2e import _quant_node_constraint
from torchao.quantization.pt2e.quantizer import DuplicateDQPass, PortNodeMetaForQDQ

from ..numerics.observers import FakeQuantize
from ..numerics.scales import qrange, to_grid
from .batchnorm import fold_fused_bn, set_graph_training
from .ops import DQ_OPS, WEIGHTED_OPS, unshare_tensors

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
INT32_MIN, INT32_MAX = qrange(32)


def _copy_sharing_tensors(prepared: GraphModule) -> tuple[GraphModule, set[int]]:
    """A copy of the graph module whose parameters and buffers are the prepared model's own.

    Folding and conversion replace tensors rather than write into them, so sharing is
    safe and spares a full float copy of the weights at the memory peak.
    """
    tensors = [*prepared.parameters(), *prepared.buffers()]
    return copy.deepcopy(prepared, {id(t): t for t in tensors}), {id(t) for t in tensors}


def convert(prepared: GraphModule) -> GraphModule:
    """Fold BN, turn fake-quant into Q/DQ with int8 weights, and quantize biases to int32.

    The prepared model is left untouched so training can go on after a convert.
    """
    model, shared = _copy_sharing_tensors(prepared)
    set_graph_training(model, dropout=False, batchnorm=False)
    fold_fused_bn(model)
    rerange_weights(model)
    model = to_qdq(model)
    quantize_biases(model)
    drop_unread_tensors(model)
    unshare_tensors(model, shared)  # e.g. float norm weights
    # torchao's prepare makes train()/eval() raise on its graphs (the copy inherits that);
    # the converted graph is fixed in inference form, so the plain nn.Module behaviour
    # (flag only) is the right one.
    for attr in ("train", "eval"):
        model.__dict__.pop(attr, None)
    return model.eval()


def to_qdq(model: GraphModule) -> GraphModule:
    """torchao's `convert_pt2e(model, fold_quantize=True)` without its QAT conv+BN fold.

    That fold pattern-matches the conv+BN form of torchao's own QAT fusion, which
    edgequant never builds (BN is folded by `fold_fused_bn` before this). It can never
    match, yet on a graph that keeps a standalone BN (densenet's BN-ReLU-conv layers) it
    traces its patterns and searches the graph for each: 72 of densenet121's 83 s of convert.
    The other steps are torchao's, in its order.
    """
    meta = dict(model.meta)
    model = _convert_to_reference_decomposed_fx(model)
    model = PassManager([DuplicateDQPass()])(model).graph_module
    model = PassManager([PortNodeMetaForQDQ()])(model).graph_module
    constant_fold(model, _quant_node_constraint)
    model.meta.update(meta)
    return model


def drop_unread_tensors(model: GraphModule) -> int:
    """Delete the parameters and buffers no node reads any more; return how many.

    Constant folding replaces each quantized weight by its int8 values, but the float
    weight stays an attribute of the module. Left there, it would be copied when the
    converted model stops sharing tensors with the prepared one: a whole float copy
    of a model without BN (a ViT) per convert.
    """
    read = {n.target for n in model.graph.nodes if n.op == "get_attr"}
    called = [n.target for n in model.graph.nodes if n.op == "call_module"]
    dropped = 0
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        owner, _, attr = name.rpartition(".")
        if name in read or any(owner == c or owner.startswith(c + ".") for c in called):
            continue
        delattr(model.get_submodule(owner), attr)
        dropped += 1
    return dropped


def rerange_weights(model: GraphModule) -> int:
    """Give each QAT weight quantizer the range of the weight it now quantizes.

    During training a weight quantizer ranges the weight of its last forward pass,
    folded with BN's statistics of that moment; the optimizer step and BN's update
    come after. The integer model quantizes the final folded weights, so their own
    range is the one that clips nothing (unless ranges were frozen: then the frozen one).
    New tensors are assigned, never written into: the prepared model shares them.
    """
    done = 0
    for node in model.graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(source, Node) and source.op == "get_attr"):
            continue
        fq = model.get_submodule(node.target)
        obs = getattr(fq, "activation_post_process", None)
        if not isinstance(fq, FakeQuantize) or fq.is_frozen:
            continue
        low, high = obs.extremes(operator.attrgetter(source.target)(model))
        obs.min_val, obs.max_val = low, high
        done += 1
    return done


def _dq_scale(node: object) -> torch.Tensor | None:
    """The scale of a dequantize node, as a float32 tensor, or None if not dequantized."""
    if not isinstance(node, Node) or node.target not in DQ_OPS:
        return None
    scale = node.args[1]
    if isinstance(scale, Node):
        owner = node.graph.owning_module
        scale = operator.attrgetter(scale.target)(owner)
    return torch.as_tensor(scale, dtype=torch.float32)


def int32_bias(bias: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 values, scale) of a bias on the grid s_in * s_w given as `scale`.

    With 16-bit operands s_in * s_w can be so small that the bias overflows int32; the
    scale is then doubled until it fits (still a power of two times s_in * s_w).
    """
    bias = bias.detach().to(torch.float32)
    overflow = float((bias / scale).abs().max()) / INT32_MAX
    if overflow > 1.0:
        scale = scale * 2.0 ** math.ceil(math.log2(overflow))
    return torch.clamp(to_grid(bias, scale), INT32_MIN, INT32_MAX).to(torch.int32), scale


def quantize_biases(model: GraphModule) -> int:
    """Replace each float conv/linear bias by int32 values with scale s_in * s_w, plus a DQ.

    onnxruntime does this rounding itself (its WeightBiasQuantization pass) at any
    optimisation level above "disabled"; doing it here, explicitly, makes the torch
    model, the ONNX file and the engine compute the same integers.

    A bias that would overflow int32 gets a larger scale (see `int32_bias`).
    A float bias is never left behind: onnxruntime would quantize it to int32 with
    s_in * s_w itself, and saturate.
    """
    graph = model.graph
    done = 0
    for node in list(graph.nodes):
        if node.target not in WEIGHTED_OPS or len(node.args) < 3:
            continue
        bias = node.args[2]
        s_in, s_w = _dq_scale(node.args[0]), _dq_scale(node.args[1])
        if not isinstance(bias, Node) or bias.op != "get_attr" or s_in is None or s_w is None:
            continue
        q, s_b = int32_bias(operator.attrgetter(bias.target)(model), (s_in * s_w).reshape(-1))
        name = f"{node.name}_bias_int32"
        model.register_buffer(name, q)
        with graph.inserting_before(node):
            q_node = graph.get_attr(name)
            if s_b.numel() == 1:
                dq = graph.call_function(
                    qd.dequantize_per_tensor.default,
                    (q_node, float(s_b), 0, INT32_MIN, INT32_MAX, torch.int32),
                )
            else:
                scale_name, zp_name = f"{name}_scale", f"{name}_zero_point"
                model.register_buffer(scale_name, s_b)
                model.register_buffer(zp_name, torch.zeros_like(q))
                dq = graph.call_function(
                    qd.dequantize_per_channel.default,
                    (q_node, graph.get_attr(scale_name), graph.get_attr(zp_name), 0, INT32_MIN, INT32_MAX, torch.int32),
                )
        node.replace_input_with(bias, dq)
        done += 1
    graph.eliminate_dead_code()
    graph.lint()
    model.recompile()
    return done
