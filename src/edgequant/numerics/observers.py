"""Range observers and fake-quantize modules that torchao's prepare inserts.

`RangeObserver` watches a tensor's range (folded in by `ranges.py`, optionally
estimated by `estimators.py`) and turns it into a scale through
`scales.py`; `FakeQuantize` adds the straight-through rounding used in QAT and
the switches that freeze ranges.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torchao.quantization.pt2e.fake_quantize import FakeQuantize as _TorchaoFakeQuantize
from torchao.quantization.pt2e.observer import ObserverBase

from . import distributed, ranges, scales
from .estimators import AbsHistogram, SampleMaxMean, range_estimator
from .moments import ChannelMoments


class RangeObserver(ObserverBase):
    """Min/max observer, per tensor or per channel, with power-of-2 or free scales.

    With `averaging_constant=None` it keeps the running min and max of everything
    seen (PTQ); with a float c it averages the observed min and max (cumulatively
    for the first 1/c updates, then as a moving average), which lets QAT ranges
    follow weights and activations as they train. c=1 tracks the latest tensor.
    `channel_axis` selects one range per slice along that axis (weights: 0).
    With `sync_across_ranks` set, each batch's extremes are first reduced to the
    min / max over all ranks of torch.distributed (a no-op in a single process), so
    every rank folds in the same global extremes and holds the same range.

    The observer holds the range and its checkpointed state; the pieces it composes
    each do one job: `ranges` folds a batch into the range, an `AbsHistogram`
    (`start_estimator`, then `settle`) estimates a tighter one, `ChannelMoments`
    (`track_channel_stats`) keeps the input statistics bias correction reads.
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
        channel_axis: int | None = None,
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
        self.sync_across_ranks = False
        # torchao reads `ch_axis`; it is passed as `channel_axis` because torchao's
        # prepare drops a `ch_axis` argument for observers not named "PerChannel...".
        self.ch_axis = channel_axis
        if channel_axis is None:
            self.qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        else:
            self.qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("updates", torch.tensor(0, dtype=torch.int64))
        # Host mirror of `updates`, so the averaging weight is a Python number (None: re-read it).
        self._history: int | None = 0
        self.estimator: AbsHistogram | SampleMaxMean | None = None
        self.channel_stats: ChannelMoments | None = None
        # False while a pass only reads the graph (AdaRound collecting layer inputs).
        self.observing = True

    def make_unsigned(self) -> None:
        """Quantize to uint8 [0, 255] (zero point 0): for an int8 symmetric tensor that is never negative."""
        if (self.dtype, self.symmetric, self.ch_axis) != (torch.int8, True, None):
            raise ValueError(f"only int8 symmetric per-tensor ranges have an unsigned form, not {self.extra_repr()}")
        self.dtype, self.quant_min, self.quant_max = torch.uint8, 0, 255

    @property
    def unsigned(self) -> bool:
        return self.quant_min == 0

    def start_estimator(self, estimator: str, percentile: float = 99.99, bins: int = 2048) -> None:
        """Stop moving the range; feed what passes to `estimator` instead (a histogram over [0, max |x| so far])."""
        limit = float(torch.maximum(-self.min_val, self.max_val))
        self.estimator = range_estimator(estimator, limit, percentile, bins)

    def settle(self) -> None:
        """Write the estimator's range into min/max and drop the estimator.

        The range is then the observer's state: state_dict() carries it, and a loaded
        checkpoint quantizes exactly as the calibrated module did.
        """
        if self.estimator is None:
            return
        estimate = self.estimator.max_abs(self.quant_max, self.power_of_2)
        self.estimator = None
        if estimate is not None:
            self.min_val.clamp_(min=-estimate)
            self.max_val.clamp_(max=estimate)

    def track_channel_stats(self, dim: int = 1) -> None:
        """Also average x and x^2 per channel along `dim`: 1 for NCHW, -1 for channels-last data."""
        self.channel_stats = ChannelMoments(dim)

    @property
    def channel_mean(self) -> torch.Tensor | None:
        """Per-channel mean of the observed tensors (with `track_channel_stats`), for bias correction."""
        return None if self.channel_stats is None else self.channel_stats.mean

    @property
    def channel_energy(self) -> torch.Tensor | None:
        """Per-channel mean of x^2: how much a weight error on that input channel costs the output."""
        return None if self.channel_stats is None else self.channel_stats.energy

    def extremes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) of x: scalars, or one per channel along ch_axis."""
        return ranges.batch_extremes(x, self.ch_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.numel() or not self.observing:
            return x
        if self.estimator is not None:
            self.estimator.add(x)
        else:
            self.update(*self.extremes(x))
        if self.channel_stats is not None:
            self.channel_stats.add(x)
        return x

    def update(self, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        """Fold one batch's extremes into the range without host syncs."""
        if self.sync_across_ranks:
            batch_min, batch_max = distributed.reduce_extremes(batch_min, batch_max)
        if self.min_val.shape != batch_min.shape:
            self.min_val = torch.full_like(batch_min, float("inf"))
            self.max_val = torch.full_like(batch_max, float("-inf"))
        weight = None
        if self.averaging_constant is not None and torch.compiler.is_compiling():
            self.updates.add_(1)
            self._history = None  # the eager path re-reads `updates`
            weight = ranges.averaging_weight(self.updates, self.averaging_constant)
        elif self.averaging_constant is not None:
            if self._history is None:
                self._history = int(self.updates)
            self._history += 1
            self.updates.fill_(self._history)
            weight = ranges.averaging_weight(self._history, self.averaging_constant)
        ranges.fold(self.min_val, self.max_val, batch_min, batch_max, weight)

    def set_history(self, updates: int) -> None:
        """Count `updates` earlier batches as folded in (e.g. a calibration carried over)."""
        self.updates.fill_(updates)
        self._history = updates

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Per-channel ranges are sized on first use; take the checkpoint's size.
        for name in ("min_val", "max_val"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._history = int(self.updates)

    @property
    def has_range(self) -> bool:
        return bool(torch.isfinite(self.min_val).all() and torch.isfinite(self.max_val).all())

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the current range (which must have been observed)."""
        if self.symmetric:
            estimate = None if self.estimator is None else self.estimator.max_abs(self.quant_max, self.power_of_2)
            max_abs = torch.maximum(-self.min_val, self.max_val) if estimate is None else estimate
            scale = scales.symmetric_scale(max_abs, self.quant_max, self.power_of_2)
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        else:
            scale, zero_point = scales.asymmetric_qparams(self.min_val, self.max_val, self.quant_min, self.quant_max)
        return scale.reshape(-1), zero_point.reshape(-1)

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.has_range:
            # Nothing observed yet (a branch never run): a unit scale keeps the graph valid.
            shape = self.min_val.shape if self.min_val.dim() else (1,)
            return torch.ones(shape), torch.zeros(shape, dtype=torch.int32)
        return self.qparams()

    def extra_repr(self) -> str:
        kind = "pow2" if self.power_of_2 else "free"
        axis = "per-tensor" if self.ch_axis is None else f"per-channel (axis {self.ch_axis})"
        return f"dtype={self.dtype}, range=[{self.quant_min}, {self.quant_max}], {kind}, {axis}"


@contextlib.contextmanager
def paused(module: torch.nn.Module) -> Iterator[None]:
    """Run `module` without any of its RangeObservers updating ranges or statistics."""
    observers = [m for m in module.modules() if isinstance(m, RangeObserver)]
    for obs in observers:
        obs.observing = False
    try:
        yield
    finally:
        for obs in observers:
            obs.observing = True


class _FakeQuant(torch.autograd.Function):
    """Round-to-grid with a straight-through gradient, built from plain tensor ops.

    torch's fused fake-quant kernels are several times slower on CPU than these
    few vectorised ops. `scale` broadcasts against x (per tensor or per channel).
    With `clip_mask` the gradient is zeroed where x was clipped; without it (weights
    re-ranged on the tensor itself, so never clipped) the backward is the identity.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, clip_mask, power_of_2):
        q = scales.to_grid(x, scale, power_of_2)
        if zero_point is not None:
            q += zero_point
        ctx.clip_mask = clip_mask
        if clip_mask:
            # Clamping into a new tensor gives the mask in one comparison pass.
            clamped = q.clamp(quant_min, quant_max)
            ctx.save_for_backward(clamped == q)
            q = clamped
        # Without a mask the range was measured on x itself: |q| <= quant_max already.
        if zero_point is not None:
            q -= zero_point
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        if ctx.clip_mask:
            (mask,) = ctx.saved_tensors
            # One pass; grad * mask would first convert the mask to float.
            grad = torch.where(mask, grad, 0.0)
        return grad, None, None, None, None, None, None


def _scaled_abs_max(w: torch.Tensor, factor: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """max |w * factor| (factor per output channel), per channel or overall, without forming w * factor."""
    # max |w| per row from amax / amin: two fast reductions, no |w| copy (vector_norm is slower)
    rows = w.detach().reshape(w.shape[0], -1)
    m = torch.maximum(rows.amax(dim=1), -rows.amin(dim=1)) * factor.abs()
    return m if per_channel else m.max()


class FakeQuantize(_TorchaoFakeQuantize):
    """torchao's fake-quant with our observer and an explicit frozen state.

    Gradients pass straight through the rounding (inside the range) because the
    underlying op is `torch.fake_quantize_per_tensor_affine`.
    """

    def __init__(self, observer: type[ObserverBase] = RangeObserver, **observer_kwargs: object) -> None:
        super().__init__(observer=observer, **observer_kwargs)
        self.register_buffer("frozen", torch.tensor([0], dtype=torch.uint8))
        # Host copy of (observer_enabled, fake_quant_enabled): reading the buffers every
        # step would cost a device sync per quantizer on GPU, and would break a
        # torch.compile graph at each quantizer. Re-read at once after any change.
        self._flags = self._read_flags()

    def _read_flags(self) -> tuple[bool, bool]:
        return bool(self.observer_enabled[0]), bool(self.fake_quant_enabled[0])

    def enable_observer(self, enabled: bool = True) -> None:
        super().enable_observer(enabled)
        self._flags = self._read_flags()

    def enable_fake_quant(self, enabled: bool = True) -> None:
        super().enable_fake_quant(enabled)
        self._flags = self._read_flags()

    def make_unsigned(self) -> None:
        """Quantize to uint8 [0, 255]: see `RangeObserver.make_unsigned`."""
        obs = self.activation_post_process
        obs.make_unsigned()
        self.dtype, self.quant_min, self.quant_max = obs.dtype, obs.quant_min, obs.quant_max

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._flags = self._read_flags()

    def forward(self, x: torch.Tensor, bn_factor: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantize x, or with `bn_factor` s, return Q(x * s) / s for folded conv+BN weights.

        Q(x * s) / s is computed as x on the per-channel grid q / |s|, which avoids
        materialising x * s (round-half-even is symmetric, so the sign of s drops out).
        """
        obs = self.activation_post_process
        observing, fake_quant = self._flags
        if observing:
            if bn_factor is None:
                obs(x)
            else:
                m = _scaled_abs_max(x, bn_factor, obs.ch_axis is not None)
                obs.update(-m, m)
            scale, zero_point = obs.qparams()
            if self.scale.shape != scale.shape:
                self.scale.resize_(scale.shape)
                self.zero_point.resize_(zero_point.shape).zero_()
            self.scale.copy_(scale)
            if not obs.symmetric:  # symmetric zero points stay 0
                self.zero_point.copy_(zero_point)
        if not fake_quant:
            return x
        scale, zero_point = self.scale, None if obs.symmetric else self.zero_point
        if bn_factor is not None:
            scale = scale / torch.clamp(bn_factor.abs(), min=1e-30)
        if scale.numel() > 1 or bn_factor is not None:
            shape = [1] * x.dim()
            shape[obs.ch_axis or 0] = -1
            scale = scale.reshape(shape)
            zero_point = None if zero_point is None else zero_point.reshape(shape)
        # Weights re-ranged on this very tensor are never clipped: no clip mask needed.
        clip_mask = not (observing and obs.averaging_constant == 1.0 and obs.symmetric)
        return _FakeQuant.apply(x, scale, zero_point, obs.quant_min, obs.quant_max, clip_mask, obs.power_of_2)

    def freeze(self) -> None:
        """Stop range updates for good: later `train()` calls won't re-enable them."""
        self.frozen[0] = 1
        self.disable_observer()

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen[0])

    def set_observing(self, enabled: bool) -> None:
        self.enable_observer(enabled and not self.is_frozen)
