"""edgequant: PyTorch-native quantization for fixed-point edge inference engines."""

import logging as _logging

# torchao registers an Enum with torch's pytree at import time, which makes torch
# log a deprecation warning on every run; it is not actionable for our users.
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)

import torchao.quantization.pt2e  # noqa: E402,F401  (registers the quantized_decomposed ops)

from . import distributed  # noqa: E402  (eq.distributed.init_process_group, for torchrun)
from .analysis import AnalysisReport, analyze  # noqa: E402
from .capture import CaptureError  # noqa: E402
from .checkpoint import CheckpointError  # noqa: E402
from .errors import (  # noqa: E402
    EdgequantError,
    InitialRangesWarning,
    InputShapeError,
    NonFiniteError,
    NotCalibratedError,
    ParityDriftWarning,
)
from .export import ExportResult  # noqa: E402
from .guidelines import Finding, check  # noqa: E402
from .parity import ParityError, ParityReport  # noqa: E402
from .ptq import PTQConfig, PTQModule  # noqa: E402
from .qat import QATModule  # noqa: E402
from .quantizer import UnquantizedOpsWarning  # noqa: E402
from .schedule import FreezeSchedule  # noqa: E402
from .scheme import PRESETS, Scheme, get_scheme  # noqa: E402

__all__ = [
    "PRESETS",
    "AnalysisReport",
    "CaptureError",
    "CheckpointError",
    "EdgequantError",
    "ExportResult",
    "Finding",
    "FreezeSchedule",
    "InitialRangesWarning",
    "InputShapeError",
    "NonFiniteError",
    "NotCalibratedError",
    "PTQConfig",
    "PTQModule",
    "ParityDriftWarning",
    "ParityError",
    "ParityReport",
    "QATModule",
    "Scheme",
    "UnquantizedOpsWarning",
    "analyze",
    "check",
    "distributed",
    "get_scheme",
]
__version__ = "0.1.0"
