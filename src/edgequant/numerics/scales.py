"""Scale and zero-point arithmetic: where power-of-2 and free scales are computed.

Everything here is plain tensor math so that observers, tests and the export
checker share one definition of rounding and saturation.
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # (defines the quantized_decomposed ops registered below)

from ..core.errors import UsageError

# Smallest scale we hand out: a range of exactly zero must still give a valid,
# finite quantizer (a dead channel is common after BN folding).
MIN_SCALE = 2.0**-24
# float32 layout: 23 mantissa bits under the exponent (pow2_ceil works on them).
_MANTISSA_MASK = (1 << 23) - 1
_EXPONENT_MASK = -(1 << 23)


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """Integer range of a `bits`-wide type, e.g. (-128, 127) for int8."""
    if bits < 2 or bits > 32:
        raise UsageError(f"bit width must be between 2 and 32, got {bits}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= `scale`, computed exactly on the float32 bits.

    `2**ceil(log2(s))` can be off by one exponent when log2 rounds. For a
    positive normal float32, adding 2**23 - 1 to its bit pattern carries into
    the exponent unless the mantissa is already zero, and masking the mantissa
    off then leaves exactly the next power of two; no rounding is involved.
    """
    scale = torch.clamp(scale.to(torch.float32), min=MIN_SCALE)
    bits = scale.view(torch.int32) + _MANTISSA_MASK
    return bits.bitwise_and_(_EXPONENT_MASK).view(torch.float32)


def symmetric_scale(max_abs: torch.Tensor, qmax: int, power_of_2: bool) -> torch.Tensor:
    """Scale that maps [-max_abs, max_abs] onto [-qmax, qmax] without clipping.

    With `power_of_2` the scale is rounded *up* to a power of two, so the range
    is still covered and every rescale in the engine becomes a shift.
    """
    max_abs = max_abs.to(torch.float32)
    scale = max_abs / qmax
    if power_of_2:
        return pow2_ceil(scale)
    # The division rounds to nearest; one ulp up where that left max_abs outside the range.
    short = scale * qmax < max_abs
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    return torch.clamp(scale, min=MIN_SCALE)


def asymmetric_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering [min_val, max_val], which always includes 0."""
    min_val = torch.clamp(min_val.to(torch.float32), max=0.0)
    max_val = torch.clamp(max_val.to(torch.float32), min=0.0)
    scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=MIN_SCALE)
    zero_point = torch.clamp(qmin - to_grid(min_val, scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def to_grid(x: torch.Tensor, scale: torch.Tensor | float, power_of_2: bool = False) -> torch.Tensor:
    """round_half_even(x / scale): the one rounding of edgequant, ONNX QuantizeLinear's.

    Every quantizer (fake-quant, the converted model, the analysis simulator, bias
    correction, exponent choice, the mse range estimator, zero points) rounds through
    here. torch's reference kernels compute x * (1 / scale); for a free scale that
    differs from x / scale at about 1 value in 300,000 at 8 bit (1 in 4,000 at 16 bit),
    and the differences compound through the layers, while ONNX runtimes divide. For a
    power-of-2 scale the reciprocal is exact, so `power_of_2` takes the faster multiply.
    """
    if power_of_2:
        return torch.mul(x, torch.reciprocal(torch.as_tensor(scale))).round_()
    return torch.div(x, scale).round_()


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Round half to even and saturate, as ONNX QuantizeLinear does."""
    return torch.clamp(to_grid(x, scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - zero_point) * scale


def is_power_of_2(scale: torch.Tensor) -> bool:
    """True when every element is an exact power of two."""
    mantissa, _ = torch.frexp(scale.to(torch.float32))
    return bool(torch.all(mantissa == 0.5))


def _quantize_per_tensor(
    input: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype: torch.dtype
) -> torch.Tensor:
    return quantize(input.float(), scale, zero_point, quant_min, quant_max).to(dtype)


def _quantize_per_tensor_tensor(
    input: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return quantize(input.float(), scale.reshape(()), zero_point.reshape(()), quant_min, quant_max).to(dtype)


def _quantize_per_channel(
    input: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    shape = [1] * input.dim()
    shape[axis] = -1
    return quantize(input.float(), scales.reshape(shape), zero_points.reshape(shape), quant_min, quant_max).to(dtype)


# The converted model runs torch's quantized_decomposed ops, whose reference kernels
# multiply by 1 / scale. Registered for the devices below, these kernels divide, as
# ONNX QuantizeLinear (onnxruntime, TIDL's import) does, so that free-scale models
# compute the same integers in torch and in the engine. The ops' schemas, meta
# kernels and graph nodes are untouched: export sees the same ops.
_LIBRARY = torch.library.Library("quantized_decomposed", "IMPL")
for _key in ("CPU", "CUDA"):
    _LIBRARY.impl("quantize_per_tensor", _quantize_per_tensor, _key)
    _LIBRARY.impl("quantize_per_tensor.tensor", _quantize_per_tensor_tensor, _key)
    _LIBRARY.impl("quantize_per_channel", _quantize_per_channel, _key)
