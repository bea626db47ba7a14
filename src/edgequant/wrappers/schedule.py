"""When QAT freezes BN statistics and quantization ranges."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from ..core.errors import UsageError
from ..core.records import record, record_fields


@dataclass(frozen=True)
class FreezeSchedule:
    """Freeze points, as 0-based epoch indices, derived from the run's length.

    - BN statistics freeze at the start of epoch ``E // 2``: from then on BN uses its
      running statistics, exactly as the folded conv will, and the weights adapt to it.
    - Ranges freeze at the start of epoch ``max(E // 2, 3 * E // 4)``: the last
      quarter of training fine-tunes the weights to fixed scales.
    - With ``total_epochs`` of 1 or None nothing freezes.

    E=3 freezes BN at epoch 1 and ranges at epoch 2; E=10 at 5 and 7. A QATModule
    takes it in `QATConfig(schedule=...)`.
    """

    VERSION: ClassVar[int] = 1

    total_epochs: int | None = None

    def __post_init__(self) -> None:
        e = self.total_epochs
        if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e < 1):
            raise UsageError(f"total_epochs must be a whole number >= 1, or None to freeze nothing; got {e!r}")

    def to_dict(self) -> dict[str, Any]:
        """The schedule as versioned plain data (QATConfig.to_dict nests it)."""
        return record(self.VERSION, asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FreezeSchedule:
        """The schedule `to_dict()` recorded; a newer version or an unknown field is refused."""
        return cls(**record_fields(data, cls, cls.VERSION))

    @property
    def bn_freeze_epoch(self) -> int | None:
        e = self.total_epochs
        return None if e is None or e < 2 else e // 2

    @property
    def range_freeze_epoch(self) -> int | None:
        e = self.total_epochs
        return None if e is None or e < 2 else max(e // 2, 3 * e // 4)

    def bn_frozen(self, epoch: int) -> bool:
        return self.bn_freeze_epoch is not None and epoch >= self.bn_freeze_epoch

    def ranges_frozen(self, epoch: int) -> bool:
        return self.range_freeze_epoch is not None and epoch >= self.range_freeze_epoch
