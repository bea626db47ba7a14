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
    for bad in (0, 1.5, True, "3"):
        with pytest.raises(ValueError, match="total_epochs must be a whole number >= 1, or None"):
            FreezeSchedule(bad)


def test_round_trip_through_plain_data():
    for schedule in (FreezeSchedule(), FreezeSchedule(10)):
        assert FreezeSchedule.from_dict(schedule.to_dict()) == schedule
    assert FreezeSchedule(10).to_dict() == {"version": 1, "total_epochs": 10}
    with pytest.raises(ValueError, match="FreezeSchedule has no field 'bn_epoch'"):
        FreezeSchedule.from_dict({"version": 1, "bn_epoch": 3})
