"""edgequant: PyTorch-native quantization for fixed-point edge inference engines."""

import logging as _logging

# torchao registers an Enum with torch's pytree at import time, which makes torch
# log a deprecation warning on every run; it is not actionable for our users.
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)

import torchao.quantization.pt2e  # noqa: E402,F401  (registers the quantized_decomposed ops)

from .core.errors import (  # noqa: E402
    CaptureWarning,
    EdgequantError,
    EdgequantWarning,
    InitialRangesWarning,
    InputShapeError,
    MetaArchWarning,
    NonFiniteError,
    NotCalibratedError,
    ParityDriftWarning,
    TidlFallbackWarning,
    UnquantizedOpsWarning,
)
from .core.version import __version__  # noqa: E402,F401
from .diagnose.analysis import analyze  # noqa: E402
from .diagnose.guidelines import Finding, check  # noqa: E402
from .diagnose.report import AnalysisReport  # noqa: E402
from .export.onnx import ExportResult  # noqa: E402
from .export.parity import ParityError, ParityReport  # noqa: E402
from .export.tidl_check import TidlCheckReport, tidl_check  # noqa: E402
from .graph.capture import CaptureError  # noqa: E402
from .numerics import distributed  # noqa: E402  (eq.distributed.init_process_group, for torchrun)
from .numerics.scheme import PRESETS, Scheme, get_scheme  # noqa: E402
from .surgery.adapt import AdaptReport, adapt, default_replacements  # noqa: E402
from .surgery.distill import DistillConfig, finetune_adapted  # noqa: E402
from .wrappers.checkpoint import CheckpointError  # noqa: E402
from .wrappers.detection import DetectionModule  # noqa: E402
from .wrappers.ptq import PTQConfig, PTQModule  # noqa: E402
from .wrappers.qat import QATConfig, QATModule  # noqa: E402
from .wrappers.schedule import FreezeSchedule  # noqa: E402

__all__ = [
    "PRESETS",
    "AdaptReport",
    "AnalysisReport",
    "CaptureError",
    "CaptureWarning",
    "CheckpointError",
    "DetectionModule",
    "DistillConfig",
    "EdgequantError",
    "EdgequantWarning",
    "ExportResult",
    "Finding",
    "FreezeSchedule",
    "InitialRangesWarning",
    "InputShapeError",
    "MetaArchWarning",
    "NonFiniteError",
    "NotCalibratedError",
    "PTQConfig",
    "PTQModule",
    "ParityDriftWarning",
    "ParityError",
    "ParityReport",
    "QATConfig",
    "QATModule",
    "Scheme",
    "TidlCheckReport",
    "TidlFallbackWarning",
    "UnquantizedOpsWarning",
    "adapt",
    "analyze",
    "check",
    "default_replacements",
    "distributed",
    "finetune_adapted",
    "get_scheme",
    "tidl_check",
]
