"""The supported-architecture table is complete: every row has its config, models, attention class, converter
entries, Auto registration, a tiny test config, and is covered by the parametrized contract tests (the per-feature
files for GPT-2 / BART / Marian, tests/test_decoders.py for the generated decoder families)."""

import pytest
from transformers import AutoConfig, PreTrainedModel

import hf_gpam
from hf_gpam.modeling.gpam_attention import GpamAttentionMixin
from hf_gpam.modeling.gpam_modeling_utils import GpamModelMixin
from hf_gpam.testing_utils import tiny_gpam_config, tiny_stock_config

from . import test_decoders, test_generation, test_hub, test_models
from .utils import DECODER_TYPES, MODEL_TYPES, STOCK_CLASSES


@pytest.mark.parametrize("model_type", list(hf_gpam.ARCHITECTURES))
def test_row_is_complete(model_type):
    architecture = hf_gpam.ARCHITECTURES[model_type]
    assert architecture.model_type == model_type
    assert architecture.gpam_model_type == f"gpam_{model_type}"
    assert type(AutoConfig.for_model(architecture.gpam_model_type)) is architecture.config_class
    assert hf_gpam.GPAM_MODEL_TYPES[architecture.gpam_model_type] is architecture
    # a base model and a head model (and a sequence classifier for decoder families that have one), each mapped
    # to a GPAM subclass of it
    assert len(architecture.model_classes) in (2, 3)
    for stock_class, gpam_class in architecture.model_classes.items():
        assert issubclass(gpam_class, stock_class) and issubclass(gpam_class, GpamModelMixin)
        assert issubclass(stock_class, PreTrainedModel)
        assert gpam_class.config_class is architecture.config_class
        assert issubclass(gpam_class.gpam_attention_class, GpamAttentionMixin)
        assert gpam_class.__name__ in hf_gpam.__all__
    assert set(architecture.auto_classes.values()) == set(architecture.model_classes.values())
    assert type(tiny_stock_config(model_type)).model_type == model_type
    # its attention class replaces the stock one the model builds
    model = next(iter(architecture.model_classes.values()))(tiny_gpam_config(model_type))
    stock_attention = {type(m) for m in model.modules() if type(m).__name__.endswith("Attention")}
    assert stock_attention == {model.gpam_attention_class}
    assert architecture.config_class.__name__ in hf_gpam.__all__


def parametrized_values(test_function, name):
    for mark in test_function.pytestmark:
        if mark.name == "parametrize" and mark.args[0] == name:
            return list(mark.args[1])
    raise AssertionError(f"{test_function.__name__} is not parametrized over {name}")


def test_every_row_is_covered_by_the_core_tests():
    assert set(MODEL_TYPES) | set(DECODER_TYPES) == set(hf_gpam.ARCHITECTURES)
    assert not set(MODEL_TYPES) & set(DECODER_TYPES)
    classes = {(mt, cls) for mt in MODEL_TYPES for cls in hf_gpam.ARCHITECTURES[mt].model_classes}
    assert set(STOCK_CLASSES) == classes
    identity = test_models.test_patched_with_zero_lambda_gives_stock_outputs_also_after_reload
    assert set(parametrized_values(identity, ("model_type", "model_class"))) == classes
    for test_function in (
        test_models.test_eager_and_sdpa_agree_with_nonzero_lambda_and_random_negative_weights,
        test_models.test_from_pretrained_of_a_stock_checkpoint_initialises_exactly_the_gpam_keys,
        test_generation.test_cache_and_no_cache_generate_the_same_tokens,
        test_hub.test_checkpoint_loads_with_trust_remote_code_without_hf_gpam,
    ):
        assert set(parametrized_values(test_function, "model_type")) == set(MODEL_TYPES)
    for test_function in test_decoders.FAMILY_CONTRACT_TESTS:
        assert set(parametrized_values(test_function, "model_type")) == set(DECODER_TYPES), test_function.__name__
