"""The errors edgequant raises on purpose, so that callers can catch them by kind."""

from __future__ import annotations


class EdgequantError(Exception):
    """Base of the errors edgequant raises about the user's model, data or files."""


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


class InitialRangesWarning(UserWarning):
    """A QATModule is exported before any training step: the file holds its initial ranges."""


class ParityDriftWarning(UserWarning):
    """onnxruntime and torch part only by one-step rounding, yet the model amplifies it.

    The first differing tensor is off by one step on a few values (float32 summation
    order, not a wrong op), but by the outputs the two agree below PARITY_SQNR_DB: the
    engine will see the same drift. Common in randomly initialised deep models.
    """
