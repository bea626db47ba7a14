"""Empirical bias correction: remove the mean output shift that weight rounding causes.

For a layer y = W x + b, quantizing W to Q(W) shifts the mean output of channel o by
sum_k (W - Q(W))[o, k] * E[x_k] (spatially: summed over the kernel too). That shift is
measured from the per-channel means of the layer's input on the calibration data and
added to the bias, so the quantized layer has the float layer's mean output.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .batchnorm import WEIGHTED_OPS
from .observers import RangeObserver
from .scales import dequantize, quantize

aten = torch.ops.aten


def _module(gm: GraphModule, node: object) -> RangeObserver | None:
    if isinstance(node, Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module if isinstance(module, RangeObserver) else None
    return None


def _quantized_weight(w: torch.Tensor, obs: RangeObserver) -> torch.Tensor:
    scale, zero_point = obs.calculate_qparams()
    if scale.numel() > 1:
        shape = [-1] + [1] * (w.dim() - 1)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return dequantize(quantize(w, scale, zero_point, obs.quant_min, obs.quant_max), scale, zero_point)


def mean_shift(w: torch.Tensor, qw: torch.Tensor, input_mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Per-output-channel mean of (W - Q(W)) x for inputs with per-channel mean `input_mean`."""
    delta = (w - qw).reshape(w.shape[0], w.shape[1], -1).sum(dim=2)  # (out, in / groups)
    per_group = w.shape[1]
    means = input_mean.reshape(groups, per_group)
    out_per_group = w.shape[0] // groups
    return (delta.reshape(groups, out_per_group, per_group) * means[:, None, :]).sum(dim=2).reshape(-1)


@torch.no_grad()
def correct_biases(gm: GraphModule) -> int:
    """Adjust the bias of every layer whose input observer tracked channel means."""
    corrected = 0
    for node in gm.graph.nodes:
        if node.target not in WEIGHTED_OPS:
            continue
        x_obs, w_obs = _module(gm, node.args[0]), _module(gm, node.args[1])
        if x_obs is None or w_obs is None or x_obs.channel_mean is None:
            continue
        weight_node = node.args[1].args[0]
        bias_node = node.args[2] if len(node.args) > 2 else None
        if weight_node.op != "get_attr" or not (isinstance(bias_node, Node) and bias_node.op == "get_attr"):
            continue
        w = operator.attrgetter(weight_node.target)(gm)
        bias = operator.attrgetter(bias_node.target)(gm)
        groups = node.args[6] if node.target != aten.linear.default and len(node.args) > 6 else 1
        bias += mean_shift(w, _quantized_weight(w, w_obs), x_obs.channel_mean, groups)
        corrected += 1
    return corrected
