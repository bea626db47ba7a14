"""Quantization schemes: a plain dataclass and the named presets targets run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from ..core.errors import UsageError
from ..core.records import VERSION_KEY, record, record_fields
from .scales import qrange

Granularity = Literal["per_tensor", "per_channel", "depthwise_per_channel"]
# Which layers run in 16 bit: module names, "first_last", or a predicate on the module name.
HighPrecision = tuple[str, ...] | Literal["first_last"] | Callable[[str], bool] | None
GRANULARITIES = ("per_tensor", "per_channel", "depthwise_per_channel")
# How to_dict() records a callable `high_precision`: by name, which from_dict() cannot call.
CALLABLE_MARK = "<callable "


@dataclass(frozen=True)
class Scheme:
    """How weights and activations are quantized.

    A scheme is data only; the wrappers (and the quantizer they build) apply it.
    Use a preset by name, or derive one:
    ``eq.get_scheme("int8_pow2").with_high_precision(["features.0", "classifier"])``.

    - ``weight_granularity``: one scale per weight tensor, one per output channel, or
      per channel for depthwise convs only (where per-tensor scales collapse).
    - ``symmetric_activations``: zero point 0 (required with power-of-2 scales), or an
      asymmetric range with a zero point.
    - ``unsigned_activations``: an 8-bit symmetric activation that can never be negative
      (after a ReLU, a max-pool of one, a sum of such) uses the unsigned grid [0, 255]
      instead of [-127, 127]: half the step for the same range, as TIDL's own
      calibration does. Off: every activation is int8.
    - ``high_precision``: layers that run with 16-bit weights and outputs while the
      rest use ``weight_bits`` / ``activation_bits``: module names (a name covers its
      submodules), ``"first_last"`` (the first conv and the last layer), or a
      callable taking a module name.

    ``to_dict()`` / ``from_dict()`` turn a scheme into versioned plain data and back
    (checkpoints record it so); a callable ``high_precision`` is recorded by name only.
    """

    # 2: `unsigned_activations` (version 1 schemes quantized every activation as int8).
    VERSION: ClassVar[int] = 2
    # Fields that name a scheme without changing what it computes.
    LABELS: ClassVar[tuple[str, ...]] = ("name", "description")

    name: str = "custom"
    weight_bits: int = 8
    activation_bits: int = 8
    power_of_2: bool = True
    weight_granularity: Granularity = "per_tensor"
    symmetric_activations: bool = True
    unsigned_activations: bool = True
    high_precision: HighPrecision = None
    description: str = ""

    def __post_init__(self) -> None:
        for field_name in ("power_of_2", "symmetric_activations", "unsigned_activations"):
            value = getattr(self, field_name)
            if not isinstance(value, bool):
                raise UsageError(f"Scheme.{field_name} must be True or False, got {value!r}")
        for field_name in ("weight_bits", "activation_bits"):
            bits = getattr(self, field_name)
            if bits not in (8, 16):
                raise UsageError(f"Scheme.{field_name} must be 8 or 16, got {bits}")
        if self.weight_granularity not in GRANULARITIES:
            raise UsageError(
                f"Scheme.weight_granularity must be one of {GRANULARITIES}, got {self.weight_granularity!r}"
            )
        if self.power_of_2 and not self.symmetric_activations:
            raise UsageError(
                "power-of-2 schemes are symmetric: engines that shift instead of "
                "multiply have no zero point; set symmetric_activations=True"
            )
        hp = self.high_precision
        if isinstance(hp, str) and hp != "first_last":
            raise UsageError(f"high_precision must be a list of module names, 'first_last' or a callable, got {hp!r}")
        if isinstance(hp, Sequence) and not isinstance(hp, str):
            object.__setattr__(self, "high_precision", tuple(hp))

    @property
    def weight_range(self) -> tuple[int, int]:
        return qrange(self.weight_bits)

    @property
    def activation_range(self) -> tuple[int, int]:
        return qrange(self.activation_bits)

    @property
    def is_mixed(self) -> bool:
        return self.high_precision is not None and (self.weight_bits, self.activation_bits) != (16, 16)

    def to_dict(self) -> dict[str, Any]:
        """The scheme as versioned plain data (lists, not tuples), for JSON files and checkpoints."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        hp = self.high_precision
        if isinstance(hp, tuple):
            fields["high_precision"] = list(hp)
        elif callable(hp):
            fields["high_precision"] = f"{CALLABLE_MARK}{getattr(hp, '__qualname__', type(hp).__name__)}>"
        return record(self.VERSION, fields)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scheme:
        """The scheme `to_dict()` recorded; a newer version or an unknown field is refused, not guessed at."""
        fields = cls.record_fields(data)
        hp = fields.get("high_precision")
        if isinstance(hp, str) and hp.startswith(CALLABLE_MARK):
            raise UsageError(
                f"this scheme's high_precision was a callable ({hp}), which data cannot hold; build the Scheme in code"
            )
        return cls(**fields)

    @classmethod
    def record_fields(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """The fields of a recorded scheme, an older version's read as what it computed."""
        fields = record_fields(data, cls, cls.VERSION)
        if data[VERSION_KEY] < 2:
            fields.setdefault("unsigned_activations", False)
        return fields

    def with_high_precision(self, layers: HighPrecision) -> Scheme:
        """This scheme with chosen layers in 16 bit."""
        name = self.name if layers is None else f"{self.name}+16bit"
        return replace(self, name=name, high_precision=layers)


def _preset(name: str, description: str, **fields: object) -> Scheme:
    return Scheme(name=name, description=description, **fields)


PRESETS: dict[str, Scheme] = {
    s.name: s
    for s in (
        _preset(
            "int8_pow2",
            "int8 weights and activations, symmetric, per-tensor, power-of-2 scales (legacy devices such as TDA4VM)",
        ),
        _preset(
            "int8",
            "int8; weights symmetric per output channel, activations symmetric per-tensor; "
            "free (float) scales (newer devices: AM62A, AM68A, AM69A, TDA4VH)",
            power_of_2=False,
            weight_granularity="per_channel",
        ),
        _preset(
            "int8_pow2_dw",
            "int8_pow2, except that depthwise conv weights get one power-of-2 scale per "
            "channel (depthwise layers are where per-tensor scales collapse)",
            weight_granularity="depthwise_per_channel",
        ),
        _preset(
            "int16",
            "int16 weights (per channel) and activations (per tensor), symmetric, free scales",
            weight_bits=16,
            activation_bits=16,
            power_of_2=False,
            weight_granularity="per_channel",
        ),
        _preset(
            "int16_pow2",
            "int16 weights and activations, symmetric, per-tensor, power-of-2 scales",
            weight_bits=16,
            activation_bits=16,
        ),
    )
}


def get_scheme(scheme: str | Scheme) -> Scheme:
    """Resolve a preset name (or pass a Scheme through), listing valid names on error."""
    if isinstance(scheme, Scheme):
        return scheme
    if not isinstance(scheme, str):
        raise UsageError(f"scheme must be a preset name or an eq.Scheme, got {type(scheme).__name__}")
    try:
        return PRESETS[scheme]
    except KeyError:
        valid = ", ".join(sorted(PRESETS))
        raise UsageError(f"unknown scheme {scheme!r}; valid presets: {valid}") from None
