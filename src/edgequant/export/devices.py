"""The TIDL devices we deploy to: what each runs, in one table.

Sources (TexasInstruments/edgeai-tidl-tools unless noted):
- [fsg]   docs/tidl_fsg_quantization.md: pre-quantized ONNX is 8-bit only; symmetric on every
          device, asymmetric on all but TDA4VM (AM68PA); mixed precision by layer name lists.
- [ops]   docs/supported_ops_rts_versions.md: op rules; the device feature table (asymmetric
          per-channel: not AM68PA = TDA4VM; LUT-accelerated activations: not AM62A).
- [osrt]  examples/osrt_python/README.md: quantization_scale_type 0 / 1 (power of 2) / 4
          (asymmetric, per-channel); advanced_options:channel_wise_quantization.
- [bench] TexasInstruments/edgeai-tensorlab edgeai-benchmark/edgeai_benchmark/core/presets.py:
          TDA4VM compiles with scale type 1, AM62A / AM67A / AM68A / AM69A with 4.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import UsageError
from ..numerics.scheme import Scheme, get_scheme

SCALE_TYPE_POW2 = 1  # [osrt] power-of-2 scales
SCALE_TYPE_ASYM_PER_CHANNEL = 4  # [osrt] asymmetric, per-channel; [bench] the AM6xA preset


@dataclass(frozen=True)
class Device:
    """A TIDL device: the schemes it runs and the options its compiler wants."""

    name: str
    soc: str  # the SoC family name TI's docs also use
    power_of_2_only: bool  # only power-of-2 scales (TIDL's scale type 1), hence symmetric only
    lut_activations: bool  # Sigmoid, Tanh, GELU, ... accelerated by look-up tables [ops]
    default_scheme: str  # what PTQModule / QATModule use when given the device and no scheme

    def scale_type(self, scheme: Scheme) -> int:
        """advanced_options:quantization_scale_type for `scheme` on this device."""
        return SCALE_TYPE_POW2 if scheme.power_of_2 else SCALE_TYPE_ASYM_PER_CHANNEL

    def refusal(self, scheme: Scheme) -> str | None:
        """Why this device cannot run `scheme` (with the scheme to use instead), or None."""
        if self.power_of_2_only and not scheme.power_of_2:  # power-of-2 schemes are symmetric (Scheme checks)
            return (
                f"{self.name} runs power-of-2, symmetric scales only; scheme {scheme.name!r} has free scales: "
                f"use {self.default_scheme!r} (or int8_pow2_dw, int16_pow2)"
            )
        return None

    def check(self, scheme: Scheme) -> None:
        """Raise UsageError if this device cannot run `scheme`."""
        reason = self.refusal(scheme)
        if reason is not None:
            raise UsageError(reason)


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        # [fsg] symmetric only on TDA4VM; [bench] scale type 1; [ops] AM68PA column (= TDA4VM).
        # Per-channel power-of-2 weights (int8_pow2_dw): [osrt] channel_wise_quantization.
        Device("TDA4VM", "J721E (AM68PA)", True, True, "int8_pow2"),
        # [ops] no LUT activations; 3x3 stride 3 conv, padding wider than the input and 16-bit
        # ConvTranspose unsupported (the checker's device rules).
        # [fsg], [ops]: per-channel and asymmetric allowed; [bench] scale type 4.
        Device("AM62A", "AM62A", False, False, "int8"),
        Device("AM67A", "J722S (AM67A)", False, True, "int8"),
        Device("AM68A", "J721S2 (AM68A)", False, True, "int8"),
        Device("AM69A", "J784S4 (AM69A)", False, True, "int8"),
    )
}


def get_device(device: str | Device) -> Device:
    """Resolve a device name (case-insensitive) or pass a Device through, listing valid names on error."""
    if isinstance(device, Device):
        return device
    if not isinstance(device, str):
        raise UsageError(f"device must be a name such as 'TDA4VM', got {type(device).__name__}")
    found = DEVICES.get(device.upper())
    if found is None:
        raise UsageError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)}")
    return found


def device_for(scheme: Scheme) -> Device:
    """The device an export targets when none is named: TDA4VM for power-of-2 schemes, else AM68A."""
    return DEVICES["TDA4VM" if scheme.power_of_2 else "AM68A"]


def target_scheme(scheme: str | Scheme | None, device: str | Device | None) -> tuple[Scheme, Device | None]:
    """The scheme a wrapper uses (the device's default when none is given) and the device, checked together."""
    target = None if device is None else get_device(device)
    if scheme is None:
        scheme = target.default_scheme if target is not None else "int8_pow2"
    resolved = get_scheme(scheme)
    if target is not None:
        target.check(resolved)
    return resolved, target
