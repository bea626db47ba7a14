import dataclasses

import pytest
import torch

import edgequant as eq


def test_int8_pow2_preset():
    s = eq.get_scheme("int8_pow2")
    assert (s.weight_bits, s.activation_bits, s.power_of_2, s.weight_granularity) == (8, 8, True, "per_tensor")
    assert s.symmetric_activations
    assert s.weight_range == (-128, 127)


@pytest.mark.parametrize(
    ("name", "bits", "pow2", "granularity", "symmetric"),
    [
        ("int8", 8, False, "per_channel", True),
        ("int8_pow2_dw", 8, True, "depthwise_per_channel", True),
        ("int16", 16, False, "per_channel", True),
        ("int16_pow2", 16, True, "per_tensor", True),
    ],
)
def test_presets(name, bits, pow2, granularity, symmetric):
    s = eq.get_scheme(name)
    assert (s.weight_bits, s.activation_bits, s.power_of_2) == (bits, bits, pow2)
    assert (s.weight_granularity, s.symmetric_activations) == (granularity, symmetric)
    assert s.name == name and f"int{bits}" in s.description  # what `edgequant --help` lists says what it is


def test_unknown_scheme_lists_valid_names():
    with pytest.raises(ValueError, match="unknown scheme 'int7'") as info:
        eq.get_scheme("int7")
    assert all(name in str(info.value) for name in eq.PRESETS)
    with pytest.raises(ValueError, match="valid presets: int16, int16_pow2, int8, int8_pow2, int8_pow2_dw"):
        eq.PTQModule(torch.nn.Conv2d(3, 4, 3), (torch.randn(2, 3, 8, 8),), scheme="int8-pow2")


def test_scheme_passthrough_and_replace():
    custom = dataclasses.replace(eq.get_scheme("int8_pow2"), name="mine")
    assert eq.get_scheme(custom) is custom


def test_high_precision_forms():
    base = eq.get_scheme("int8_pow2")
    named = base.with_high_precision(["features.0", "classifier"])
    assert named.high_precision == ("features.0", "classifier") and named.is_mixed
    assert base.with_high_precision("first_last").is_mixed
    assert base.with_high_precision(lambda name: name.startswith("fc")).is_mixed
    assert not eq.get_scheme("int16").with_high_precision("first_last").is_mixed  # already 16 bit
    with pytest.raises(ValueError, match="first_last"):
        base.with_high_precision("first")


def test_invalid_schemes_rejected():
    with pytest.raises(ValueError, match="8 or 16"):
        eq.Scheme(weight_bits=4)
    with pytest.raises(ValueError, match="symmetric"):
        eq.Scheme(power_of_2=True, symmetric_activations=False)
    with pytest.raises(ValueError, match="weight_granularity"):
        eq.Scheme(weight_granularity="per_row")
    with pytest.raises(TypeError):
        eq.get_scheme(8)
