"""The GPAM model classes: identity with the stock models, backends, loading, numerics, training features."""

import copy

import pytest
import torch

import hf_gpam
from hf_gpam.testing_utils import tiny_gpam_config

from .utils import (
    IMPLEMENTATIONS,
    MODEL_TYPES,
    STOCK_CLASS_IDS,
    STOCK_CLASSES,
    gpam_head_class,
    gpam_model,
    head_class,
    main_output,
    model_inputs,
    sharpen_attention,
    stock_model,
    valid_positions,
)


def assert_same_outputs(model_type, inputs, got, want, atol=1e-5):
    valid = valid_positions(model_type, inputs)
    torch.testing.assert_close(main_output(got)[valid], main_output(want)[valid], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("model_type", "model_class"), STOCK_CLASSES, ids=STOCK_CLASS_IDS)
def test_patched_with_zero_lambda_gives_stock_outputs_also_after_reload(tmp_path, model_type, model_class, implementation):
    stock = stock_model(model_type, model_class, attn_implementation=implementation)
    inputs = model_inputs(model_type)
    with torch.no_grad():
        expected = stock(**inputs)
        # a random W⁻: the identity must not depend on it
        patched = hf_gpam.patch_model(stock, gpam_negative_init="normal")
        assert patched.config._attn_implementation == implementation
        assert {m.config._attn_implementation for m in patched.gpam_modules()} == {f"gpam_{implementation}"}
        assert len(patched.gpam_modules()) > 0
        assert_same_outputs(model_type, inputs, patched(**inputs), expected)

    patched.save_pretrained(tmp_path)
    reloaded = type(patched).from_pretrained(tmp_path, attn_implementation=implementation).eval()
    with torch.no_grad():
        assert_same_outputs(model_type, inputs, reloaded(**inputs), expected)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_eager_and_sdpa_agree_with_nonzero_lambda_and_random_negative_weights(model_type):
    model = gpam_model(model_type, attn_implementation="eager", gpam_lambda_init=0.6, gpam_negative_init="normal")
    sharpen_attention(model)
    for module in model.gpam_modules():
        torch.nn.init.normal_(module.gpam_q_neg.weight, std=0.5)
        module.gpam_lambda.weight.data.uniform_(0.2, 1.5)
    inputs = model_inputs(model_type)
    with torch.no_grad():
        eager = model(**inputs)
        model.set_attn_implementation("sdpa")
        sdpa = model(**inputs)
    assert model.config._attn_implementation == "sdpa"
    assert_same_outputs(model_type, inputs, sdpa, eager, atol=1e-5)
    # and λ ≠ 0 really changes the model
    stock_like = copy.deepcopy(model)
    for module in stock_like.gpam_modules():
        module.gpam_lambda.weight.data.zero_()
    with torch.no_grad():
        assert not torch.allclose(main_output(stock_like(**inputs)), main_output(sdpa), atol=1e-3)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_from_pretrained_of_a_stock_checkpoint_initialises_exactly_the_gpam_keys(tmp_path, model_type):
    stock = stock_model(model_type)
    stock.save_pretrained(tmp_path)
    gpam_class = gpam_head_class(model_type)
    model, info = gpam_class.from_pretrained(tmp_path, output_loading_info=True, gpam_lambda_init=0.25)
    gpam_keys = {name for name in model.state_dict() if ".gpam_" in name}
    assert gpam_keys and set(info["missing_keys"]) == gpam_keys
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.model_type == f"gpam_{model_type}"
    for module in model.gpam_modules():
        head_dim = module.head_dim
        torch.testing.assert_close(module.gpam_q_neg.weight, -torch.eye(head_dim))
        torch.testing.assert_close(module.gpam_lambda.weight, torch.full((module.num_heads,), 0.25))
    stock_state = stock.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor).all(), name
        if name in stock_state:
            torch.testing.assert_close(tensor, stock_state[name], atol=0, rtol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_eager_output_attentions_are_the_signed_maps(model_type):
    model = sharpen_attention(gpam_model(model_type, attn_implementation="eager", gpam_lambda_init=0.8))
    inputs = model_inputs(model_type)
    with torch.no_grad():
        outputs = model(**inputs, output_attentions=True)
    maps = list(outputs.attentions if model_type == "gpt2" else outputs.encoder_attentions + outputs.decoder_attentions)
    if model_type != "gpt2":
        maps += list(outputs.cross_attentions)
    assert len(maps) == len(model.gpam_modules())
    for p_gpam in maps:
        torch.testing.assert_close(p_gpam.sum(-1), torch.ones(p_gpam.shape[:-1]))
    assert any((p < 0).any() for p in maps)


@pytest.mark.parametrize(("model_type", "model_class"), STOCK_CLASSES, ids=STOCK_CLASS_IDS)
def test_patched_model_still_returns_attentions_and_hidden_states(model_type, model_class):
    model = hf_gpam.patch_model(stock_model(model_type, model_class, attn_implementation="eager"))
    with torch.no_grad():
        outputs = model(**model_inputs(model_type), output_attentions=True, output_hidden_states=True)
    attentions = outputs.attentions if model_type == "gpt2" else outputs.decoder_attentions
    hidden = outputs.hidden_states if model_type == "gpt2" else outputs.decoder_hidden_states
    assert attentions is not None and len(attentions) == 2
    assert hidden is not None and len(hidden) == 3


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_softmax_mode_is_the_stock_model(model_type):
    stock = stock_model(model_type)
    config = tiny_gpam_config(model_type, gpam_mode="softmax")
    model = gpam_head_class(model_type)(config).eval()
    assert model.gpam_modules() == []
    assert {n for n in model.state_dict()} == {n for n in stock.state_dict()}
    model.load_state_dict(stock.state_dict())
    inputs = model_inputs(model_type)
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), main_output(stock(**inputs)), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("model_type", "options", "expected_sites"),
    [
        ("gpt2", {"gpam_layers": [1]}, {(1, "self")}),
        ("gpt2", {"gpam_layers": [0], "add_cross_attention": True}, {(0, "self"), (0, "cross")}),
        ("gpt2", {"gpam_attention_types": ["cross"], "add_cross_attention": True}, {(0, "cross"), (1, "cross")}),
        ("bart", {"gpam_layers": [0]}, {("encoder", 0, "self"), ("decoder", 0, "self"), ("decoder", 0, "cross")}),
        ("marian", {"gpam_attention_types": ["cross"]}, {("decoder", 0, "cross"), ("decoder", 1, "cross")}),
        ("bart", {"gpam_attention_types": ["self"], "gpam_layers": [1]}, {("encoder", 1, "self"), ("decoder", 1, "self")}),
    ],
    ids=["gpt2-layer1", "gpt2-cross-layer0", "gpt2-cross-only", "bart-layer0", "marian-cross", "bart-self-layer1"],
)
def test_gpam_layers_and_attention_types_select_the_converted_modules(model_type, options, expected_sites):
    model = gpam_model(model_type, **options)
    converted = set()
    for name, module in model.named_modules():
        if hasattr(module, "gpam_lambda"):
            parts = name.split(".")
            layer = int(parts[parts.index("h" if model_type == "gpt2" else "layers") + 1])
            kind = "cross" if parts[-1] in ("crossattention", "encoder_attn") else "self"
            converted.add((layer, kind) if model_type == "gpt2" else (parts[1], layer, kind))
    assert converted == expected_sites


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_other_backends_load_with_the_stock_name_and_route_to_the_dual_attention_wrapper(tmp_path, model_type):
    gpam_model(model_type).save_pretrained(tmp_path)
    if not head_class(model_type)._supports_flex_attn:
        # GPT-2: stock transformers refuses flex_attention for the family, and so does the GPAM class
        with pytest.raises(ValueError, match="does not support an attention implementation through torch's flex"):
            gpam_head_class(model_type).from_pretrained(tmp_path, attn_implementation="flex_attention")
        return
    model = gpam_head_class(model_type).from_pretrained(tmp_path, attn_implementation="flex_attention")
    assert model.config._attn_implementation == "flex_attention"
    assert {m.config._attn_implementation for m in model.gpam_modules()} == {"gpam_flex_attention"}
    # a backend transformers cannot load here fails as it does for the stock class, before any daGPAM code runs
    with pytest.raises((ImportError, ValueError)):
        gpam_head_class(model_type).from_pretrained(tmp_path, attn_implementation="flash_attention_2")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_lambda_stays_float32_when_loading_in_bfloat16(tmp_path, model_type):
    gpam_model(model_type).save_pretrained(tmp_path)
    model = gpam_head_class(model_type).from_pretrained(tmp_path, dtype=torch.bfloat16)
    modules = model.gpam_modules()
    assert all(m.gpam_lambda.weight.dtype == torch.float32 for m in modules)
    assert all(m.gpam_q_neg.weight.dtype == torch.bfloat16 for m in modules)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fixed_lambda_stays_fixed_through_training_and_reload(tmp_path, model_type):
    model = gpam_model(model_type, gpam_lambda_trainable=False, gpam_lambda_init=0.3).train()
    assert not any("gpam_lambda" in name for name, _ in model.named_parameters())
    model.save_pretrained(tmp_path)
    reloaded = gpam_head_class(model_type).from_pretrained(tmp_path)
    assert not any("gpam_lambda" in name for name, _ in reloaded.named_parameters())
    for module in reloaded.gpam_modules():
        torch.testing.assert_close(module.gpam_lambda.weight, torch.full((module.num_heads,), 0.3))


def loss_and_grads(model, inputs):
    model.zero_grad()
    outputs = model(**inputs, labels=labels_for(inputs))
    outputs.loss.backward()
    return outputs.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def labels_for(inputs):
    if "decoder_input_ids" in inputs:
        return inputs["decoder_input_ids"]
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)


NO_DROPOUT = {
    "gpt2": {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    "bart": {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0},
    "marian": {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0},
}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model_type):
    # training mode without dropout, so that the recomputed forward is the same forward
    model = gpam_model(model_type, gpam_lambda_init=0.5, **NO_DROPOUT[model_type]).train()
    inputs = model_inputs(model_type)
    loss, grads = loss_and_grads(model, inputs)
    model.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed_grads = loss_and_grads(model, inputs)
    assert model.is_gradient_checkpointing
    torch.testing.assert_close(checkpointed_loss, loss)
    assert checkpointed_grads.keys() == grads.keys()
    assert any("gpam_lambda" in name for name in grads) and any("gpam_q_neg" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_half_precision_native_and_autocast_stay_finite_and_backends_agree(model_type, dtype):
    inputs = model_inputs(model_type, left_padding=True)
    results = {}
    for implementation in IMPLEMENTATIONS:
        torch.manual_seed(0)
        model = gpam_model(model_type, attn_implementation=implementation, gpam_lambda_init=0.7).to(dtype)
        loss, grads = loss_and_grads(model, inputs)
        assert torch.isfinite(loss)
        assert all(torch.isfinite(g).all() for g in grads.values())
        with torch.no_grad():
            results[implementation] = main_output(model(**inputs)).float()
        assert torch.isfinite(results[implementation]).all()
    valid = valid_positions(model_type, inputs)
    tolerance = {torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(results["eager"][valid], results["sdpa"][valid], atol=tolerance, rtol=tolerance)

    # autocast: float32 weights, low-precision compute (CPU autocast supports both dtypes)
    torch.manual_seed(0)
    model = gpam_model(model_type, gpam_lambda_init=0.7)
    with torch.autocast("cpu", dtype=dtype):
        loss, grads = loss_and_grads(model, inputs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_left_padding_produces_no_nan(model_type, implementation):
    model = gpam_model(model_type, attn_implementation=implementation, gpam_lambda_init=0.9)
    inputs = model_inputs(model_type, left_padding=True)
    inputs["attention_mask"][0, :5] = 0
    with torch.no_grad():
        assert torch.isfinite(main_output(model(**inputs))).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gpt2_cross_attention_identity_and_backend_agreement(implementation):
    stock = stock_model("gpt2", attn_implementation=implementation, add_cross_attention=True)
    inputs = model_inputs("gpt2")
    encoder_states = torch.randn(2, 5, 32)
    encoder_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    extra = {"encoder_hidden_states": encoder_states, "encoder_attention_mask": encoder_mask}
    with torch.no_grad():
        expected = stock(**inputs, **extra)
        patched = hf_gpam.patch_model(stock)
        assert sum("crossattention" in n for n, _ in patched.named_modules() if n.endswith("gpam_lambda")) == 2
        assert_same_outputs("gpt2", inputs, patched(**inputs, **extra), expected)
        for module in patched.gpam_modules():
            module.gpam_lambda.weight.fill_(0.8)
        sharpen_attention(patched)
        mine = patched(**inputs, **extra)
        other = "sdpa" if implementation == "eager" else "eager"
        patched.set_attn_implementation(other)
        assert_same_outputs("gpt2", inputs, patched(**inputs, **extra), mine)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gpt2_layer_index_scaling_and_upcast_are_kept(implementation):
    stock = stock_model(
        "gpt2", attn_implementation=implementation, reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True
    )
    inputs = model_inputs("gpt2")
    with torch.no_grad():
        expected = stock(**inputs)
        assert_same_outputs("gpt2", inputs, hf_gpam.patch_model(stock)(**inputs), expected)
