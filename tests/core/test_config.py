import pytest

from core.config import (CalibrationConfig, ChatConfig, EvalConfig, OutlierConfig, QuantConfig, from_dict,
                         to_dict)


def test_defaults_are_the_papers_dense_and_sparse_setting():
    q = QuantConfig()
    assert q.bits == 4 and q.outliers.percent == 0.45 and q.sensitivity_percent == 0.05
    assert q.dense_and_sparse
    assert CalibrationConfig().samples == 100 and CalibrationConfig().seqlen == 512
    assert EvalConfig().windows == 40 and EvalConfig().seqlen == 512


def test_round_trip_through_json_dict():
    q = QuantConfig(bits=3, outliers=OutlierConfig(range_multiplier=1.8, percent=None), sensitivity_percent=0.0)
    assert from_dict(QuantConfig, to_dict(q)) == q


@pytest.mark.parametrize("make,words", [
    (lambda: QuantConfig(bits=7), "use 3, 4, 5 or 6"),
    (lambda: QuantConfig(method="gptq"), "use one of"),
    (lambda: QuantConfig(sensitivity_percent=50), "in percent"),
    (lambda: OutlierConfig(range_multiplier=1.5, percent=0.45), "not both"),
    (lambda: OutlierConfig(range_multiplier=-1.0, percent=None), "positive"),
    (lambda: OutlierConfig(percent=45), "in percent"),
    (lambda: CalibrationConfig(samples=0), "e.g. 100"),
    (lambda: EvalConfig(seqlen=4), "e.g. 512"),
    (lambda: ChatConfig(temperature=-1), "greedy"),
])
def test_out_of_range_settings_say_what_to_do(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_fields_carry_ui_hints():
    import dataclasses

    for cls in (QuantConfig, OutlierConfig, CalibrationConfig, EvalConfig, ChatConfig):
        for f in dataclasses.fields(cls):
            if f.name == "outliers":
                continue
            assert f.metadata.get("label") and f.metadata.get("tooltip"), (cls.__name__, f.name)
