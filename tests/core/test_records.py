from dataclasses import dataclass

import pytest

from edgequant.core.errors import UsageError
from edgequant.core.records import VERSION_KEY, record, record_fields


@dataclass(frozen=True)
class Knobs:
    width: int = 8
    name: str = "a"


def test_a_record_reads_back_to_its_fields():
    data = record(1, {"width": 16, "name": "b"})
    assert data == {VERSION_KEY: 1, "width": 16, "name": "b"}
    assert Knobs(**record_fields(data, Knobs, 1)) == Knobs(16, "b")


def test_missing_fields_take_the_defaults():
    assert Knobs(**record_fields({VERSION_KEY: 1, "name": "c"}, Knobs, 1)) == Knobs(8, "c")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({VERSION_KEY: 2, "width": 8}, "version 2, newer than this edgequant reads \\(up to 1\\); upgrade"),
        ({"width": 8}, "needs an integer 'version' >= 1"),
        ({VERSION_KEY: "1"}, "needs an integer 'version' >= 1"),
        ({VERSION_KEY: 1, "depth": 3}, "Knobs has no field 'depth'; its fields are width, name"),
        ([1, 2], "takes a dict as Knobs.to_dict\\(\\) writes it, got list"),
    ],
)
def test_records_this_version_cannot_read_are_refused(data, message):
    with pytest.raises(UsageError, match=message):
        record_fields(data, Knobs, 1)
