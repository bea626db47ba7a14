import pytest

from edgequant import FreezeSchedule


@pytest.mark.parametrize(
    ("epochs", "bn", "ranges"),
    [(None, None, None), (1, None, None), (2, 1, 1), (3, 1, 2), (4, 2, 3), (10, 5, 7), (50, 25, 37)],
)
def test_freeze_points(epochs, bn, ranges):
    s = FreezeSchedule(epochs)
    assert (s.bn_freeze_epoch, s.range_freeze_epoch) == (bn, ranges)
    if bn is not None:
        assert not s.bn_frozen(bn - 1) and s.bn_frozen(bn)
        assert not s.ranges_frozen(ranges - 1) and s.ranges_frozen(ranges)


def test_bad_total_epochs():
    with pytest.raises(ValueError):
        FreezeSchedule(0)
