"""Config validation: every bad gpam_* value raises a ValueError naming the field; good values round-trip."""

import math

import pytest

from hf_gpam.testing_utils import tiny_gpam_config

from .utils import MODEL_TYPES, gpam_head_class


BAD_VALUES = [
    ("gpam_mode", "linear", "gpam_mode"),
    ("gpam_mode", None, "gpam_mode"),
    ("gpam_lambda_init", math.nan, "gpam_lambda_init"),
    ("gpam_lambda_init", math.inf, "gpam_lambda_init"),
    ("gpam_lambda_init", -math.inf, "gpam_lambda_init"),
    ("gpam_lambda_init", "0.5", "gpam_lambda_init"),
    ("gpam_lambda_init", True, "gpam_lambda_init"),
    ("gpam_lambda_init", None, "gpam_lambda_init"),
    ("gpam_lambda_neg_init", math.nan, "gpam_lambda_neg_init"),
    ("gpam_tie_lambda", "yes", "gpam_tie_lambda"),
    ("gpam_tie_lambda", 1, "gpam_tie_lambda"),
    ("gpam_lambda_trainable", None, "gpam_lambda_trainable"),
    ("gpam_negative_init", "identity", "gpam_negative_init"),
    ("gpam_rope_variant", "absolute", "gpam_rope_variant"),
    ("gpam_rope_variant", None, "gpam_rope_variant"),
    ("gpam_layers", [5], "gpam_layers"),
    ("gpam_layers", [-1], "gpam_layers"),
    ("gpam_layers", [0, 0], "gpam_layers"),
    ("gpam_layers", [0.5], "gpam_layers"),
    ("gpam_layers", "0,1", "gpam_layers"),
    ("gpam_layers", 1, "gpam_layers"),
    ("gpam_attention_types", [], "gpam_attention_types"),
    ("gpam_attention_types", ["self", "encoder"], "gpam_attention_types"),
    ("gpam_attention_types", ["self", "self"], "gpam_attention_types"),
    ("gpam_attention_types", "self", "gpam_attention_types"),
]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize(("field", "value", "named"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_bad_values_raise_value_error_naming_the_field(model_type, field, value, named):
    with pytest.raises(ValueError, match=named):
        tiny_gpam_config(model_type, **{field: value})


def test_untied_neg_init_needs_untying():
    with pytest.raises(ValueError, match="gpam_tie_lambda"):
        tiny_gpam_config("gpt2", gpam_lambda_neg_init=0.1)
    config = tiny_gpam_config("gpt2", gpam_lambda_neg_init=0.1, gpam_tie_lambda=False)
    assert config.gpam_lambda_neg_init == 0.1


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_value_changed_after_construction_is_checked_when_the_model_is_built(model_type):
    config = tiny_gpam_config(model_type)
    config.gpam_mode = "nonsense"
    with pytest.raises(ValueError, match="gpam_mode"):
        gpam_head_class(model_type)(config)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_values_round_trip_through_json(tmp_path, model_type):
    values = {
        "gpam_mode": "dagpam",
        "gpam_lambda_init": 0.25,
        "gpam_lambda_neg_init": 0.75,
        "gpam_tie_lambda": False,
        "gpam_lambda_trainable": False,
        "gpam_negative_init": "normal",
        "gpam_layers": [1, 0],
        "gpam_attention_types": ["self"],
        "gpam_rope_variant": "literal",
    }
    config = tiny_gpam_config(model_type, **values)
    # integers are accepted for float fields and normalised; layers are sorted
    assert config.gpam_layers == [0, 1]
    config.save_pretrained(tmp_path)
    reloaded = type(config).from_pretrained(tmp_path)
    for field, value in values.items():
        expected = sorted(value) if field == "gpam_layers" else value
        assert getattr(reloaded, field) == expected, field
    assert reloaded.model_type == f"gpam_{model_type}"


def test_integer_lambda_is_accepted_as_float():
    config = tiny_gpam_config("bart", gpam_lambda_init=1)
    assert config.gpam_lambda_init == 1.0 and isinstance(config.gpam_lambda_init, float)


def test_encoder_decoder_layers_are_checked_against_the_deeper_stack():
    config = tiny_gpam_config("bart", encoder_layers=2, decoder_layers=4, gpam_layers=[3])
    assert config.gpam_layers == [3]
    with pytest.raises(ValueError, match="0..3"):
        tiny_gpam_config("bart", encoder_layers=2, decoder_layers=4, gpam_layers=[4])
