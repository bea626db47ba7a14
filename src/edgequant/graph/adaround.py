"""AdaRound: learn, layer by layer, whether each weight rounds down or up.

Rounding every weight to its nearest grid point minimises the weight error, not the
layer's output error (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", 2020). AdaRound keeps each layer's scale (power-of-2 or free, per tensor
or per channel: whatever the observer chose) and learns a soft rounding offset
h(V) in [0, 1] per weight that minimises ||W x - W~ x||^2 on the calibration inputs x,
with a regulariser that anneals h to exactly 0 or 1. The result is a weight already on
the grid, so convert, export and the engine need nothing new.

Layers are taken one at a time on their float inputs. Convolutions are optimised on a
random sample of their input patches (im2col), which keeps an iteration a small matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.fx import GraphModule
from tqdm.auto import tqdm

from ..numerics.observers import paused
from .bias_correction import ObservedLayer, observed_layers, quantized_weight
from .ops import ROUNDED_OPS

aten = torch.ops.aten

ITERATIONS = 300  # per layer; the paper uses 10,000 at ImageNet scale
PATCHES = 4096  # input patches sampled per layer, from all calibration batches
BATCH = 256  # patches per optimisation step
LEARNING_RATE = 1e-2
# Weight of the rounding regulariser (mean over weights) against the reconstruction error
# relative to nearest rounding's; both terms are scale-free, so one value fits every layer.
REGULARIZATION = 1.0
WARMUP = 0.2  # fraction of iterations with reconstruction loss only
BETA = (20.0, 2.0)  # annealing range of the regulariser's exponent
_ZETA, _GAMMA = 1.1, -0.1  # rectified-sigmoid stretch
_CONV_DEFAULTS = (1, 0, 1)  # aten.conv2d's stride, padding, dilation when the node leaves them out


def _soft_rounding(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _initial_v(fraction: torch.Tensor) -> torch.Tensor:
    """V with h(V) equal to the fractional part of W / s: the optimisation starts at W."""
    p = torch.clamp((fraction - _GAMMA) / (_ZETA - _GAMMA), 1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def _patches(layer: ObservedLayer, inputs: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """(P, groups, in / groups * kernel) input patches of the layer, sampled from all inputs."""
    node, w = layer.node, layer.weight
    rows = []
    for x in inputs:
        if node.target == aten.conv2d.default:
            stride, padding, dilation = (*node.args[3:6], *_CONV_DEFAULTS[len(node.args) - 3 :])[:3]
            cols = F.unfold(x, tuple(w.shape[2:]), dilation=dilation, padding=padding, stride=stride)  # (N, C*k, L)
            rows.append(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
        else:
            rows.append(x.reshape(-1, x.shape[-1]))
    patches = torch.cat(rows)
    if len(patches) > PATCHES:
        patches = patches[torch.randperm(len(patches), generator=generator)[:PATCHES]]
    return patches.reshape(len(patches), layer.groups, -1)


def _layer_inputs(gm: GraphModule, layer: ObservedLayer, batches: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """The float tensors the layer's input observer sees on the calibration batches."""
    seen: list[torch.Tensor] = []
    handle = layer.input_observer.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad(), paused(gm):
            for inputs in batches:
                gm(*inputs)
    finally:
        handle.remove()
    return seen


def round_layer(
    layer: ObservedLayer, patches: torch.Tensor, iterations: int, generator: torch.Generator
) -> torch.Tensor:
    """The layer's weight with learned rounding, on the observer's grid (same scale)."""
    w = layer.weight.detach()
    obs = layer.weight_observer
    scale, _ = obs.qparams()
    shape = [-1] + [1] * (w.dim() - 1)
    s = scale.reshape(shape) if scale.numel() > 1 else scale
    floor = torch.floor(w / s)
    v = _initial_v(w / s - floor).detach().requires_grad_(True)
    groups = layer.groups
    w_grouped = w.reshape(groups, w.shape[0] // groups, -1)  # (g, out / g, in / g * k)
    with torch.no_grad():
        target = torch.einsum("pgk,gok->pgo", patches, w_grouped)
        nearest = quantized_weight(w, obs)  # the rounding convert uses
        out = torch.einsum("pgk,gok->pgo", patches, nearest.reshape(w_grouped.shape))
        # Reconstruction error in units of nearest rounding's, so one regulariser weight fits every layer.
        baseline = (out - target).square().sum(dim=(1, 2)).mean().clamp(min=1e-30)
    optimizer = torch.optim.Adam([v], lr=LEARNING_RATE)
    warmup = int(WARMUP * iterations)
    for step in range(iterations):
        index = torch.randint(0, len(patches), (min(BATCH, len(patches)),), generator=generator)
        soft = torch.clamp(floor + _soft_rounding(v), obs.quant_min, obs.quant_max) * s
        out = torch.einsum("pgk,gok->pgo", patches[index], soft.reshape(w_grouped.shape))
        loss = (out - target[index]).square().sum(dim=(1, 2)).mean() / baseline
        if step >= warmup:
            progress = (step - warmup) / max(1, iterations - warmup)
            beta = BETA[1] + 0.5 * (BETA[0] - BETA[1]) * (1 + math.cos(progress * math.pi))
            h = _soft_rounding(v)
            loss = loss + REGULARIZATION * (1 - (2 * h - 1).abs().pow(beta)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return torch.clamp(floor + (_soft_rounding(v) >= 0.5).float(), obs.quant_min, obs.quant_max) * s


def adaround(
    gm: GraphModule,
    batches: list[tuple[torch.Tensor, ...]],
    iterations: int = ITERATIONS,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Replace each 8-bit weight of a calibrated graph with its learned rounding.

    Run after the ranges are final (the weight scales are kept). Returns the original
    float weights by graph attribute name, for bias correction to measure against.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = [
        la
        for la in observed_layers(gm)
        if la.node.target in ROUNDED_OPS and la.weight_observer.quant_max <= 127 and la.weight_observer.has_range
    ]
    originals: dict[str, torch.Tensor] = {}
    for layer in tqdm(layers, desc="adaround", leave=False, disable=not progress or None):
        patches = _patches(layer, _layer_inputs(gm, layer, batches), generator)
        with torch.enable_grad():
            rounded = round_layer(layer, patches, iterations, generator)
        originals[layer.node.args[1].args[0].target] = layer.weight.detach().clone()
        layer.weight.copy_(rounded)
    return originals
