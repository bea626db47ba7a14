"""What an analysis finds, as plain data that the analysis writes and the report reads."""

from __future__ import annotations

from dataclasses import dataclass

VERDICT_QUANTIZATION = "16-bit close to float, 8-bit is not: the loss is quantization; see the layers below"
VERDICT_OUTSIDE = "16-bit is already far from float: look for a problem outside quantization"
VERDICT_FINE = "both fine"


@dataclass
class Fidelity:
    """How close one quantized model's outputs are to the float model's, on the evaluation data."""

    scheme: str
    sqnr_db: float
    top1_agreement: float  # % of predictions equal to float's
    top1_accuracy: float | None  # % correct, when the evaluation data has labels
    simulated: bool = False  # True: fake-quant simulation; False: the converted PTQ model


@dataclass
class LayerSensitivity:
    """One conv / linear layer, named as `Scheme.with_high_precision` accepts it."""

    rank: int  # 1 = most sensitive
    position: int  # order in the network, from 0
    name: str
    kind: str  # "conv", "depthwise conv" or "linear"
    sqnr_only_8bit_db: float  # this layer in 8 bit, everything else float
    sqnr_keep_16bit_db: float  # this layer in 16 bit, everything else 8 bit
    weight_min: float  # BN-folded (and equalized) weights, as they are quantized
    weight_max: float
    weight_abs_median: float  # far below max |w|: a few large weights set the scale
    weight_zero_8bit_pct: float  # % of the weights that round to 0 at 8 bit
    output_min: float  # calibrated range of the tensor the layer writes
    output_max: float
    output_outside_range_pct: float  # % of that tensor's values on the evaluation data outside the calibrated range
