import warnings

import pytest

import edgequant as eq
from edgequant.core.errors import UsageError


def test_every_error_and_warning_has_the_common_base():
    errors = [eq.CaptureError, eq.CheckpointError, eq.InputShapeError, eq.NonFiniteError, eq.NotCalibratedError]
    errors += [eq.ParityError, UsageError]
    assert all(issubclass(e, eq.EdgequantError) for e in errors)
    categories = [eq.CaptureWarning, eq.InitialRangesWarning, eq.ParityDriftWarning, eq.UnquantizedOpsWarning]
    assert all(issubclass(w, eq.EdgequantWarning) for w in categories)


def test_a_usage_error_is_caught_as_the_builtin_types_of_bad_arguments():
    for kind in (ValueError, TypeError, eq.EdgequantError):
        with pytest.raises(kind):
            eq.get_scheme("int7")


def test_one_filter_silences_every_edgequant_warning():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=eq.EdgequantWarning)
        warnings.warn(eq.UnquantizedOpsWarning({"aten.softmax": ["head"]}), stacklevel=1)
        warnings.warn(eq.CaptureWarning("random ops"), stacklevel=1)
        warnings.warn(UserWarning("someone else's"), stacklevel=1)
    assert [str(w.message) for w in seen] == ["someone else's"]
