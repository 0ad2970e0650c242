"""``gpam_rope_variant``: where Q⁻ meets rotary position embeddings (issue 9, point 2).

"relative" builds Q⁻ = RoPE(ReLU(Q̃)W⁻) from the unrotated query, so P⁻ depends on positions through i − j only;
"literal" takes the rotated query, Q⁻ = ReLU(RoPE(Q̃))W⁻, so shifting every position changes P⁻. P⁻ is read here
from the inputs the eager kernel receives (Q⁻, K, scaling, mask), so the property tests look at P⁻ itself, not at a
model output where P⁺ and the rest of the network could hide it. Then the contract with the relative variant: λ = 0
identity, eager == sdpa, cache == no cache, packed sequences, gradient checkpointing, LoRA on W⁻, compile.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F

import hf_gpam
from hf_gpam.modeling import gpam_interface, gpam_rope
from hf_gpam.modeling.gpam_interface import gpam_eager_attention_forward
from hf_gpam.modeling.gpam_rope import rotate_query
from hf_gpam.testing_utils import tiny_gpam_config

from .utils import DECODER_TYPES, gpam_head_class, gpam_model, main_output, model_inputs, sharpen_attention, stock_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# every decoder family with rotary embeddings; GPT-NeoX and Phi-3 rotate half of each head (partial rotary)
ROTARY_TYPES = [t for t in DECODER_TYPES if t != "opt"]
EAGER_ONLY = {"gemma2"}
SHIFT = 11


def randomised(model, lambda_value=0.8):
    """Sharpened q/k, a random W⁻ and a large λ: daGPAM, and P⁻ in particular, visibly shapes the outputs."""
    sharpen_attention(model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.gpam_modules():
            weight = module.gpam_q_neg.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
            module.gpam_lambda.weight.fill_(lambda_value)
    return model


def rope_model(model_type, variant, attn_implementation="eager", **overrides):
    return randomised(gpam_model(model_type, attn_implementation, gpam_rope_variant=variant, **overrides))


def negative_maps(model, monkeypatch, **inputs) -> list[torch.Tensor]:
    """P⁻ = softmax(Q⁻Kᵀs + M) of every daGPAM layer, recomputed from what the eager kernel receives."""
    maps = []
    kernel = gpam_interface.eager_gpam_attention

    def recording_kernel(query, key, value, query_neg, *args, scaling, attention_mask=None, **kwargs):
        scores = query_neg @ key.transpose(-1, -2) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        maps.append(F.softmax(scores, dim=-1))
        return kernel(query, key, value, query_neg, *args, scaling=scaling, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(gpam_interface, "eager_gpam_attention", recording_kernel)
    with torch.no_grad():
        model(**inputs)
    monkeypatch.setattr(gpam_interface, "eager_gpam_attention", kernel)
    assert len(maps) == len(model.gpam_modules())
    return maps


def shifted_positions(length=10, batch=2):
    ids = torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(length).expand(batch, length)
    return ids, positions


# --- the property that tells the variants apart ------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ROTARY_TYPES)
def test_relative_variant_negative_map_is_unchanged_when_every_position_shifts(model_type, monkeypatch):
    model = rope_model(model_type, "relative")
    ids, positions = shifted_positions()
    before = negative_maps(model, monkeypatch, input_ids=ids, position_ids=positions)
    after = negative_maps(model, monkeypatch, input_ids=ids, position_ids=positions + SHIFT)
    for layer, (p_before, p_after) in enumerate(zip(before, after)):
        torch.testing.assert_close(p_after, p_before, atol=2e-5, rtol=1e-4, msg=f"layer {layer}")
    # everything else in these models is relative too: the logits do not move either
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions).logits
        torch.testing.assert_close(model(input_ids=ids, position_ids=positions + SHIFT).logits, logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "phi3"])
def test_literal_variant_negative_map_changes_when_every_position_shifts(model_type, monkeypatch):
    model = rope_model(model_type, "literal")
    ids, positions = shifted_positions()
    before = negative_maps(model, monkeypatch, input_ids=ids, position_ids=positions)
    after = negative_maps(model, monkeypatch, input_ids=ids, position_ids=positions + SHIFT)
    # the first layer's query depends on the shift only through RoPE, so its change is RoPE entering P⁻
    assert (after[0] - before[0]).abs().max() > 1e-2


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_relative_negative_query_is_the_rotated_projection_of_the_unrotated_query(model_type):
    # Q⁻ against a direct computation: rotate ReLU(Q̃)W⁻ with the positions of Q⁺ = RoPE(Q̃)
    model = rope_model(model_type, "relative")
    module = model.gpam_modules()[0]
    rotary = model.base_model.rotary_emb
    unrotated = torch.randn(2, 4, 10, module.head_dim, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary(unrotated, torch.arange(3, 13).expand(2, 10))
    query = rotate_query(unrotated, cos, sin)
    if model_type == "gpt_neox":
        # partial rotary: half of each head is rotated, the other half passes through untouched
        assert cos.shape[-1] == module.head_dim // 2
        torch.testing.assert_close(query[..., cos.shape[-1]:], unrotated[..., cos.shape[-1]:])
    with torch.no_grad():
        got = gpam_rope.negative_query(module, query, position_embeddings=(cos, sin))
        want = rotate_query(module.gpam_q_neg(F.relu(unrotated)), cos, sin)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rotary_dims", [8, 4], ids=["full", "partial"])
def test_rotation_matches_stock_rope_and_its_inverse_undoes_it(rotary_dims):
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 5, 8, dtype=torch.float64, generator=generator)
    angles = torch.randn(2, 5, rotary_dims // 2, dtype=torch.float64, generator=generator) * 3
    angles = torch.cat((angles, angles), dim=-1)
    # a YaRN-style attention factor scales cos and sin alike; the inverse must undo it too
    for factor in (1.0, 1.3):
        cos, sin = angles.cos() * factor, angles.sin() * factor
        rotated = rotate_query(query, cos, sin)
        torch.testing.assert_close(rotated, apply_rotary_pos_emb(query, query, cos, sin)[0])
        torch.testing.assert_close(rotate_query(rotated, cos, sin, inverse=True), query)


# --- the field ----------------------------------------------------------------------------------------------------


def test_field_is_validated_saved_and_reloaded(tmp_path):
    # the default, chosen in docs/rope.md
    assert tiny_gpam_config("llama").gpam_rope_variant == "relative"
    with pytest.raises(ValueError, match=r"gpam_rope_variant='absolute' is not one of 'relative', 'literal'"):
        tiny_gpam_config("llama", gpam_rope_variant="absolute")
    model = rope_model("llama", "literal")
    model.save_pretrained(tmp_path)
    assert '"gpam_rope_variant": "literal"' in (tmp_path / "config.json").read_text()
    reloaded = type(model).from_pretrained(tmp_path, attn_implementation="eager")
    assert {m.gpam_rope_variant for m in reloaded.gpam_modules()} == {"literal"}
    inputs = model_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(main_output(reloaded(**inputs)), main_output(model(**inputs)))


@pytest.mark.parametrize("model_type", ["opt", "gpt2", "bart"])
def test_families_without_rope_ignore_the_field(model_type):
    inputs = model_inputs(model_type)
    outputs = {}
    for variant in ("relative", "literal"):
        torch.manual_seed(0)
        model = randomised(gpam_model(model_type, "eager", gpam_rope_variant=variant))
        assert not any(m.gpam_rotary for m in model.gpam_modules())
        with torch.no_grad():
            outputs[variant] = main_output(model(**inputs))
    torch.testing.assert_close(outputs["relative"], outputs["literal"], atol=0, rtol=0)


def test_relative_without_rotary_embeddings_is_refused_clearly():
    module = rope_model("llama", "relative").gpam_modules()[0]
    query = torch.randn(1, 4, 3, 8)
    key = value = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"gpam_rope_variant='relative' needs the rotary embeddings \(cos, sin\)"):
        gpam_eager_attention_forward(module, query, key, value, None)
    # the literal variant needs nothing more than the rotated query
    module.gpam_rope_variant = "literal"
    assert gpam_eager_attention_forward(module, query, key, value, None)[0].shape == (1, 3, 4, 8)


# --- the contract, with the relative variant ----------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "phi3"])
def test_relative_patched_with_zero_lambda_gives_stock_outputs(model_type, implementation):
    inputs = model_inputs(model_type, left_padding=True)
    stock = stock_model(model_type, attn_implementation=implementation)
    with torch.no_grad():
        expected = main_output(stock(**inputs))
        patched = hf_gpam.patch_model(stock, gpam_rope_variant="relative", gpam_negative_init="normal")
        assert {m.gpam_rope_variant for m in patched.gpam_modules()} == {"relative"}
        got = main_output(patched(**inputs))
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "phi3", "gemma3_text"])
def test_relative_eager_and_sdpa_agree_and_differ_from_literal(model_type):
    inputs = model_inputs(model_type)
    valid = inputs["attention_mask"].bool()
    outputs = {}
    for variant in ("relative", "literal"):
        for implementation in ("eager", "sdpa"):
            torch.manual_seed(0)
            model = rope_model(model_type, variant, implementation)
            with torch.no_grad():
                outputs[variant, implementation] = main_output(model(**inputs))[valid]
    torch.testing.assert_close(outputs["relative", "sdpa"], outputs["relative", "eager"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs["relative", "eager"], outputs["literal", "eager"], atol=1e-3)


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_relative_cache_and_no_cache_agree(model_type):
    model = rope_model(model_type, "relative", "sdpa")
    inputs = model_inputs(model_type, left_padding=True)
    tokens = {}
    for use_cache in (True, False):
        with torch.no_grad():
            tokens[use_cache] = model.generate(
                **inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=use_cache,
                pad_token_id=model.config.pad_token_id,
            )
    torch.testing.assert_close(tokens[True], tokens[False], atol=0, rtol=0)
    # the last step's logits, one token at a time against the whole sequence at once
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_relative_packed_sequences_give_the_separate_sequences_logits(implementation):
    model = rope_model("llama", "relative", implementation)
    generator = torch.Generator().manual_seed(2)
    first, second = torch.randint(3, 90, (1, 5), generator=generator), torch.randint(3, 90, (1, 7), generator=generator)
    # one row, positions restarting at the second sequence: without a cache (as in training) transformers detects
    # the packing from position_ids and masks across the boundary; each token's Q⁻ is rotated with its own position
    packed_ids = torch.cat((first, second), dim=1)
    positions = torch.cat((torch.arange(5), torch.arange(7)))[None]
    with torch.no_grad():
        packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits
        torch.testing.assert_close(packed[:, :5], model(input_ids=first).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 5:], model(input_ids=second).logits, atol=1e-5, rtol=1e-5)


def test_relative_gradient_checkpointing_gives_the_same_loss_and_gradients():
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(4))
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = rope_model("llama", "relative", "sdpa", attention_dropout=0.0).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[checkpointing] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if "gpam_" in n}
    torch.testing.assert_close(results[True][0], results[False][0])
    assert results[False][1]
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_relative_lora_on_the_negative_projection_takes_part():
    model = rope_model("llama", "relative", "sdpa")
    inputs = model_inputs("llama")
    with torch.no_grad():
        base = main_output(model(**inputs)).clone()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["gpam_q_neg"], init_lora_weights=False)).eval()
    with torch.no_grad():
        adapted = main_output(peft_model(**inputs))
        with peft_model.disable_adapter():
            torch.testing.assert_close(main_output(peft_model(**inputs)), base, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(adapted, base, atol=1e-4)


@pytest.mark.slow
def test_relative_traced_training_step_has_no_graph_break():
    # fullgraph=True raises on any graph break; aot_eager traces forward and backward without code generation.
    # Slow tier: the default run traces Llama and Qwen3 with the default variant ("relative") in
    # tests/test_decoders.py::test_traced_training_step_has_no_graph_break; this one pins the variant explicitly
    torch._dynamo.reset()
    config = tiny_gpam_config("llama", gpam_rope_variant="relative", gpam_lambda_init=0.3, attention_dropout=0.0)
    ids = torch.randint(3, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    losses, grads = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = gpam_head_class("llama")(config).train()

        def loss_of(input_ids):
            return model(input_ids=input_ids, labels=input_ids).loss

        step = torch.compile(loss_of, fullgraph=True, backend="aot_eager") if compiled else loss_of
        loss = step(ids)
        loss.backward()
        losses[compiled], grads[compiled] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if "gpam_" in n}
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-5)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)



# --- the rotary layout: which dims RoPE rotates together (issue 13, point 7) -------------------------------------


def cohere_model(variant):
    """A tiny stock Cohere (interleaved rotary pairs) patched with allow_untested, randomised."""
    from transformers import CohereConfig, CohereForCausalLM

    config = CohereConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=96, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        attn_implementation="eager",
    )
    model = CohereForCausalLM(config).eval()
    return randomised(hf_gpam.patch_model(model, allow_untested=True, gpam_rope_variant=variant))


def test_every_rope_family_of_the_table_rotates_half_pairs():
    for model_type in ROTARY_TYPES:
        model = gpam_model(model_type, "eager")
        assert {module.gpam_rotary_layout for module in model.gpam_modules()} == {"half"}, model_type


def test_interleaved_rotary_is_detected_and_its_negative_map_stays_relative(monkeypatch):
    # Cohere rotates pairs (2i, 2i + 1); undoing it as (i, i + D/2) gave Q⁻ a relative error of 1.22 in release 0.2
    model = cohere_model("relative")
    assert {module.gpam_rotary_layout for module in model.gpam_modules()} == {"interleaved"}
    ids, positions = shifted_positions()
    before = negative_maps(model, monkeypatch, input_ids=ids, position_ids=positions)
    after = negative_maps(model, monkeypatch, input_ids=ids, position_ids=positions + SHIFT)
    for layer, (p_before, p_after) in enumerate(zip(before, after)):
        torch.testing.assert_close(p_after, p_before, atol=2e-5, rtol=1e-4, msg=f"layer {layer}")
    # the same undone with the wrong layout is not relative: the property above can fail
    for module in model.gpam_modules():
        module.gpam_rotary_layout = "half"
    wrong = negative_maps(model, monkeypatch, input_ids=ids, position_ids=positions + SHIFT)
    assert (wrong[0] - before[0]).abs().max() > 1e-2


def test_layout_detection_reads_the_stock_rotation_and_refuses_an_unknown_one(monkeypatch):
    from transformers.models.cohere import modeling_cohere
    from transformers.models.llama import modeling_llama

    assert gpam_rope.rotary_layout(modeling_llama.LlamaAttention, 8) == "half"
    assert gpam_rope.rotary_layout(modeling_cohere.CohereAttention, 8) == "interleaved"

    class OddAttention(modeling_cohere.CohereAttention):
        pass

    # a rotation that pairs dims in neither way
    monkeypatch.setattr(modeling_cohere, "apply_rotary_pos_emb", lambda q, k, cos, sin: (q.flip(-1) * cos, k))
    assert gpam_rope.rotary_layout(OddAttention, 8) is None
    monkeypatch.setattr(gpam_rope, "_ROTARY_LAYOUTS", {})
    from hf_gpam.modeling import gpam_attention

    monkeypatch.setattr(gpam_attention, "rotary_layout", lambda cls, head_dim: None)
    with pytest.raises(ValueError, match="matches none of the layouts.*gpam_rope_variant='literal'"):
        cohere_model("relative")
    # the literal reading needs no inverse rotation
    assert len(cohere_model("literal").gpam_modules()) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inverse_rotation_runs_in_float32_under_half_precision(dtype):
    model = rope_model("llama", "relative")
    module = model.gpam_modules()[0]
    generator = torch.Generator().manual_seed(5)
    length = 32
    angles = torch.rand(1, length, 4, generator=generator, dtype=torch.float64) * 40
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    unrotated = torch.randn(1, 4, length, 8, generator=generator, dtype=torch.float64) * 3
    cos, sin = cos.to(dtype), sin.to(dtype)
    query = rotate_query(unrotated, cos.double(), sin.double()).to(dtype)
    # reference: the same half-precision inputs (query, angles, W⁻), every step in float64
    module.to(dtype)
    weight = module.gpam_q_neg.weight.double()
    cos64, sin64 = cos.double(), sin.double()
    back = rotate_query(query.double(), cos64, sin64, inverse=True)
    want = rotate_query(F.linear(F.relu(back), weight), cos64, sin64)
    got = gpam_rope.negative_query(module, query, position_embeddings=(cos, sin))
    assert got.dtype == dtype
    error = ((got.double() - want).norm() / want.norm()).item()
    # the whole computation in half precision, as release 0.2 did it
    naive = rotate_query(module.gpam_q_neg(F.relu(rotate_query(query, cos, sin, inverse=True))), cos, sin)
    naive_error = ((naive.double() - want).norm() / want.norm()).item()
    # measured: bf16 0.30 % vs 0.41 %, fp16 0.033 % vs 0.056 %; what remains is W⁻ in half precision and the cast
    assert error < 0.8 * naive_error and error < torch.finfo(dtype).eps, (error, naive_error)


@pytest.mark.parametrize("rotary", [16, 8], ids=["full-rotary", "partial-rotary"])
def test_fused_relative_negative_query_matches_the_two_rotations(rotary):
    # relative_negative_query (roll + addcmul) against the written-out RoPE(ReLU(RoPE⁻¹(Q⁺)) W⁻) of rotate_query, in
    # float64; scaled angles (a ≠ 1, YaRN-style) and a second pair of (cos, sin)
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.gpam_q_neg = torch.nn.Linear(16, 16, bias=False, dtype=torch.float64)
    query = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    for scale in (1.0, 1.3):
        angles = torch.rand(2, 5, rotary // 2, dtype=torch.float64) * 6
        cos, sin = (torch.cat((f(angles),) * 2, -1) * scale for f in (torch.cos, torch.sin))
        unrotated = rotate_query(query, cos, sin, inverse=True)
        expected = rotate_query(module.gpam_q_neg(F.relu(unrotated)), cos, sin)
        got = gpam_rope.relative_negative_query(module, query, cos, sin, torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        # the inverse really undoes the rotation (a² divided out)
        torch.testing.assert_close(rotate_query(unrotated, cos, sin), query, rtol=1e-12, atol=1e-12)
    # the same tensors changed in place: the coefficients of their old values must not be used
    cos.mul_(0.5)
    sin.mul_(0.5)
    expected = rotate_query(module.gpam_q_neg(F.relu(rotate_query(query, cos, sin, inverse=True))), cos, sin)
    got = gpam_rope.relative_negative_query(module, query, cos, sin, torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
