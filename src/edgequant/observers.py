"""Range observers and fake-quantize modules that torchao's prepare inserts.

`RangeObserver` watches a tensor's range and turns it into a scale through
`scales.py`; `FakeQuantize` adds the straight-through rounding used in QAT and
the switches that freeze ranges.
"""

from __future__ import annotations

import torch
from torchao.quantization.pt2e.fake_quantize import FakeQuantize as _TorchaoFakeQuantize
from torchao.quantization.pt2e.observer import ObserverBase

from . import scales


class RangeObserver(ObserverBase):
    """Per-tensor min/max observer with symmetric power-of-2 or free scales.

    With `averaging_constant=None` it keeps the running min and max of everything
    seen (PTQ); with a float c it averages the observed min and max (cumulatively
    for the first 1/c updates, then as a moving average), which lets QAT ranges
    follow weights and activations as they train. c=1 tracks the latest tensor.
    """

    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(
        self,
        dtype: torch.dtype = torch.int8,
        quant_min: int | None = None,
        quant_max: int | None = None,
        power_of_2: bool = True,
        symmetric: bool = True,
        averaging_constant: float | None = None,
        is_dynamic: bool = False,
        **_: object,
    ) -> None:
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        info = torch.iinfo(dtype)
        self.quant_min = info.min if quant_min is None else quant_min
        self.quant_max = info.max if quant_max is None else quant_max
        self.power_of_2 = power_of_2
        self.symmetric = symmetric
        self.averaging_constant = averaging_constant
        self.qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("updates", torch.tensor(0, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Runs every training step for every quantizer: tensor ops only, no host syncs.
        if x.numel() == 0:
            return x
        batch_min, batch_max = torch.aminmax(x.detach().to(torch.float32))
        c = self.averaging_constant
        if c is None:
            torch.minimum(self.min_val, batch_min, out=self.min_val)
            torch.maximum(self.max_val, batch_max, out=self.max_val)
        else:
            # A plain running mean for the first 1/c updates, then the moving average:
            # ranges settle within a few steps instead of drifting from their first value.
            self.updates += 1
            weight = torch.clamp(1.0 / self.updates, min=c)
            self.min_val.copy_(torch.where(self.updates > 1, torch.lerp(self.min_val, batch_min, weight), batch_min))
            self.max_val.copy_(torch.where(self.updates > 1, torch.lerp(self.max_val, batch_max, weight), batch_max))
        return x

    @property
    def has_range(self) -> bool:
        return bool(torch.isfinite(self.min_val) and torch.isfinite(self.max_val))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the current range (which must have been observed)."""
        if self.symmetric:
            max_abs = torch.maximum(-self.min_val, self.max_val)
            scale = scales.symmetric_scale(max_abs, self.quant_max, self.power_of_2)
            zero_point = torch.zeros((), dtype=torch.int32)
        else:
            scale, zero_point = scales.asymmetric_qparams(
                self.min_val, self.max_val, self.quant_min, self.quant_max
            )
        return scale.reshape(1), zero_point.reshape(1)

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.has_range:
            # Nothing observed yet (a branch never run): a unit scale keeps the graph valid.
            return torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32)
        return self.qparams()

    def extra_repr(self) -> str:
        kind = "pow2" if self.power_of_2 else "free"
        return (
            f"dtype={self.dtype}, range=[{self.quant_min}, {self.quant_max}], {kind}, "
            f"min={self.min_val.item():.4g}, max={self.max_val.item():.4g}"
        )


class _FakeQuant(torch.autograd.Function):
    """Round-to-grid with a straight-through gradient, built from plain tensor ops.

    torch's fused fake-quant kernels are several times slower on CPU than these
    few vectorised ops. `scale` broadcasts against x (per tensor or per channel).
    With `clip_mask` the gradient is zeroed where x was clipped; without it (weights
    re-ranged on the tensor itself, so never clipped) the backward is the identity.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, clip_mask):
        q = torch.round(x / scale)
        if zero_point is not None:
            q += zero_point
        ctx.clip_mask = clip_mask
        if clip_mask:
            ctx.save_for_backward((q >= quant_min) & (q <= quant_max))
        q.clamp_(quant_min, quant_max)
        if zero_point is not None:
            q -= zero_point
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        if ctx.clip_mask:
            (mask,) = ctx.saved_tensors
            grad = grad * mask
        return grad, None, None, None, None, None


def _scaled_abs_max(w: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """[-m, m] with m = max |w * factor| (factor per output channel), without forming w * factor."""
    m = (w.reshape(w.shape[0], -1).abs().amax(dim=1) * factor.abs()).max()
    return torch.stack([-m, m])


class FakeQuantize(_TorchaoFakeQuantize):
    """torchao's fake-quant with our observer and an explicit frozen state.

    Gradients pass straight through the rounding (inside the range) because the
    underlying op is `torch.fake_quantize_per_tensor_affine`.
    """

    def __init__(self, observer: type[ObserverBase] = RangeObserver, **observer_kwargs: object) -> None:
        super().__init__(observer=observer, **observer_kwargs)
        self.register_buffer("frozen", torch.tensor([0], dtype=torch.uint8))

    def forward(self, x: torch.Tensor, bn_factor: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantize x, or with `bn_factor` s, return Q(x * s) / s for folded conv+BN weights.

        Q(x * s) / s is computed as x on the per-channel grid q / |s|, which avoids
        materialising x * s (round-half-even is symmetric, so the sign of s drops out).
        """
        obs = self.activation_post_process
        observing = bool(self.observer_enabled.item())
        if observing:
            obs(x.detach() if bn_factor is None else _scaled_abs_max(x.detach(), bn_factor))
            scale, zero_point = obs.qparams()
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        if not self.fake_quant_enabled.item():
            return x
        scale = self.scale
        if bn_factor is not None:
            shape = [-1] + [1] * (x.dim() - 1)
            scale = (scale / torch.clamp(bn_factor.abs(), min=1e-30)).reshape(shape)
        zero_point = None if obs.symmetric else self.zero_point
        # Weights re-ranged on this very tensor are never clipped: no clip mask needed.
        clip_mask = not (observing and obs.averaging_constant == 1.0 and obs.symmetric)
        return _FakeQuant.apply(x, scale, zero_point, obs.quant_min, obs.quant_max, clip_mask)

    def freeze(self) -> None:
        """Stop range updates for good: later `train()` calls won't re-enable them."""
        self.frozen[0] = 1
        self.disable_observer()

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen[0])

    def set_observing(self, enabled: bool) -> None:
        self.enable_observer(enabled and not self.is_frozen)
