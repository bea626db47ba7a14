import dataclasses
import json

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


@pytest.mark.parametrize(
    "scheme",
    [
        *eq.PRESETS.values(),
        eq.get_scheme("int8").with_high_precision(["features.0", "classifier"]),
        eq.get_scheme("int8_pow2").with_high_precision("first_last"),
    ],
)
def test_scheme_round_trips_through_plain_data(scheme):
    data = json.loads(json.dumps(scheme.to_dict()))  # plain data: JSON holds it unchanged
    assert data["version"] == eq.Scheme.VERSION == 2
    assert eq.Scheme.from_dict(data) == scheme


def test_from_dict_refuses_what_it_cannot_read():
    data = eq.get_scheme("int8_pow2").to_dict()
    with pytest.raises(ValueError, match=r"Scheme data has version 3, newer than this edgequant reads \(up to 2\)"):
        eq.Scheme.from_dict({**data, "version": 3})
    with pytest.raises(ValueError, match=r"Scheme has no field 'bits'; its fields are name, weight_bits, "):
        eq.Scheme.from_dict({**data, "bits": 8})
    with pytest.raises(ValueError, match="needs an integer 'version' >= 1"):
        eq.Scheme.from_dict({k: v for k, v in data.items() if k != "version"})
    with pytest.raises(TypeError, match="takes a dict"):
        eq.Scheme.from_dict("int8_pow2")
    with pytest.raises(ValueError, match="8 or 16"):
        eq.Scheme.from_dict({**data, "weight_bits": 4})  # from_dict validates like the constructor


def test_version_1_records_read_as_the_signed_grids_they_computed():
    data = eq.get_scheme("int8").to_dict()
    del data["unsigned_activations"]
    old = eq.Scheme.from_dict({**data, "version": 1})
    assert old.unsigned_activations is False
    assert old == dataclasses.replace(eq.get_scheme("int8"), unsigned_activations=False)
    with pytest.raises(ValueError, match=r"Scheme.unsigned_activations must be True or False, got 'no'"):
        eq.Scheme(unsigned_activations="no")


def test_callable_high_precision_is_recorded_by_name_and_not_rebuilt():
    def head_only(name: str) -> bool:
        return name == "fc"

    data = eq.get_scheme("int8_pow2").with_high_precision(head_only).to_dict()
    assert data["high_precision"] == f"<callable {head_only.__qualname__}>"
    with pytest.raises(ValueError, match=r"high_precision was a callable .*build the Scheme in code"):
        eq.Scheme.from_dict(data)
