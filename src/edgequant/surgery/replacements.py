"""What `eq.adapt` replaces: one `Replacement` per kind, with what it matches and what it builds.

Exact replacements compute the same function (to float rounding): the adapted model
needs no training. Approximate ones change the function and need fine-tuning
(`finetune_adapted`). Each names the TIDL rules (export/tidl_check.py) that call for it:
a device wants a replacement when one of those rules is checked on it, so the device
table lives in one place.

A builder takes a module and the tensor it received in the example pass (None when the
example pass did not call it) and returns the new module, a sentence saying why this
candidate is kept as it is, or None when the module is no candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..export.tidl_check import DEPTHWISE_KERNELS, POOL_KERNELS, POOL_STRIDES

Builder = Callable[[nn.Module, torch.Tensor | None], nn.Module | str | None]


@dataclass(frozen=True)
class Replacement:
    """One kind of change `adapt` can make."""

    name: str
    exact: bool
    rules: tuple[str, ...]  # ids of export.tidl_check.RULES that call for it
    what: str  # one line, for the docs and the report
    build: Builder
    note: str = ""  # said of every change it makes


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def _to_relu(classes: tuple[type, ...], names: tuple[str, ...]) -> Builder:
    """ReLU in place of an activation given by torch class or, for timm's own classes, by class name."""

    def build(module: nn.Module, x: torch.Tensor | None) -> nn.Module | None:
        if isinstance(module, classes) or type(module).__name__ in names:
            # Not in place: an in-place op after it (dropout) would break ReLU's backward.
            return nn.ReLU()
        return None

    return build


# Class names of squeeze-excitation blocks (torchvision, timm): x -> x * gate(x).
SQUEEZE_EXCITATION = ("SqueezeExcitation", "SqueezeExcite", "SEModule", "EffectiveSEModule", "SEBlock", "SELayer")


def _squeeze_excitation(module: nn.Module, x: torch.Tensor | None) -> nn.Module | None:
    return nn.Identity() if type(module).__name__ in SQUEEZE_EXCITATION else None


class LastAxisBatchNorm(nn.BatchNorm2d):
    """Batch norm over the last axis of a channels-last (N, H, W, C) tensor: what replaces a layer norm there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _layer_norm(module: nn.Module, x: torch.Tensor | None) -> nn.Module | str | None:
    """Batch norm in place of a layer norm over the channels of a feature map, from the example's statistics."""
    if not isinstance(module, nn.LayerNorm):
        return None
    shape = module.normalized_shape
    if x is None or x.dim() != 4 or len(shape) != 1:
        return "kept: only a layer norm over the channels of a 4-D feature map has a batch-norm equivalent"
    channels = shape[0]
    if type(module).__name__ == "LayerNorm2d" and x.shape[1] == channels:
        bn, dims = nn.BatchNorm2d(channels, eps=module.eps), (0, 2, 3)
    elif x.shape[-1] == channels:
        bn, dims = LastAxisBatchNorm(channels, eps=module.eps), (0, 1, 2)
    else:
        return "kept: it does not normalize over the channels"
    bn = bn.to(x.device)
    with torch.no_grad():
        if module.weight is not None:
            bn.weight.copy_(module.weight)
        if module.bias is not None:
            bn.bias.copy_(module.bias)
        bn.running_mean.copy_(x.mean(dims))
        bn.running_var.copy_(x.var(dims, unbiased=False))
    return bn


def _max_pool(module: nn.Module, x: torch.Tensor | None) -> nn.Module | str | None:
    """A cascade of 3x3 stride-1 max-pools, then one 3x3 with the original stride: the same window maxima."""
    if not isinstance(module, nn.MaxPool2d):
        return None
    (k, kw), (s, sw), (p, pw) = (
        _pair(module.kernel_size),
        _pair(module.stride or module.kernel_size),
        _pair(module.padding),
    )
    if {k, kw} <= POOL_KERNELS and {s, sw} <= POOL_STRIDES:
        return None
    r = (k - 3) // 2  # each 3x3 stride-1 pool widens the window by one pixel per side
    if (k, s, p) != (kw, sw, pw) or k < 5 or k % 2 == 0 or _pair(module.dilation) != (1, 1):
        return "kept: only square, odd max-pools of kernel 5 or more without dilation become a cascade"
    if module.ceil_mode or module.return_indices or s not in POOL_STRIDES or not r <= p <= r + 1:
        return f"kept: ceil_mode, return_indices, stride {s} or padding {p} has no exact cascade"
    return nn.Sequential(*[nn.MaxPool2d(3, 1, 1) for _ in range(r)], nn.MaxPool2d(3, s, p - r))


def _upsample(module: nn.Module, x: torch.Tensor | None) -> nn.Module | str | None:
    """Upsample by the scale the example shows in place of a fixed output size."""
    if not isinstance(module, nn.Upsample) or module.size is None:
        return None
    if x is None:
        return "kept: not called in the example pass, so its input size is unknown"
    inputs = tuple(x.shape[2:])
    size = (module.size,) * len(inputs) if isinstance(module.size, int) else tuple(module.size)
    if any(o % i for o, i in zip(size, inputs, strict=True)):
        return f"kept: size {size} is not a whole multiple of the input's {inputs}"
    scale = tuple(float(o // i) for o, i in zip(size, inputs, strict=True))
    return nn.Upsample(scale_factor=scale, mode=module.mode, align_corners=module.align_corners)


def _plain_conv(module: nn.Module) -> bool:
    """A torch Conv2d (not a subclass with its own forward) with numeric zero padding."""
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _conv_like(
    conv: nn.Conv2d, weight: torch.Tensor, stride: int | tuple[int, int], padding: tuple[int, int], groups: int
) -> nn.Conv2d:
    """A Conv2d like `conv`, with the given weight, stride, padding and groups (bias copied)."""
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        tuple(weight.shape[2:]),
        stride=stride,
        padding=padding,
        dilation=conv.dilation,
        groups=groups,
        bias=conv.bias is not None,
    ).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _strided(module: nn.Module, x: torch.Tensor | None) -> nn.Module | None:
    """Stride 4 (kernel not 11x11) or a kernel over 7 with stride 2: a smaller stride, then 1x1 subsampling."""
    if not _plain_conv(module) or len(set(module.stride)) > 1:
        return None
    stride, kernel = module.stride[0], module.kernel_size
    if max(kernel) > 7 and stride == 2:
        inner = 1
    elif stride == 4 and tuple(kernel) != (11, 11):
        inner = 2
    else:
        return None
    # A stride-`inner` conv computes every window the original does (and more); the
    # pool of kernel 1 keeps every (stride // inner)-th one: the original output.
    conv = _conv_like(module, module.weight, inner, module.padding, module.groups)
    return nn.Sequential(conv, nn.MaxPool2d(1, stride // inner))


def _even_kernel(module: nn.Module, x: torch.Tensor | None) -> nn.Module | str | None:
    """An odd kernel with a leading row / column of zeros and one more pixel of padding before."""
    if not _plain_conv(module) or all(k % 2 for k in module.kernel_size):
        return None
    if x is None or _pair(module.dilation) != (1, 1):
        return "kept: dilated, or not called in the example pass (its input size is needed)"
    grow = [k % 2 == 0 for k in module.kernel_size]
    weight = F.pad(module.weight, (int(grow[1]), 0, int(grow[0]), 0))
    pads, symmetric = [], True
    for n, k, s, p, g in zip(x.shape[-2:], module.kernel_size, module.stride, module.padding, grow, strict=True):
        pads.append((p + 1, p) if g else (p, p))
        # Symmetric padding p + 1 adds an output exactly when (n + 2p - k) % s == s - 1.
        symmetric &= not g or (n + 2 * p - k + 1) // s == (n + 2 * p - k) // s
    if symmetric:
        return _conv_like(module, weight, module.stride, tuple(a for a, _ in pads), module.groups)
    (top, bottom), (left, right) = pads
    conv = _conv_like(module, weight, module.stride, (0, 0), module.groups)
    return nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), conv)


def _depthwise(module: nn.Module, x: torch.Tensor | None) -> nn.Module | str | None:
    """A depthwise kernel TIDL lacks as a grouped conv of two channels per group, the cross weights zero."""
    if not _plain_conv(module) or module.groups == 1 or module.weight.shape[1] != 1 or len(set(module.stride)) > 1:
        return None
    if (*module.kernel_size, module.stride[0]) in DEPTHWISE_KERNELS:
        return None
    channels = module.in_channels
    if channels % 2:
        return f"kept: {channels} channels, an odd number, cannot be paired into groups of two"
    multiplier = module.out_channels // channels
    weight = module.weight.new_zeros(module.out_channels, 2, *module.kernel_size)
    out = torch.arange(module.out_channels, device=weight.device)
    with torch.no_grad():
        weight[out, (out // multiplier) % 2] = module.weight[:, 0]
    return _conv_like(module, weight, module.stride, module.padding, channels // 2)


def _crop(module: nn.Module, x: torch.Tensor | None) -> nn.Module | str | None:
    """On a map narrower than the padding, the kernel taps that only ever see padding are dropped."""
    if not _plain_conv(module) or x is None:
        return None
    sizes = tuple(x.shape[-2:])
    if all(n >= p for n, p in zip(sizes, module.padding, strict=True)):
        return None
    if module.stride != (1, 1):
        return "kept: the map is narrower than the padding, and only stride-1 kernels are cropped"
    spans, pads = [], []
    for n, k, p, d in zip(sizes, module.kernel_size, module.padding, module.dilation, strict=True):
        out = n + 2 * p - d * (k - 1)
        # Tap j reads input i - p + j * d for outputs i in [0, out): it meets the map for some i
        # exactly when (p - out + 1) / d <= j <= (n - 1 + p) / d.
        first, last = max(0, -((out - 1 - p) // d)), min(k - 1, (n - 1 + p) // d)
        left = p - first * d
        if left != out - n + d * (last - first) - left:
            return "kept: cropping would need uneven padding"
        spans.append(slice(first, last + 1))
        pads.append(left)
    weight = module.weight[:, :, spans[0], spans[1]]
    new = _conv_like(module, weight, 1, tuple(pads), module.groups)
    if weight.shape[-2:] == (1, 1):
        new.dilation = (1, 1)  # one tap: dilation means nothing
    return new


_ACTIVATIONS = (
    ("silu", (nn.SiLU,), ("Swish", "SiLU"), ("lite-activation", "lut-activation")),
    ("hardswish", (nn.Hardswish,), ("HardSwish",), ("lite-activation",)),
    ("hardsigmoid", (nn.Hardsigmoid,), ("HardSigmoid",), ("lite-activation", "lut-activation")),
    ("gelu", (nn.GELU,), ("GELU", "GELUTanh", "QuickGELU"), ("lite-activation", "lut-activation")),
    ("mish", (nn.Mish,), ("Mish", "HardMish"), ("lite-activation",)),
    ("leaky_relu", (nn.LeakyReLU,), (), ("lite-activation",)),
    ("relu6", (nn.ReLU6,), (), ("lite-activation",)),
)
SIZE_NOTE = "exact at the example input size; at another size, adapt again"

# In the order they are tried on a module; `adapt` repeats its passes until none applies,
# so a conv can take several (stride, then even kernel, then depthwise).
REPLACEMENTS: tuple[Replacement, ...] = (
    Replacement(
        "strided-conv",
        True,
        ("conv-stride4", "conv-large-kernel-stride2"),
        "stride 4 (or a kernel over 7 at stride 2) -> a smaller stride and a 1x1 subsampling pool",
        _strided,
    ),
    Replacement(
        "even-kernel", True, ("conv-even-kernel",), "even kernel -> odd kernel with a zero row / column", _even_kernel
    ),
    Replacement(
        "kernel-crop",
        True,
        ("conv-input-narrower-than-pad",),
        "padding wider than the map -> the kernel taps that meet the map",
        _crop,
        SIZE_NOTE,
    ),
    Replacement(
        "depthwise-kernel",
        True,
        ("conv-depthwise-kernel",),
        "depthwise kernel TIDL lacks -> grouped conv of two channels per group (twice the MACs)",
        _depthwise,
    ),
    Replacement("max-pool", True, ("pool-kernel",), "max-pool of kernel 5 or more -> cascade of 3x3 pools", _max_pool),
    Replacement(
        "upsample-size", True, ("resize-scales",), "upsample to a size -> upsample by a scale", _upsample, SIZE_NOTE
    ),
    *(
        Replacement(name, False, rules, f"{classes[0].__name__} -> ReLU", _to_relu(classes, names))
        for name, classes, names, rules in _ACTIVATIONS
    ),
    Replacement(
        "squeeze-excitation",
        False,
        ("squeeze-excitation",),
        "squeeze-excitation block -> identity",
        _squeeze_excitation,
    ),
    Replacement(
        "layer-norm", False, ("layer-norm",), "layer norm over channels -> batch norm (example statistics)", _layer_norm
    ),
)
BY_NAME: dict[str, Replacement] = {r.name: r for r in REPLACEMENTS}
