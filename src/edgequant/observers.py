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
    seen (PTQ, weights); with a float it keeps an exponential moving average, which
    lets QAT ranges follow weights and activations as they train.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        batch_min, batch_max = torch.aminmax(x.detach().to(torch.float32))
        c = self.averaging_constant
        if c is None:
            new_min = torch.minimum(self.min_val, batch_min)
            new_max = torch.maximum(self.max_val, batch_max)
        elif not self.has_range:
            new_min, new_max = batch_min, batch_max
        else:
            new_min = self.min_val + c * (batch_min - self.min_val)
            new_max = self.max_val + c * (batch_max - self.max_val)
        self.min_val.copy_(new_min)
        self.max_val.copy_(new_max)
        return x

    @property
    def has_range(self) -> bool:
        return bool(torch.isfinite(self.min_val) and torch.isfinite(self.max_val))

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.has_range:
            # Nothing observed yet: a unit scale keeps the graph valid until data arrives.
            return torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32)
        if self.symmetric:
            max_abs = torch.maximum(-self.min_val, self.max_val)
            scale = scales.symmetric_scale(max_abs, self.quant_max, self.power_of_2)
            zero_point = torch.zeros((), dtype=torch.int32)
        else:
            scale, zero_point = scales.asymmetric_qparams(
                self.min_val, self.max_val, self.quant_min, self.quant_max
            )
        return scale.reshape(1), zero_point.reshape(1)

    def extra_repr(self) -> str:
        kind = "pow2" if self.power_of_2 else "free"
        return (
            f"dtype={self.dtype}, range=[{self.quant_min}, {self.quant_max}], {kind}, "
            f"min={self.min_val.item():.4g}, max={self.max_val.item():.4g}"
        )


class FakeQuantize(_TorchaoFakeQuantize):
    """torchao's fake-quant with our observer and an explicit frozen state.

    Gradients pass straight through the rounding (inside the range) because the
    underlying op is `torch.fake_quantize_per_tensor_affine`.
    """

    def __init__(self, observer: type[ObserverBase] = RangeObserver, **observer_kwargs: object) -> None:
        super().__init__(observer=observer, **observer_kwargs)
        self.register_buffer("frozen", torch.tensor([0], dtype=torch.uint8))

    def freeze(self) -> None:
        """Stop range updates for good: later `train()` calls won't re-enable them."""
        self.frozen[0] = 1
        self.disable_observer()

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen[0])

    def set_observing(self, enabled: bool) -> None:
        self.enable_observer(enabled and not self.is_frozen)
