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


@dataclass
class DetectionAnalysis:
    """What `analyze` finds for a detector: mAP (COCO, percent) and head-output SQNR of float, 16 and 8 bit.

    The per-layer search of classifiers is not run for detectors; the verdict answers
    "is 16-bit fine, and what does 8 bit lose?" with mAP within `tolerance` points.
    """

    scheme: str
    scheme_16bit: str
    calibration_samples: int
    eval_samples: int
    tolerance: float
    float_map: dict[str, float]
    int16_map: dict[str, float]
    int8_map: dict[str, float]
    int16_sqnr_db: float  # raw head outputs (box and class per level) against float's
    int8_sqnr_db: float
    verdict: str

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return dict(self.__dict__)

    def __str__(self) -> str:
        rows = [("float", self.float_map, None), (self.scheme_16bit, self.int16_map, self.int16_sqnr_db)]
        rows.append((self.scheme, self.int8_map, self.int8_sqnr_db))
        width = max(len(name) for name, _, _ in rows) + 2
        lines = [
            f"edgequant analysis of a detector: {self.scheme} vs {self.scheme_16bit}, calibrated on "
            f"{self.calibration_samples} images, evaluated on {self.eval_samples}",
            f"  {'':<{width}}{'mAP':>8}{'mAP@.5':>9}{'vs float':>10}{'heads SQNR dB':>15}",
        ]
        for name, value, sqnr in rows:
            delta = "" if sqnr is None else f"{value['map'] - self.float_map['map']:+10.2f}"
            lines.append(
                f"  {name:<{width}}{value['map']:>8.2f}{value['map50']:>9.2f}{delta:>10}"
                + ("" if sqnr is None else f"{sqnr:>15.1f}")
            )
        lines.append(f"verdict (mAP within {self.tolerance:g} points of float): {self.verdict}")
        return "\n".join(lines)
