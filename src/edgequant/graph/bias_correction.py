"""Empirical bias correction: remove the mean output shift that weight rounding causes.

For a layer y = W x + b, quantizing W to Q(W) shifts the mean output of channel o by
sum_k (W - Q(W))[o, k] * E[x_k] (spatially: summed over the kernel too). That shift is
measured from the per-channel means of the layer's input on the calibration data and
added to the bias, so the quantized layer has the float layer's mean output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from ..numerics.observers import RangeObserver
from ..numerics.scales import dequantize, quantize
from .ops import WEIGHTED_OPS, constant, conv_groups

aten = torch.ops.aten


def _module(gm: GraphModule, node: object) -> RangeObserver | None:
    if isinstance(node, Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module if isinstance(module, RangeObserver) else None
    return None


def quantized_weight(w: torch.Tensor, obs: RangeObserver) -> torch.Tensor:
    scale, zero_point = obs.calculate_qparams()
    if scale.numel() > 1:
        shape = [-1] + [1] * (w.dim() - 1)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return dequantize(quantize(w, scale, zero_point, obs.quant_min, obs.quant_max), scale, zero_point)


def per_output_channel(values: torch.Tensor, input_stat: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """sum_k values[o, k, ...] * input_stat[k] per output channel o, for a layer of `groups` groups.

    `values` has a weight's shape (out, in / groups, *kernel); the kernel positions of
    one input channel share its statistic.
    """
    per_kernel = values.reshape(values.shape[0], values.shape[1], -1).sum(dim=2)  # (out, in / groups)
    per_group = values.shape[1]
    stats = input_stat.reshape(groups, per_group)
    out_per_group = values.shape[0] // groups
    return (per_kernel.reshape(groups, out_per_group, per_group) * stats[:, None, :]).sum(dim=2).reshape(-1)


def mean_shift(w: torch.Tensor, qw: torch.Tensor, input_mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Per-output-channel mean of (W - Q(W)) x for inputs with per-channel mean `input_mean`."""
    return per_output_channel(w - qw, input_mean, groups)


@dataclass
class ObservedLayer:
    """A conv or linear layer of a prepared graph, with the observers of its input and weight."""

    node: Node
    input_observer: RangeObserver
    weight_observer: RangeObserver
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int


def observed_layers(gm: GraphModule) -> Iterator[ObservedLayer]:
    """Every weighted layer whose input and weight are both observed and whose weight is a constant."""
    for node in gm.graph.nodes:
        if node.target not in WEIGHTED_OPS:
            continue
        x_obs, w_obs = _module(gm, node.args[0]), _module(gm, node.args[1])
        if x_obs is None or w_obs is None or node.args[1].args[0].op != "get_attr":
            continue
        bias = constant(gm, node.args[2]) if len(node.args) > 2 else None
        weight = constant(gm, node.args[1].args[0])
        yield ObservedLayer(node, x_obs, w_obs, weight, bias, conv_groups(node))


@torch.no_grad()
def correct_biases(gm: GraphModule, float_weights: dict[str, torch.Tensor] | None = None) -> int:
    """Adjust the bias of every layer whose input observer tracked channel means.

    `float_weights` (by graph attribute name) are the weights to measure the shift
    against where the graph's own weight is already rounded (AdaRound).
    """
    corrected = 0
    for layer in observed_layers(gm):
        mean = layer.input_observer.channel_mean
        if mean is None or layer.bias is None:
            continue
        w = (float_weights or {}).get(layer.node.args[1].args[0].target, layer.weight)
        qw = quantized_weight(layer.weight, layer.weight_observer)
        layer.bias += mean_shift(w, qw, mean, layer.groups)
        corrected += 1
    return corrected
