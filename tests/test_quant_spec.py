"""Bad specs fail at construction with a message naming the field and the allowed values."""
import pytest

from qat.quant import ActivationSpec, QuantConfig, WeightSpec


@pytest.mark.parametrize("bits", [0, 1, 9, 16, "4", 4.0, True])
def test_bits_outside_2_to_8(bits):
    with pytest.raises(ValueError, match=r"quant\.weight\.bits=.*2\.\.8"):
        WeightSpec(bits=bits)


def test_unknown_granularity_lists_allowed():
    with pytest.raises(ValueError, match=r"quant\.weight\.granularity='row'.*\['tensor', 'channel', 'group'\]"):
        WeightSpec(granularity="row")


@pytest.mark.parametrize("group_size", [0, -64, None, 1.5])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match=r"quant\.weight\.group_size"):
        WeightSpec(granularity="group", group_size=group_size)


def test_channel_granularity_ignores_group_size():
    assert WeightSpec(granularity="channel", group_size=None).effective_group_size is None


def test_bad_observer_and_scale_dtype():
    with pytest.raises(ValueError, match=r"quant\.weight\.observer.*minmax"):
        WeightSpec(observer="percentile")
    with pytest.raises(ValueError, match=r"quant\.weight\.scale_dtype.*bfloat16"):
        WeightSpec(scale_dtype="int8")


def test_activation_spec_errors():
    with pytest.raises(ValueError, match=r"quant\.activation\.bits"):
        ActivationSpec(bits=12)
    with pytest.raises(ValueError, match=r"quant\.activation\.granularity.*token"):
        ActivationSpec(granularity="channel")


def test_override_with_unknown_field_or_value():
    with pytest.raises(ValueError, match=r"unknown weight field.*\['bitz'\]"):
        QuantConfig(overrides={"*.down_proj": {"bitz": 8}})
    with pytest.raises(ValueError, match=r"quant\.weight\.bits"):
        QuantConfig(overrides={"*.down_proj": {"bits": 10}})


def test_patterns_must_be_lists():
    with pytest.raises(ValueError, match=r"quant\.include must be a list"):
        QuantConfig(include="*layers.*")


def test_start_step_must_be_non_negative():
    with pytest.raises(ValueError, match=r"quant\.start_step"):
        QuantConfig(start_step=-1)


def test_describe():
    assert WeightSpec(bits=4, group_size=64).describe() == "W4 g64 sym"
    assert WeightSpec(bits=8, granularity="channel", symmetric=False).describe() == "W8 per-channel asym"
