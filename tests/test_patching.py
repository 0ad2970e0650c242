"""patch_model: the conversion contract, and every way it must refuse."""

import time

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

import hf_gpam
from hf_gpam.testing_utils import tiny_stock_config

from .utils import MODEL_TYPES, STOCK_CLASS_IDS, STOCK_CLASSES, gpam_model, main_output, model_inputs, stock_model


@pytest.mark.parametrize(("model_type", "model_class"), STOCK_CLASSES, ids=STOCK_CLASS_IDS)
def test_patch_converts_class_and_config_and_keeps_the_weights(model_type, model_class):
    model = stock_model(model_type, model_class)
    before = {name: (p.data_ptr(), p.clone()) for name, p in model.named_parameters()}
    stock_config = model.config.to_dict()
    patched = hf_gpam.patch_model(model, gpam_lambda_init=0.2)
    assert patched is model
    assert type(patched) is hf_gpam.ARCHITECTURES[model_type].model_classes[model_class]
    assert patched.config.model_type == f"gpam_{model_type}" and patched.config.gpam_lambda_init == 0.2
    # every stock config field is carried over
    for key, value in stock_config.items():
        if key not in ("model_type", "transformers_version", "architectures"):
            assert getattr(patched.config, key) == value, key
    # sub-modules see the new config
    # every sub-module sees the GPAM config; the daGPAM attention modules through their routing view of it
    from hf_gpam.modeling.gpam_attention import GpamAttentionConfig, model_config_of

    assert all(model_config_of(m.config) is patched.config for m in patched.modules() if hasattr(m, "config"))
    assert all(isinstance(m.config, GpamAttentionConfig) for m in patched.gpam_modules())
    after = dict(patched.named_parameters())
    for name, (pointer, value) in before.items():
        assert after[name].data_ptr() == pointer
        torch.testing.assert_close(after[name], value, atol=0, rtol=0)
    new = set(after) - set(before)
    assert new and all(".gpam_q_neg." in n or ".gpam_lambda." in n for n in new)


def test_patch_default_lambda_is_zero_and_parameter_overhead_is_small():
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000)).eval()
    count = sum(p.numel() for p in model.parameters())
    hf_gpam.patch_model(model)
    assert all((m.gpam_lambda.weight == 0).all() for m in model.gpam_modules())
    added = sum(p.numel() for p in model.parameters()) - count
    # d_head² + H per attention module
    assert added == 4 * (64 * 64 + 4)
    assert added / count < 0.01


def test_patch_preserves_dtype_and_creates_lambda_in_float32():
    model = stock_model("bart").to(torch.bfloat16)
    hf_gpam.patch_model(model)
    for module in model.gpam_modules():
        assert module.gpam_q_neg.weight.dtype == torch.bfloat16
        assert module.gpam_lambda.weight.dtype == torch.float32
        assert module.gpam_q_neg.weight.device == module.q_proj.weight.device
    with torch.no_grad():
        assert torch.isfinite(main_output(model(**model_inputs("bart")))).all()


def test_patch_options_are_applied():
    model = hf_gpam.patch_model(
        stock_model("gpt2"), gpam_layers=[0], gpam_tie_lambda=False, gpam_lambda_init=0.3, gpam_lambda_neg_init=0.1,
    )
    (module,) = model.gpam_modules()
    torch.testing.assert_close(module.gpam_lambda.weight, torch.tensor([[0.3] * 4, [0.1] * 4]))


def test_patching_twice_is_a_no_op_and_with_options_an_error():
    model = hf_gpam.patch_model(stock_model("marian"))
    count = sum(p.numel() for p in model.parameters())
    assert hf_gpam.patch_model(model) is model
    assert sum(p.numel() for p in model.parameters()) == count
    with pytest.raises(ValueError, match="already a daGPAM model"):
        hf_gpam.patch_model(model, gpam_lambda_init=0.5)
    # a new GPAM model is recognised too
    assert hf_gpam.patch_model(gpam_model("gpt2")) is not None


def test_remote_code_gpam_model_is_recognised_by_duck_typing(tmp_path):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    gpam_model("gpt2").save_pretrained(tmp_path)
    # with hf_gpam imported, the Auto classes prefer its registered classes: fetch the checkpoint's own class
    remote_class = get_class_from_dynamic_module("modeling_gpam_gpt2.GpamGPT2LMHeadModel", str(tmp_path))
    remote = remote_class.from_pretrained(tmp_path)
    assert remote_class is not hf_gpam.GpamGPT2LMHeadModel
    assert type(remote).__module__.startswith("transformers_modules.")
    assert hf_gpam.is_gpam_model(remote)
    count = sum(p.numel() for p in remote.parameters())
    assert hf_gpam.patch_model(remote) is remote
    assert sum(p.numel() for p in remote.parameters()) == count


def test_unsupported_model_type_lists_the_supported_ones():
    bert = BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported \\(supported: gpt2, bart, marian, llama"):
        hf_gpam.patch_model(bert)
    with pytest.raises(ValueError, match="not supported"):
        hf_gpam.patch_model(torch.nn.Linear(2, 2))


def test_unsupported_head_class_lists_the_supported_classes():
    model = GPT2ForSequenceClassification(tiny_stock_config("gpt2"))
    with pytest.raises(ValueError, match="GPT2Model, GPT2LMHeadModel"):
        hf_gpam.patch_model(model)


def test_unknown_option_and_bad_value_are_refused_before_anything_changes():
    model = stock_model("gpt2")
    with pytest.raises(ValueError, match="unknown option.*lambda_init"):
        hf_gpam.patch_model(model, lambda_init=0.5)
    with pytest.raises(ValueError, match="gpam_mode"):
        hf_gpam.patch_model(model, gpam_mode="bogus")
    assert type(model) is GPT2LMHeadModel and model.config.model_type == "gpt2"


def test_a_model_on_another_backend_is_patched_and_keeps_its_backend_name():
    model = stock_model("llama", attn_implementation="flex_attention")
    hf_gpam.patch_model(model)
    assert type(model).__name__ == "GpamLlamaForCausalLM"
    assert model.config._attn_implementation == "flex_attention"
    assert {m.config._attn_implementation for m in model.gpam_modules()} == {"gpam_flex_attention"}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patched_model_trains_lambda(model_type):
    model = hf_gpam.patch_model(stock_model(model_type)).train()
    inputs = model_inputs(model_type)
    labels = inputs.get("decoder_input_ids", inputs["input_ids"])
    model(**inputs, labels=labels).loss.backward()
    lambda_grads = [m.gpam_lambda.weight.grad for m in model.gpam_modules()]
    assert all(g is not None for g in lambda_grads) and any(g.abs().sum() > 0 for g in lambda_grads)


def test_patching_a_gpt2_small_shape_takes_under_a_second():
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=1000))
    start = time.perf_counter()
    hf_gpam.patch_model(model)
    assert time.perf_counter() - start < 1.0
