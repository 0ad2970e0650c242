"""Tests of hf_gpam.analysis.diagnostics, hf_gpam.analysis.plotting and the ``diagnose`` / ``compare-curves`` commands.

Every metric is checked against a value worked out by hand (or by brute force) on tiny matrices; gradient norms
against a direct autograd computation on the model's default (sdpa) backend; the CLI on tiny saved models.
"""

import copy
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, BartForConditionalGeneration, GPT2LMHeadModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from hf_gpam import GpamBartForConditionalGeneration, GpamGPT2LMHeadModel
from hf_gpam.architectures import DECODER_FAMILIES
from hf_gpam.cli import main as cli_main
from hf_gpam.analysis.diagnostics import (
    ModelDiagnostics,
    attention_components,
    attention_entropy,
    attention_sites,
    attn_implementation,
    diagnose_model,
    l1_inf_norm,
    mean_pairwise_cosine,
    negative_mass,
    rank_collapse_residual,
    rank_collapse_residual_l1inf,
)
from hf_gpam.analysis.plotting import plot_layer_curves, plot_signed_attention, plot_training_curves
from hf_gpam.testing_utils import tiny_gpam_config, tiny_stock_config


F64 = torch.float64


# ---------------------------------------------------------------------------------------------------- metrics


def test_residual_is_zero_for_rank_one_tokens():
    tokens = torch.ones(5, 1, dtype=F64) * torch.tensor([[1.0, -2.0, 3.0]], dtype=F64)  # every row the same
    assert rank_collapse_residual(tokens).item() == pytest.approx(0.0, abs=1e-12)
    assert rank_collapse_residual_l1inf(tokens).item() == pytest.approx(0.0, abs=1e-12)


def test_residual_hand_values():
    # zero-mean tokens: nothing is removed, the ratio is 1
    assert rank_collapse_residual(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])).item() == pytest.approx(1.0)
    # X = I₂: mean (½, ½), residual [[½, −½], [−½, ½]] with ‖·‖_F = 1, ‖X‖_F = √2
    assert rank_collapse_residual(torch.eye(2)).item() == pytest.approx(1 / math.sqrt(2))


def test_l1_inf_norm_hand_value():
    # ‖M‖_1 = max column abs-sum = max(4, 2); ‖M‖_∞ = max row abs-sum = max(3, 3)
    matrix = torch.tensor([[1.0, -2.0], [3.0, 0.0]], dtype=F64)
    assert l1_inf_norm(matrix).item() == pytest.approx(math.sqrt(4 * 3))


def test_l1inf_residual_finds_the_minimiser_of_a_nonconvex_case():
    # f(x) = sqrt(Σ|X_i − x| · max|X_i − x|) = sqrt(9 − x²) on [0, 1.5], sqrt((3 + x) x) above: minimum at 1.5,
    # which is neither the median (0) nor the mean (1)
    tokens = torch.tensor([[0.0], [0.0], [3.0]], dtype=F64)
    assert rank_collapse_residual_l1inf(tokens).item() == pytest.approx(math.sqrt(4.5 * 1.5) / 3, rel=1e-4)
    # without refinement the better closed-form candidate, the mean x = 1: sqrt(4 · 2) / 3
    assert rank_collapse_residual_l1inf(tokens, refine_steps=0).item() == pytest.approx(math.sqrt(8) / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_l1inf_residual_matches_brute_force_in_two_dimensions(seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(6, 2, generator=generator, dtype=F64) * torch.tensor([1.0, 2.0], dtype=F64)
    grid = torch.linspace(-5, 5, 501, dtype=F64)
    centres = torch.cartesian_prod(grid, grid)  # (G, 2)
    brute = l1_inf_norm(tokens[None] - centres[:, None, :]).min().item() / l1_inf_norm(tokens).item()
    found = rank_collapse_residual_l1inf(tokens).item()
    # the grid step bounds how far the grid minimum can sit above the true one
    assert found == pytest.approx(brute, rel=2e-3)
    assert found <= rank_collapse_residual_l1inf(tokens, refine_steps=0).item() + 1e-12


def test_cosine_hand_values():
    assert mean_pairwise_cosine(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-12)  # orthogonal tokens
    assert mean_pairwise_cosine(torch.ones(3, 5)).item() == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]])).item() == pytest.approx(1 / math.sqrt(2))


def test_padding_is_excluded_from_hidden_state_metrics():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(4, 3, generator=generator, dtype=F64)
    padded = torch.cat([real, 100 * torch.randn(2, 3, generator=generator, dtype=F64)])[None]  # (1, 6, 3)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    for metric in (rank_collapse_residual, rank_collapse_residual_l1inf, mean_pairwise_cosine):
        assert metric(padded, mask).item() == pytest.approx(metric(real).item(), rel=1e-9), metric.__name__
    with pytest.raises(ValueError, match="at least one non-padding token"):
        rank_collapse_residual(padded, torch.zeros(1, 6, dtype=torch.bool))


def test_entropy_hand_values():
    length = 5
    uniform = torch.full((1, 1, length, length), 1 / length)
    assert attention_entropy(uniform).item() == pytest.approx(math.log(length))
    one_hot = torch.eye(length)[None, None]
    assert attention_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-12)
    # causal uniform rows: row i spreads over i + 1 keys
    causal = torch.tril(torch.ones(length, length))
    causal = (causal / causal.sum(-1, keepdim=True))[None, None]
    expected = sum(math.log(i + 1) for i in range(length)) / length
    assert attention_entropy(causal).item() == pytest.approx(expected)
    # padded query rows are left out: only rows 0 and 1 count
    query_mask = torch.tensor([[True, True, False, False, False]])
    assert attention_entropy(causal, query_mask).item() == pytest.approx((0 + math.log(2)) / 2)


def test_entropy_is_per_head():
    maps = torch.stack([torch.full((3, 3), 1 / 3), torch.eye(3)])[None]  # (1, 2, 3, 3)
    assert attention_entropy(maps).tolist() == pytest.approx([math.log(3), 0.0])


def test_negative_mass_hand_values():
    # row 1: |−0.5| of a total 2.0; row 2: no negative weight
    maps = torch.tensor([[[[1.5, -0.5], [0.3, 0.7]]]])
    assert negative_mass(maps).item() == pytest.approx((0.25 + 0.0) / 2)
    assert negative_mass(torch.softmax(torch.randn(1, 2, 4, 4), -1)).tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------------------- model diagnostics


def _gpt2(gpam: bool, **overrides):
    torch.manual_seed(0)
    if gpam:
        config = tiny_gpam_config("gpt2", gpam_lambda_init=0.5, gpam_negative_init="normal", **overrides)
        return GpamGPT2LMHeadModel(config).eval()
    return GPT2LMHeadModel(tiny_stock_config("gpt2", **overrides)).eval()


def _bart(gpam: bool):
    torch.manual_seed(0)
    if gpam:
        config = tiny_gpam_config("bart", gpam_lambda_init=0.5, gpam_negative_init="normal")
        return GpamBartForConditionalGeneration(config).eval()
    return BartForConditionalGeneration(tiny_stock_config("bart")).eval()


def _batch(length=9, pad_from=6, low=3):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(low, 90, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, pad_from:] = 0
    return ids, mask


def test_gpt2_gradient_norms_match_direct_autograd():
    model = _gpt2(gpam=True)
    ids, mask = _batch()
    backend = model.config._attn_implementation
    result = diagnose_model(model, ids, mask)
    # independent: the default sdpa backend, gradients taken directly with autograd
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    width = model.config.n_embd
    for layer, block in enumerate(model.transformer.h):
        grad_c_attn, grad_q_neg = torch.autograd.grad(
            loss, [block.attn.c_attn.weight, block.attn.gpam_q_neg.weight], retain_graph=True
        )
        stats = result.attention[layer]
        assert (stats.layer, stats.kind, stats.is_gpam) == (layer, "self", True)
        assert stats.query_grad_norm == pytest.approx(grad_c_attn[:, :width].norm().item(), rel=1e-4)
        assert stats.key_grad_norm == pytest.approx(grad_c_attn[:, width : 2 * width].norm().item(), rel=1e-4)
        assert stats.q_neg_grad_norm == pytest.approx(grad_q_neg.norm().item(), rel=1e-4)
        assert stats.lambda_pos == stats.lambda_neg == [0.5] * model.config.n_head
    # the measurement leaves no gradients behind and restores the backend
    assert all(p.grad is None for p in model.parameters())
    assert model.config._attn_implementation == backend


def test_bart_gradient_norms_match_direct_autograd():
    model = _bart(gpam=True)
    ids, mask = _batch()
    result = diagnose_model(model, ids, mask)
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    sites = attention_sites(model)
    assert [(s.stack, s.kind) for s in sites].count(("decoder", "cross")) == model.config.decoder_layers
    for site, stats in zip(sites, result.attention):
        grad_q, grad_k, grad_neg = torch.autograd.grad(
            loss, [site.module.q_proj.weight, site.module.k_proj.weight, site.module.gpam_q_neg.weight],
            retain_graph=True,
        )
        assert (stats.stack, stats.layer, stats.kind) == (site.stack, site.layer, site.kind)
        assert stats.query_grad_norm == pytest.approx(grad_q.norm().item(), rel=1e-4)
        assert stats.key_grad_norm == pytest.approx(grad_k.norm().item(), rel=1e-4)
        assert stats.q_neg_grad_norm == pytest.approx(grad_neg.norm().item(), rel=1e-4)


def test_hidden_state_metrics_are_computed_on_block_outputs_without_padding():
    model = _gpt2(gpam=True)
    ids, mask = _batch()
    result = diagnose_model(model, ids, mask)
    # independent: hidden states returned by the model (all but the last, which GPT-2 returns after ln_f)
    outputs = model(ids, attention_mask=mask, output_hidden_states=True)
    depths = [h for h in result.hidden_states if h.stack == "decoder"]
    assert len(depths) == model.config.n_layer + 1
    for depth in depths[:-1]:
        hidden = outputs.hidden_states[depth.depth]
        hidden = hidden.detach()
        per_sequence = [rank_collapse_residual(hidden[0]), rank_collapse_residual(hidden[1, :6])]
        assert depth.residual_fro == pytest.approx(float(sum(per_sequence) / 2), rel=1e-5)
        cosines = [mean_pairwise_cosine(hidden[0]), mean_pairwise_cosine(hidden[1, :6])]
        assert depth.mean_cosine == pytest.approx(float(sum(cosines) / 2), rel=1e-4, abs=1e-6)


def test_attention_statistics_use_the_signed_map():
    model = _gpt2(gpam=True)
    ids, mask = _batch()
    result = diagnose_model(model, ids, mask)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        maps = model(ids, attention_mask=mask, output_attentions=True).attentions
    query_mask = mask.bool()
    for layer, probs in enumerate(maps):
        assert result.attention[layer].entropy == pytest.approx(attention_entropy(probs, query_mask).mean().item())
        assert result.attention[layer].negative_mass == pytest.approx(negative_mass(probs, query_mask).mean().item())


def test_stock_model_has_no_gpam_fields_and_zero_negative_mass():
    result = diagnose_model(_gpt2(gpam=False), *_batch())
    assert not result.is_gpam
    for stats in result.attention:
        assert stats.q_neg_grad_norm is None and stats.lambda_pos is None
        assert stats.negative_mass == 0.0
        assert stats.query_grad_norm > 0


def test_result_round_trips_through_json():
    result = diagnose_model(_bart(gpam=True), *_batch())
    restored = ModelDiagnostics.from_dict(json.loads(json.dumps(result.to_dict())))
    assert restored == result
    assert restored.stacks() == ["encoder", "decoder"]
    assert len(restored.curve("lambda", "decoder", "cross")) == 2
    with pytest.raises(ValueError, match="unknown metric"):
        restored.curve("perplexity")


def test_diagnose_rejects_unsupported_and_too_long_inputs():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        diagnose_model(bert, torch.ones(1, 4, dtype=torch.long))
    model = _gpt2(gpam=True)
    with pytest.raises(ValueError, match="exceeds the model's maximum of 64 positions"):
        diagnose_model(model, torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one non-padding token"):
        diagnose_model(model, torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("kind", ["gpt2-self", "bart-cross", "bart-encoder"])
def test_attention_components_reproduce_the_model_maps(kind):
    ids, mask = _batch()
    if kind == "gpt2-self":
        model, stack, layer, site_kind, attribute = _gpt2(gpam=True), "decoder", 1, "self", "attentions"
    elif kind == "bart-cross":
        model, stack, layer, site_kind, attribute = _bart(gpam=True), "decoder", 1, "cross", "cross_attentions"
    else:
        model, stack, layer, site_kind, attribute = _bart(gpam=True), "encoder", 0, "self", "encoder_attentions"
    maps = attention_components(model, ids, mask, stack=stack, layer=layer, kind=site_kind)
    model.set_attn_implementation("eager")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        outputs = model(ids, attention_mask=mask, labels=labels, output_attentions=True)
    expected = getattr(outputs, attribute)[layer].to(F64)
    assert torch.allclose(maps["p_gpam"], expected, atol=1e-5)
    # P_G = (1 + λ)P⁺ − λP⁻ with the module's λ
    lam = maps["lambda_pos"].to(F64).view(1, -1, 1, 1)
    assert torch.allclose(maps["p_gpam"], (1 + lam) * maps["p_pos"] - lam * maps["p_neg"], atol=1e-12)
    assert torch.allclose(maps["p_neg"].sum(-1), torch.ones_like(maps["p_neg"].sum(-1)))


def test_attention_components_of_a_softmax_module():
    maps = attention_components(_gpt2(gpam=False), *_batch(), layer=0)
    assert maps["p_neg"] is None and maps["lambda_pos"] is None
    assert torch.equal(maps["p_gpam"], maps["p_pos"])
    with pytest.raises(ValueError, match="no attention module decoder.5.self"):
        attention_components(_gpt2(gpam=False), *_batch(), layer=5)


def test_attention_components_include_a_lora_delta_on_w_neg():
    peft = pytest.importorskip("peft")
    ids, mask = _batch()
    # init_lora_weights=False: a non-zero delta on W⁻ from the start; λ trained as a modules_to_save copy
    config = peft.LoraConfig(r=4, lora_alpha=32, target_modules=["gpam_q_neg"], modules_to_save=["gpam_lambda"],
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(_gpt2(gpam=True), config).eval()
    adapted = attention_components(peft_model, ids, mask, layer=1)

    # W⁻ + delta as one plain weight: what P⁻ must be
    merged = copy.deepcopy(peft_model).merge_and_unload()
    assert not hasattr(merged, "peft_config")
    expected = attention_components(merged, ids, mask, layer=1)
    torch.testing.assert_close(adapted["p_neg"], expected["p_neg"], atol=1e-6, rtol=0)
    torch.testing.assert_close(adapted["p_gpam"], expected["p_gpam"], atol=1e-6, rtol=0)
    # and the signed map the adapted model itself returns
    with attn_implementation(peft_model, "eager"), torch.no_grad():
        returned = peft_model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[1]
    torch.testing.assert_close(adapted["p_gpam"], returned.to(F64), atol=1e-5, rtol=0)

    # the base W⁻ alone gives a visibly different P⁻: the test would catch a delta that is ignored
    with peft_model.disable_adapter():
        without_delta = attention_components(peft_model, ids, mask, layer=1)
    assert (adapted["p_neg"] - without_delta["p_neg"]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ decoder families


def _decoder(model_type: str, **gpam_fields):
    torch.manual_seed(0)
    config = tiny_gpam_config(model_type, gpam_lambda_init=0.5, gpam_negative_init="normal", **gpam_fields)
    return AutoModelForCausalLM.from_config(config).eval()


def _query_key_weight_grads(model_type: str, attention, loss):
    """∂L/∂W_Q and ∂L/∂W_K sliced by hand from each family's stock forward (independent of the table's layout)."""
    config = attention.config
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    if model_type == "phi3":
        # qkv_proj output rows: [Q (H·D); K (H_kv·D); V (H_kv·D)]
        (grad,) = torch.autograd.grad(loss, [attention.qkv_proj.weight], retain_graph=True)
        q_width, kv_width = heads * attention.head_dim, kv_heads * attention.head_dim
        return grad[:q_width], grad[q_width : q_width + kv_width]
    if model_type == "gpt_neox":
        # query_key_value output rows viewed (H, 3·D) and chunked into q, k, v per head
        (grad,) = torch.autograd.grad(loss, [attention.query_key_value.weight], retain_graph=True)
        per_head = grad.view(heads, 3 * attention.head_size, -1)
        return per_head[:, : attention.head_size], per_head[:, attention.head_size : 2 * attention.head_size]
    return torch.autograd.grad(loss, [attention.q_proj.weight, attention.k_proj.weight], retain_graph=True)


@pytest.mark.parametrize("model_type", list(DECODER_FAMILIES))
def test_decoder_family_maps_and_gradients(model_type):
    """Every decoder family: attention_components gives the module's own P_G (GQA, fused qkv, partial rotary, q/k
    norms, sliding windows, soft-capping), and the query / key gradient norms are the right weight blocks."""
    model = _decoder(model_type)
    ids, mask = _batch()
    result = diagnose_model(model, ids, mask, l1inf_refine_steps=5)
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    sites = attention_sites(model)
    assert [(s.stack, s.layer, s.kind) for s in sites] == [("decoder", 0, "self"), ("decoder", 1, "self")]
    assert len(result.curve("residual_fro")) == 3
    for site, stats in zip(sites, result.attention):
        grad_q, grad_k = _query_key_weight_grads(model_type, site.module, loss)
        (grad_neg,) = torch.autograd.grad(loss, [site.module.gpam_q_neg.weight], retain_graph=True)
        assert stats.query_grad_norm == pytest.approx(grad_q.norm().item(), rel=1e-4)
        assert stats.key_grad_norm == pytest.approx(grad_k.norm().item(), rel=1e-4)
        assert stats.q_neg_grad_norm == pytest.approx(grad_neg.norm().item(), rel=1e-4)
        assert stats.negative_mass is not None and stats.lambda_pos == [0.5] * model.config.num_attention_heads

    with attn_implementation(model, "eager"), torch.no_grad():
        returned = model(ids, attention_mask=mask, output_attentions=True).attentions
    for layer in range(model.config.num_hidden_layers):
        maps = attention_components(model, ids, mask, layer=layer)
        torch.testing.assert_close(maps["p_gpam"], returned[layer].to(F64), atol=2e-6, rtol=0)
        lam = maps["lambda_pos"].to(F64).view(1, -1, 1, 1)
        torch.testing.assert_close(maps["p_gpam"], (1 + lam) * maps["p_pos"] - lam * maps["p_neg"], atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", ["relative", "literal"])
def test_attention_components_follow_the_rope_variant(variant):
    # the two RoPE variants build different Q⁻ from the same weights; each recomputation matches its own model
    # large initial weights: peaked maps, so that the two Q⁻ give visibly different P⁻
    model = _decoder("llama", gpam_rope_variant=variant, initializer_range=0.5)
    other = _decoder("llama", gpam_rope_variant="literal" if variant == "relative" else "relative",
                     initializer_range=0.5)
    ids, mask = _batch()
    maps = attention_components(model, ids, mask, layer=1)
    with attn_implementation(model, "eager"), torch.no_grad():
        returned = model(ids, attention_mask=mask, output_attentions=True).attentions[1]
    torch.testing.assert_close(maps["p_gpam"], returned.to(F64), atol=2e-6, rtol=0)
    assert (maps["p_neg"] - attention_components(other, ids, mask, layer=1)["p_neg"]).abs().max() > 1e-3


def test_stock_decoder_family_is_diagnosed_as_softmax():
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_stock_config("qwen3")).eval()
    result = diagnose_model(model, *_batch(), l1inf_refine_steps=0)
    assert not result.is_gpam and result.curve("negative_mass") == [0.0, 0.0]
    assert all(v > 0 for v in result.curve("query_grad_norm"))
    maps = attention_components(model, *_batch(), layer=0)
    assert maps["p_neg"] is None and torch.equal(maps["p_gpam"], maps["p_pos"])


# --------------------------------------------------------------------------------------------------- plotting


def _non_empty_png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_plots_are_written(tmp_path):
    ids, mask = _batch()
    gpam, stock = _gpt2(gpam=True), _gpt2(gpam=False)
    results = {"daGPAM": [diagnose_model(gpam, ids, mask)] * 2, "softmax": diagnose_model(stock, ids, mask).to_dict()}
    assert _non_empty_png(plot_layer_curves(results, str(tmp_path / "a" / "curves.png"), metrics=("lambda",)))
    maps = attention_components(gpam, ids, mask, layer=1)
    assert _non_empty_png(plot_signed_attention(maps, str(tmp_path / "maps.png"), head=2, sequence=1))
    log = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "eval_loss": 2.5}]
    assert _non_empty_png(plot_training_curves({"run": log}, str(tmp_path / "train.png")))
    with pytest.raises(ValueError, match="unknown metric"):
        plot_layer_curves(results, str(tmp_path / "x.png"), metrics=("accuracy",))
    with pytest.raises(ValueError, match="head=4 is out of range"):
        plot_signed_attention(maps, str(tmp_path / "x.png"), head=4)
    with pytest.raises(ValueError, match="none of the runs logged"):
        plot_training_curves({"run": log}, str(tmp_path / "x.png"), metrics=("bleu",))


# -------------------------------------------------------------------------------------------------------- CLI

CLI_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention maps may carry negative weights.",
    "A short line.",
]


def _save_tiny(folder, model_type, gpam):
    from hf_gpam.data import train_byte_level_bpe

    corpus = CLI_TEXTS * 20 + ["the cat sat on the mat and looked at the dog"] * 20
    tokenizer = train_byte_level_bpe(corpus, vocab_size=300, model_type=model_type)
    torch.manual_seed(0)
    if model_type == "gpt2":
        overrides = dict(vocab_size=300, n_positions=32)
        if gpam:
            model = GpamGPT2LMHeadModel(tiny_gpam_config("gpt2", gpam_lambda_init=0.3, **overrides))
        else:
            model = GPT2LMHeadModel(tiny_stock_config("gpt2", **overrides))
    else:
        model = GpamBartForConditionalGeneration(tiny_gpam_config("bart", vocab_size=300, gpam_lambda_init=0.3))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny GPAM GPT-2 (saved with its remote code) and a tiny stock GPT-2, each with a BPE tokenizer."""
    root = tmp_path_factory.mktemp("diagnose_models")
    return {
        "gpam_gpt2": _save_tiny(root / "gpam_gpt2", "gpt2", gpam=True),
        "stock_gpt2": _save_tiny(root / "stock_gpt2", "gpt2", gpam=False),
    }


def test_diagnose_cli_writes_json_and_pngs(saved_models, tmp_path, capsys):
    output_dir = tmp_path / "out"
    argv = ["diagnose", saved_models["gpam_gpt2"], saved_models["stock_gpt2"],
            "--text", *CLI_TEXTS, "--output_dir", str(output_dir), "--head", "1"]
    assert cli_main(argv) == 0
    report = json.loads((output_dir / "diagnostics.json").read_text())
    assert report["texts"] == CLI_TEXTS
    models = report["models"]
    assert list(models) == ["gpam_gpt2", "stock_gpt2"]
    assert models["gpam_gpt2"]["is_gpam"] and not models["stock_gpt2"]["is_gpam"]
    assert models["gpam_gpt2"]["model_type"] == "gpam_gpt2"
    # the three inputs have different lengths: only real tokens are counted
    assert models["gpam_gpt2"]["num_tokens"] == models["stock_gpt2"]["num_tokens"] < 3 * 32
    result = ModelDiagnostics.from_dict(models["gpam_gpt2"])
    assert result.stacks() == ["decoder"]
    assert len(result.curve("residual_fro")) == 3
    assert result.curve("lambda") == pytest.approx([0.3, 0.3])
    assert all(v > 0 for v in result.curve("query_grad_norm") + result.curve("q_neg_grad_norm"))
    pngs = sorted(p.name for p in output_dir.glob("*.png"))
    assert pngs == ["attention_gpam_gpt2_decoder1_head1.png", "attention_stock_gpt2_decoder1_head1.png",
                    "layers_decoder.png"]
    assert all(_non_empty_png(output_dir / name) for name in pngs)
    printed = capsys.readouterr().out
    assert "gpam_gpt2" in printed and "stock_gpt2" in printed and "daGPAM" in printed


@pytest.mark.slow
def test_diagnose_cli_encoder_decoder(tmp_path):
    folder = _save_tiny(tmp_path / "gpam_bart", "bart", gpam=True)
    output_dir = tmp_path / "out"
    argv = ["diagnose", folder, "--text", *CLI_TEXTS, "--output_dir", str(output_dir), "--stack", "encoder"]
    assert cli_main(argv) == 0
    result = ModelDiagnostics.from_dict(json.loads((output_dir / "diagnostics.json").read_text())["models"]["gpam_bart"])
    assert result.stacks() == ["encoder", "decoder"]
    assert result.curve("lambda", "decoder", "cross") == pytest.approx([0.3, 0.3])
    pngs = sorted(p.name for p in output_dir.glob("*.png"))
    assert pngs == ["attention_gpam_bart_encoder1_head0.png", "layers_decoder.png", "layers_encoder.png"]


def test_diagnose_cli_on_decoder_families(tmp_path):
    """A GPAM Llama (grouped-query, loaded through its remote code) and a stock GPT-NeoX (fused per-head qkv,
    partial rotary) side by side, end to end."""
    from transformers import GPTNeoXForCausalLM

    from hf_gpam.data import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(CLI_TEXTS * 20, vocab_size=300)
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(tiny_gpam_config("llama", vocab_size=300, gpam_lambda_init=0.3))
    neox = GPTNeoXForCausalLM(tiny_stock_config("gpt_neox", vocab_size=300))
    for folder, model in (("llama", llama), ("neox", neox)):
        model.save_pretrained(tmp_path / folder)
        tokenizer.save_pretrained(tmp_path / folder)
    output_dir = tmp_path / "out"
    argv = ["diagnose", str(tmp_path / "llama"), str(tmp_path / "neox"), "--text", *CLI_TEXTS,
            "--output_dir", str(output_dir)]
    assert cli_main(argv) == 0
    models = json.loads((output_dir / "diagnostics.json").read_text())["models"]
    gpam, stock = (ModelDiagnostics.from_dict(models[name]) for name in ("llama", "neox"))
    assert (gpam.model_type, gpam.is_gpam, stock.model_type, stock.is_gpam) == ("gpam_llama", True, "gpt_neox", False)
    for result in (gpam, stock):
        assert result.stacks() == ["decoder"] and len(result.curve("residual_fro")) == 3
        assert all(v > 0 for v in result.curve("query_grad_norm") + result.curve("key_grad_norm"))
    assert gpam.curve("lambda") == pytest.approx([0.3, 0.3]) and stock.curve("lambda") == [None, None]
    pngs = sorted(p.name for p in output_dir.glob("*.png"))
    assert pngs == ["attention_llama_decoder1_head0.png", "attention_neox_decoder1_head0.png", "layers_decoder.png"]


def test_remote_code_model_is_recognised_by_duck_typing(saved_models):
    # the GPAM folder carries its own copy of the modeling code: a different class than hf_gpam's
    remote_class = get_class_from_dynamic_module(
        "modeling_gpam_gpt2.GpamGPT2LMHeadModel", saved_models["gpam_gpt2"]
    )
    model = remote_class.from_pretrained(saved_models["gpam_gpt2"])
    assert remote_class is not GpamGPT2LMHeadModel and not isinstance(model, GpamGPT2LMHeadModel)
    result = diagnose_model(model, *_batch(length=8, pad_from=5, low=3))
    assert result.is_gpam and all(stats.is_gpam for stats in result.attention)
    assert result.curve("lambda") == pytest.approx([0.3, 0.3])


def test_read_texts_from_a_file(tmp_path):
    from argparse import Namespace

    from hf_gpam.cli.diagnose import read_texts

    text_file = tmp_path / "inputs.txt"
    text_file.write_text("\n".join(CLI_TEXTS) + "\n\n  \n")
    assert read_texts(Namespace(file=str(text_file), text=None, max_texts=32)) == CLI_TEXTS
    assert read_texts(Namespace(file=str(text_file), text=None, max_texts=2)) == CLI_TEXTS[:2]
    with pytest.raises(ValueError, match="does not exist"):
        read_texts(Namespace(file=str(tmp_path / "nope.txt"), text=None, max_texts=32))


def test_diagnose_cli_errors(saved_models, tmp_path, capsys):
    from transformers import BertConfig

    def fails(argv, message):
        assert cli_main(["diagnose", *argv, "--output_dir", str(tmp_path / "err")]) == 2
        assert message in capsys.readouterr().err

    fails([str(tmp_path / "missing"), "--text", "hi"], "does not exist")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "bert")
    fails([str(tmp_path / "bert"), "--text", "hi"], "is a 'bert' model; hf-gpam diagnose supports")
    fails([saved_models["gpam_gpt2"], "--text", "   "], "holds no text")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    fails([saved_models["gpam_gpt2"], "--file", str(empty)], "holds no text")
    fails([saved_models["gpam_gpt2"], "--text", "word " * 200], "accepts (32 positions)")
    fails([saved_models["gpam_gpt2"], "--text", "hi", "--layer", "7"], "--layer 7 is out of range")
    assert not (tmp_path / "err" / "diagnostics.json").exists()


def test_compare_curves_cli(tmp_path, capsys):
    for name, losses in [("softmax", [4.0, 3.0, 2.5]), ("dagpam", [4.0, 2.8, 2.2])]:
        run = tmp_path / name / "checkpoint-30"
        run.mkdir(parents=True)
        log = [{"step": 10 * (i + 1), "loss": loss} for i, loss in enumerate(losses)]
        log.append({"step": 30, "eval_loss": losses[-1] + 0.1})
        (run / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    output = tmp_path / "curves.png"
    argv = ["compare-curves", str(tmp_path / "softmax"), str(tmp_path / "dagpam"), "--output", str(output)]
    assert cli_main(argv) == 0
    assert _non_empty_png(output)
    printed = capsys.readouterr().out
    assert "2.2000" in printed and "2.6000" in printed  # last loss of dagpam, best eval_loss of softmax
    assert cli_main(["compare-curves", str(tmp_path), "--output", str(output)]) == 2
    assert "no trainer_state.json" in capsys.readouterr().err
    assert cli_main(["compare-curves", str(tmp_path / "nowhere"), "--output", str(output)]) == 2
    assert "is not a folder" in capsys.readouterr().err
