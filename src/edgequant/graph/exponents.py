"""Power-of-2 weight exponents chosen by the output error they cause, not always rounded up.

A power-of-2 scale covering the whole range is pow2_ceil(max|W| / qmax). Just above a
power of two that doubles the step of every weight for the sake of the one largest: one
exponent lower clips a few weights (to +-qmax * s / 2) and halves the rounding error of
all the others. Which is better depends on the layer's input, so each candidate is scored
by the expected error it adds to the layer's output, E||(W - Q(W)) x||^2, taken with
independent rounding errors across input channels:

    error(o) = sum_k sum_kernel (W - Q(W))[o, k]^2 * E[x_k^2]

with E[x_k^2] measured on the calibration data by the input's observer (uniform where the
input was not observed). Per-tensor weights take the exponent of least total error,
per-channel ones choose per output channel.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from ..numerics.observers import RangeObserver
from ..numerics.scales import dequantize, quantize
from .bias_correction import observed_layers, per_output_channel

# Candidate exponents below the covering one; three lower would clip more than half the range.
CANDIDATE_SHIFTS = (0, 1, 2)


def output_errors(
    w: torch.Tensor, obs: RangeObserver, input_energy: torch.Tensor | None, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate scales, expected output error per output channel), one row per candidate shift.

    Scales are (candidates, channels) for a per-channel observer, (candidates, 1) otherwise.
    """
    scale, zero_point = obs.qparams()
    energy = torch.ones(w.shape[1] * groups) if input_energy is None else input_energy
    shape = [-1] + [1] * (w.dim() - 1)
    candidates, errors = [], []
    for shift in CANDIDATE_SHIFTS:
        s = scale / 2.0**shift
        step = s.reshape(shape) if s.numel() > 1 else s
        qw = dequantize(quantize(w, step, zero_point.reshape(shape), obs.quant_min, obs.quant_max), step, 0)
        candidates.append(s)
        errors.append(per_output_channel((w - qw).square(), energy, groups))
    return torch.stack(candidates), torch.stack(errors)


@torch.no_grad()
def choose_weight_exponents(gm: GraphModule) -> int:
    """Set every power-of-2 weight observer's range to the exponent of least output error.

    The range is narrowed to exactly +-qmax * s, so `qparams()` (and with it convert,
    export and bias correction) yields the chosen scale s. Returns how many scales were
    lowered from the covering one. Run it after the calibration passes: a weight
    observer that sees the weight again widens its range back.
    """
    lowered = 0
    for layer in observed_layers(gm):
        obs = layer.weight_observer
        if not (obs.power_of_2 and obs.symmetric and obs.has_range):
            continue
        energy = layer.input_observer.channel_energy
        if energy is not None and energy.numel() != layer.weight.shape[1] * layer.groups:
            energy = None  # statistics along another axis than the layer reads
        scales, errors = output_errors(layer.weight, obs, energy, layer.groups)
        if obs.ch_axis is None:
            chosen = scales[int(torch.argmin(errors.sum(dim=1)))]
        else:
            best = torch.argmin(errors, dim=0)
            chosen = scales.gather(0, best[None]).reshape(-1)
        covering = scales[0]
        lowered += int((chosen < covering).sum())
        limit = (chosen * obs.quant_max).reshape(obs.max_val.shape)
        obs.max_val.copy_(torch.minimum(obs.max_val, limit))
        obs.min_val.copy_(torch.maximum(obs.min_val, -limit))
    return lowered
