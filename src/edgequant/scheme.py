"""Quantization schemes: a plain dataclass and the named presets targets run."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .scales import qrange


@dataclass(frozen=True)
class Scheme:
    """How weights and activations are quantized.

    A scheme is data only; `QATModule` (and the quantizer it builds) applies it.
    Use a preset by name, or `dataclasses.replace(eq.get_scheme("int8_pow2"), ...)`
    to derive a variant.
    """

    name: str = "custom"
    weight_bits: int = 8
    activation_bits: int = 8
    power_of_2: bool = True
    per_channel_weights: bool = False
    symmetric_activations: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        for field_name in ("weight_bits", "activation_bits"):
            bits = getattr(self, field_name)
            if bits not in (8, 16):
                raise ValueError(f"Scheme.{field_name} must be 8 or 16, got {bits}")
        if self.power_of_2 and not self.symmetric_activations:
            raise ValueError(
                "power-of-2 schemes are symmetric: engines that shift instead of "
                "multiply have no zero point; set symmetric_activations=True"
            )

    @property
    def weight_range(self) -> tuple[int, int]:
        return qrange(self.weight_bits)

    @property
    def activation_range(self) -> tuple[int, int]:
        return qrange(self.activation_bits)

    def with_name(self, name: str) -> Scheme:
        return replace(self, name=name)


PRESETS: dict[str, Scheme] = {
    "int8_pow2": Scheme(
        name="int8_pow2",
        weight_bits=8,
        activation_bits=8,
        power_of_2=True,
        per_channel_weights=False,
        symmetric_activations=True,
        description=(
            "int8 weights and activations, symmetric, per-tensor, power-of-2 scales "
            "(legacy devices such as TDA4VM)"
        ),
    ),
}


def get_scheme(scheme: str | Scheme) -> Scheme:
    """Resolve a preset name (or pass a Scheme through), listing valid names on error."""
    if isinstance(scheme, Scheme):
        return scheme
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a preset name or an eq.Scheme, got {type(scheme).__name__}")
    try:
        return PRESETS[scheme]
    except KeyError:
        valid = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown scheme {scheme!r}; valid presets: {valid}") from None
