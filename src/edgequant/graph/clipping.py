"""Weight clipping: pull outlier weights in before their range sets the scale."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from .ops import WEIGHTED_OPS, constant

aten = torch.ops.aten


@torch.no_grad()
def clip_weights(gm: GraphModule, num_std: float) -> int:
    """Clamp each output channel's weights to mean +- num_std standard deviations.

    A single large weight stretches a per-tensor (or per-channel) scale and costs every
    other weight resolution; clipping it changes that one weight a little instead.
    Returns how many weights were clipped.
    """
    clipped = 0
    for node in gm.graph.nodes:
        w = constant(gm, node.args[1]) if node.target in WEIGHTED_OPS else None
        if w is None:
            continue
        flat = w.reshape(w.shape[0], -1)
        mean, std = flat.mean(dim=1, keepdim=True), flat.std(dim=1, keepdim=True)
        lo, hi = mean - num_std * std, mean + num_std * std
        clipped += int(((flat < lo) | (flat > hi)).sum())
        flat.copy_(torch.maximum(torch.minimum(flat, hi), lo))
    return clipped
