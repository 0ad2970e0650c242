"""daGPAM on every attention backend that runs on a CPU (issue 14): the dual-attention wrapper (the stock function over
2H query heads, [Q⁺; Q⁻] per K/V head) against the float64 reference on flex_attention and paged eager, every family
on flex_attention against its eager daGPAM outputs, and continuous batching (``generate_batch`` and
``ContinuousBatchingManager``) against ``generate``, with λ ≠ 0 and a random W⁻. GPU backends (flash, Hub kernels) are
checked by ``benchmarks/gpu_check.py`` on a GPU machine."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_gpam import ARCHITECTURES
from hf_gpam.modeling import gpam_interface
from hf_gpam.testing_utils import tiny_stock_config

from .test_decoders import backends, without_dropout
from .test_interface import ToyGpamAttention, qkv, reference_for
from .utils import DECODER_TYPES, gpam_model, head_class, main_output, model_inputs, randomise_gpam, sharpen_attention


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gpam_causal(model_type, implementation, **overrides):
    model = gpam_model(model_type, attn_implementation=implementation, **overrides)
    without_dropout(model.config)
    return randomise_gpam(sharpen_attention(model))


# --- the wrapper against the float64 reference -------------------------------------------------------------------


class UnchangedPagedCache:
    """Continuous batching's paged cache as the paged eager function of 5.19-5.23 requires one (it updates the cache
    itself and refuses to run without): stores nothing, hands K and V back as given. 5.24+ ignore the keyword."""

    def update(self, key_states, value_states, layer_idx, kwargs):
        return key_states, value_states


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA-2", "MQA"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_flex_attention_wrapper_matches_the_reference(kv_heads, causal):
    # forward only: torch's flex_attention has no backward on the CPU (the GPU check script trains through it)
    query, key, value = qkv(heads=4, kv_heads=kv_heads, q_len=7, k_len=7)
    module = ToyGpamAttention()
    mask = None
    if causal:
        mask = create_block_mask(lambda b, h, q, k: q >= k, B=None, H=None, Q_LEN=7, KV_LEN=7, device="cpu")
    function = ALL_ATTENTION_FUNCTIONS[gpam_interface.gpam_attn_implementation("flex_attention")]
    with torch.no_grad():
        output = function(module, query, key, value, mask, scaling=8**-0.5)[0].transpose(1, 2)
    reference = reference_for(module.double(), *(t.double() for t in (query, key, value)), is_causal=causal)
    torch.testing.assert_close(output.double(), reference["output"], atol=2e-5, rtol=2e-5)


def test_dual_attention_wrapper_passes_gradients_to_the_negative_projection_and_lambda():
    # the wrapper around a stock function that has a CPU backward (paged eager): W⁻, λ, Q, K, V all get gradients
    query, key, value = qkv(heads=4, kv_heads=2, q_len=5, k_len=5, requires_grad=True)
    module = ToyGpamAttention()
    # the paged cache of 5.19-5.23 is updated per layer
    module.num_key_value_groups, module.layer_idx = 2, 0
    function = ALL_ATTENTION_FUNCTIONS[gpam_interface.gpam_attn_implementation("paged|eager")]
    output = function(module, query, key, value, None, scaling=8**-0.5, cache=UnchangedPagedCache())[0].transpose(1, 2)
    ref_inputs = [t.detach().double().requires_grad_() for t in (query, key, value)]
    reference = reference_for(module.double(), *ref_inputs)["output"]
    upstream = torch.randn_like(reference)
    got = torch.autograd.grad((output.double() * upstream).sum(), (query, key, value), retain_graph=True)
    want = torch.autograd.grad((reference * upstream).sum(), ref_inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=5e-5)
    (output.double() * upstream).sum().backward()
    assert module.gpam_q_neg.weight.grad.abs().sum() > 0 and module.gpam_lambda.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padded"])
def test_paged_eager_wrapper_matches_the_reference_and_returns_the_signed_map(masked):
    query, key, value = qkv(heads=4, kv_heads=2, q_len=5, k_len=5)
    module = ToyGpamAttention()
    # the paged cache of 5.19-5.23 is updated per layer
    module.num_key_value_groups, module.layer_idx = 2, 0
    mask = None
    if masked:
        keep = torch.ones(5, 5, dtype=torch.bool).tril()
        mask = torch.zeros(5, 5).masked_fill(~keep, torch.finfo(torch.float32).min)
    function = ALL_ATTENTION_FUNCTIONS[gpam_interface.gpam_attn_implementation("paged|eager")]
    output, p_gpam = function(module, query, key, value, mask, scaling=8**-0.5, cache=UnchangedPagedCache())
    reference = reference_for(
        module.double(), *(t.double() for t in (query, key, value)), mask=None if mask is None else mask.double()
    )
    torch.testing.assert_close(output.transpose(1, 2).double(), reference["output"], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(p_gpam.double(), reference["p_gpam"], atol=2e-5, rtol=2e-5)


def test_stock_modules_reach_the_stock_function_through_the_wrapper():
    query, key, value = qkv()
    module = ToyGpamAttention(gpam=False)
    function = ALL_ATTENTION_FUNCTIONS[gpam_interface.gpam_attn_implementation("flex_attention")]
    stock = ALL_ATTENTION_FUNCTIONS["flex_attention"]
    torch.testing.assert_close(
        function(module, query, key, value, None, scaling=0.3)[0], stock(module, query, key, value, None, scaling=0.3)[0],
        atol=0, rtol=0,
    )


def test_attention_sinks_are_refused_by_the_wrapper():
    query, key, value = qkv()
    function = ALL_ATTENTION_FUNCTIONS[gpam_interface.gpam_attn_implementation("flex_attention")]
    with pytest.raises(ValueError, match="s_aux= is not supported"):
        function(ToyGpamAttention(), query, key, value, None, s_aux=torch.zeros(4))


# --- every family on flex_attention ------------------------------------------------------------------------------


FLEX_TYPES = [t for t in [*DECODER_TYPES, "gpt2", "bart"] if head_class(t)._supports_flex_attn]


@pytest.mark.parametrize("model_type", FLEX_TYPES)
def test_flex_attention_gives_the_eager_dagpam_outputs(model_type):
    model = gpam_causal(model_type, "eager")
    inputs = model_inputs(model_type)
    with torch.no_grad():
        eager = main_output(model(**inputs))
        model.set_attn_implementation("flex_attention")
        assert model.config._attn_implementation == "flex_attention"
        assert {m.config._attn_implementation for m in model.gpam_modules()} == {"gpam_flex_attention"}
        flex = main_output(model(**inputs))
    valid = inputs["attention_mask"].bool() if model_type != "bart" else torch.ones(flex.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(flex[valid], eager[valid], atol=2e-5, rtol=2e-5)


# --- continuous batching ---------------------------------------------------------------------------------------

PROMPTS = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15, 16, 17]]
NEW_TOKENS = 6


def batch_config(model):
    # no end-of-sequence token, so every request generates exactly NEW_TOKENS tokens, on both paths
    model.generation_config.eos_token_id = None
    return GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                            pad_token_id=model.config.pad_token_id)


# a small paged cache: sized from free memory by default, which costs seconds on a CPU
SMALL_CACHE = dict(page_size=16, num_blocks=16, max_batch_tokens=64)


def greedy_tokens(model):
    config = batch_config(model)
    tokens = [model.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist() for p in PROMPTS]
    assert all(len(t) == NEW_TOKENS for t in tokens)
    return tokens


CB_CASES = [("gpt2", "sdpa"), ("llama", "sdpa"), ("qwen3", "sdpa"), ("llama", "eager")]


@pytest.mark.parametrize(("model_type", "implementation"), CB_CASES, ids=[f"{m}-{i}" for m, i in CB_CASES])
def test_generate_batch_gives_the_greedy_tokens_of_generate(model_type, implementation):
    model = gpam_causal(model_type, implementation)
    with torch.no_grad():
        expected = greedy_tokens(model)
        results = model.generate_batch(
            inputs=PROMPTS, generation_config=batch_config(model),
            continuous_batching_config=ContinuousBatchingConfig(**SMALL_CACHE),
        )
    got = [results[request].generated_tokens for request in sorted(results, key=lambda r: int(r.split("_")[-1]))]
    assert got == expected
    # continuous batching ran under the stock names it accepts ("sdpa", "paged|eager"), and daGPAM was on: the same
    # model with λ = 0 generates other tokens
    for module in model.gpam_modules():
        module.gpam_lambda.weight.data.zero_()
    with torch.no_grad():
        assert greedy_tokens(model) != expected


def test_continuous_batching_manager_gives_the_greedy_tokens_of_generate():
    model = gpam_causal("llama", "sdpa")
    with torch.no_grad():
        expected = greedy_tokens(model)
    manager = model.init_continuous_batching(
        generation_config=batch_config(model), continuous_batching_config=ContinuousBatchingConfig(**SMALL_CACHE)
    )
    manager.start()
    try:
        ids = [manager.add_request(input_ids=p, max_new_tokens=NEW_TOKENS) for p in PROMPTS]
        results = {}
        for _ in range(len(ids)):
            result = manager.get_result(timeout=60)
            assert result is not None, "no result within 60 s"
            results[result.request_id] = result.generated_tokens
    finally:
        manager.stop(block=True, timeout=60)
    assert [results[i] for i in ids] == expected


# --- serving engines that bring their own attention layer ---------------------------------------------------------


def engine_attention(module, query, key, value, attention_mask, **kwargs):
    # what vLLM's Transformers backend registers as "vllm": its own attention layer, with the model's H heads
    return torch.nn.functional.scaled_dot_product_attention(query, key, value).transpose(1, 2), None


def test_vllms_transformers_backend_is_refused_by_name(monkeypatch):
    # vLLM registers "vllm" in ALL_ATTENTION_FUNCTIONS and sets it on the config before building the model
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "vllm", engine_attention)
    refusal = "cannot run on vLLM's stock Transformers modeling backend"
    stock = head_class("llama")(tiny_stock_config("llama"))
    stock.set_attn_implementation("vllm")  # a name transformers accepts: the refusal is daGPAM's
    with pytest.raises(ValueError, match=refusal):
        gpam_model("llama", attn_implementation="vllm")
    model = gpam_model("llama")
    with pytest.raises(ValueError, match=refusal):
        model.set_attn_implementation("vllm")
    with pytest.raises(ValueError, match=refusal):
        gpam_interface.gpam_attn_implementation("vllm")
    # what vLLM asks of the class before it picks that backend: the reason, not a yes or no
    with pytest.raises(ValueError, match=rf"GpamLlamaForCausalLM {refusal}"):
        type(model).is_backend_compatible()


def test_an_engine_integration_that_registers_its_dagpam_function_is_accepted(monkeypatch):
    # hf_gpam's vLLM plugin registers gpam_vllm (2H-head vLLM layers) in the engine's processes: "vllm" then routes
    # the daGPAM modules there, and only there
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "vllm", engine_attention)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "gpam_vllm", engine_attention)
    assert gpam_interface.gpam_attn_implementation("vllm") == "gpam_vllm"
    model = gpam_model("llama", attn_implementation="vllm")
    assert model.config._attn_implementation == "vllm"
    assert {module.config._attn_implementation for module in model.gpam_modules()} == {"gpam_vllm"}
    # the stock backend is still refused where vLLM would pick it for the class
    with pytest.raises(ValueError, match="stock Transformers modeling backend"):
        type(model).is_backend_compatible()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_gpam_classes_keep_the_stock_attention_backend_flag_and_refuse_vllms_stock_backend(model_type):
    # transformers' own tests (padding-free batches among them) read _supports_attention_backend: the GPAM classes
    # keep the stock value, and refuse vLLM's stock Transformers backend through is_backend_compatible instead
    architecture = ARCHITECTURES[model_type]
    encoder_decoder = architecture.task == "seq2seq-lm"
    for stock_class, gpam_class in architecture.model_classes.items():
        assert gpam_class._supports_attention_backend == stock_class._supports_attention_backend
        reason = "is an encoder-decoder daGPAM model, which vLLM cannot serve" if encoder_decoder else (
            "stock Transformers modeling backend")
        with pytest.raises(ValueError, match=reason):
            gpam_class.is_backend_compatible()
