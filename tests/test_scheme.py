import dataclasses

import pytest

import edgequant as eq


def test_int8_pow2_preset():
    s = eq.get_scheme("int8_pow2")
    assert isinstance(s, eq.Scheme)
    assert (s.weight_bits, s.activation_bits, s.power_of_2, s.per_channel_weights) == (8, 8, True, False)
    assert s.symmetric_activations
    assert s.weight_range == (-128, 127)


def test_unknown_scheme_lists_valid_names():
    with pytest.raises(ValueError, match="int8_pow2"):
        eq.get_scheme("int7")


def test_scheme_passthrough_and_replace():
    custom = dataclasses.replace(eq.get_scheme("int8_pow2"), name="mine")
    assert eq.get_scheme(custom) is custom


def test_invalid_schemes_rejected():
    with pytest.raises(ValueError, match="8 or 16"):
        eq.Scheme(weight_bits=4)
    with pytest.raises(ValueError, match="symmetric"):
        eq.Scheme(power_of_2=True, symmetric_activations=False)
    with pytest.raises(TypeError):
        eq.get_scheme(8)
