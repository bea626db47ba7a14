"""The errors edgequant raises on purpose, so that callers can catch them by kind."""

from __future__ import annotations


class EdgequantError(Exception):
    """Base of the errors edgequant raises about the user's model, data or files."""


class UsageError(EdgequantError, ValueError, TypeError):
    """An argument, option or input edgequant cannot use; the message says what is allowed.

    It is also a ValueError and a TypeError, the types Python code expects for bad arguments.
    """


class NonFiniteError(EdgequantError, ValueError):
    """A NaN or Inf reached a quantizer: its range (and everything after it) is ruined.

    `layer` names the module where it was found first, or is "" when the input itself
    was not finite.
    """

    def __init__(self, message: str, layer: str = "") -> None:
        super().__init__(message)
        self.layer = layer


class NotCalibratedError(EdgequantError, RuntimeError):
    """The wrapper has no ranges yet: calibrate it (PTQ) before evaluating, converting or exporting."""


class InputShapeError(EdgequantError, ValueError):
    """An input does not have the shape the model was captured for."""


class EdgequantWarning(UserWarning):
    """Base of edgequant's warnings, so that one filter can silence them or make them fatal."""


class CaptureWarning(EdgequantWarning):
    """The captured graph will not behave exactly like the eager model (BN momentum, random ops)."""


class UnquantizedOpsWarning(EdgequantWarning):
    """Some ops of the model have no quantization rule and stay in float.

    `ops` maps each op name to the modules it runs in, for tools that tabulate them.
    """

    def __init__(self, ops: dict[str, list[str]]) -> None:
        self.ops = ops
        parts = [f"{op} x{len(where)} (e.g. in `{where[0]}`)" for op, where in sorted(ops.items(), key=_by_count)]
        super().__init__(
            "edgequant has no quantization rule for these ops; they stay in float between Q/DQ pairs "
            "(the engine must run them in float): " + ", ".join(parts)
        )


def _by_count(item: tuple[str, list[str]]) -> tuple[int, str]:
    return -len(item[1]), item[0]


class InitialRangesWarning(EdgequantWarning):
    """A QATModule is exported before any training step: the file holds its initial ranges."""


class ParityDriftWarning(EdgequantWarning):
    """onnxruntime and torch part only by one-step rounding, yet the model amplifies it.

    The first differing tensor is off by one step on a few values (float32 summation
    order, not a wrong op), but by the outputs the two agree below PARITY_SQNR_DB: the
    engine will see the same drift. Common in randomly initialised deep models.
    """


class TidlFallbackWarning(EdgequantWarning):
    """Some nodes of an exported model break TIDL's import rules: TIDL will run them on the ARM core."""


class MetaArchWarning(EdgequantWarning):
    """A detector's TIDL post-processing (meta-architecture prototxt) would not reproduce torchvision's."""
