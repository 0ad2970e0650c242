"""Generation with the KV cache: greedy, beam and sampling give the same tokens with and without the cache, and
the cache holds only the stock keys and values."""

import pytest
import torch

from .utils import MODEL_TYPES, gpam_model, model_inputs, sharpen_attention


STRATEGIES = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "beam": {"do_sample": False, "num_beams": 3},
    "sample": {"do_sample": True, "top_k": 20, "temperature": 0.9},
}


def generate(model, inputs, use_cache, strategy):
    torch.manual_seed(123)
    return model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        max_new_tokens=8,
        min_new_tokens=8,
        use_cache=use_cache,
        pad_token_id=model.config.pad_token_id,
        **STRATEGIES[strategy],
    )


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_cache_and_no_cache_generate_the_same_tokens(model_type, implementation, strategy):
    model = sharpen_attention(gpam_model(model_type, attn_implementation=implementation, gpam_lambda_init=0.7))
    # left padding, as generation with a decoder-only model needs
    inputs = model_inputs(model_type, left_padding=True)
    with torch.no_grad():
        cached = generate(model, inputs, True, strategy)
        uncached = generate(model, inputs, False, strategy)
    assert cached.shape[1] >= inputs["input_ids"].shape[1] + 8 if model_type == "gpt2" else cached.shape[1] >= 8
    torch.testing.assert_close(cached, uncached, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_eager_and_sdpa_generate_the_same_tokens(model_type):
    inputs = model_inputs(model_type, left_padding=True)
    tokens = {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = sharpen_attention(gpam_model(model_type, attn_implementation=implementation, gpam_lambda_init=0.7))
        with torch.no_grad():
            tokens[implementation] = generate(model, inputs, True, "greedy")
    torch.testing.assert_close(tokens["eager"], tokens["sdpa"], atol=0, rtol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_cache_holds_only_stock_keys_and_values(model_type):
    model = gpam_model(model_type, gpam_lambda_init=0.7)
    config = model.config
    inputs = model_inputs(model_type)
    with torch.no_grad():
        outputs = model(**inputs, use_cache=True)
    cache = outputs.past_key_values
    if model_type == "gpt2":
        caches = {"self": (cache, inputs["input_ids"].shape[1], config.n_layer, config.n_head, config.n_embd)}
    else:
        heads, width = config.decoder_attention_heads, config.d_model
        caches = {
            "self": (cache.self_attention_cache, inputs["decoder_input_ids"].shape[1], config.decoder_layers, heads, width),
            "cross": (cache.cross_attention_cache, inputs["input_ids"].shape[1], config.decoder_layers, heads, width),
        }
    for kind, (layer_cache, length, layers, heads, width) in caches.items():
        assert len(layer_cache.layers) == layers, kind
        for layer in layer_cache.layers:
            # exactly one key and one value tensor of the stock shape (B, H, T, D): no Q⁻ or P⁻ state
            expected = (2, heads, length, width // heads)
            assert tuple(layer.keys.shape) == expected and tuple(layer.values.shape) == expected, kind
            extra = {k for k, v in vars(layer).items() if isinstance(v, torch.Tensor)} - {"keys", "values"}
            assert not extra, f"{kind} cache holds extra tensors {extra}"


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_static_cache_generates_the_same_tokens(implementation):
    # a static cache hands the attention more keys than queries at prefill
    model = sharpen_attention(gpam_model("gpt2", attn_implementation=implementation, gpam_lambda_init=0.7))
    inputs = model_inputs("gpt2", left_padding=True)
    with torch.no_grad():
        static = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static", pad_token_id=0)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    torch.testing.assert_close(static, uncached, atol=0, rtol=0)
