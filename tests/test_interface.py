"""daGPAM behind transformers' attention interface: the registered backends, the keyword policy, fall-through to
the stock functions, grouped-query heads, packed sequences, GPT-2's upcast under autocast, checkpoints of release
0.1, and the stock seams this design relies on (which must fail loudly if transformers changes them)."""

import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers import AttentionInterface, DataCollatorWithFlattening, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.gpt2 import modeling_gpt2

import hf_gpam
from hf_gpam.modeling import gpam_interface, gpam_ops
from hf_gpam.modeling.gpam_attention import GpamAttentionMixin, GpamLambda
from hf_gpam.modeling.gpam_interface import (
    GPAM_ATTN_IMPLEMENTATIONS,
    KEYWORD_POLICY,
    gpam_eager_attention_forward,
    gpam_sdpa_attention_forward,
)
from hf_gpam.modeling.gpam_ops import reference_gpam_attention

from .utils import MODEL_TYPES, gpam_head_class, gpam_model, main_output, sharpen_attention


FIXTURES = Path(__file__).parent / "fixtures" / "gpam_0_1"
BACKENDS = {"eager": gpam_eager_attention_forward, "sdpa": gpam_sdpa_attention_forward}


class ToyGpamAttention(nn.Module):
    """The attributes an attention function reads from its module, with daGPAM parameters (or without)."""

    def __init__(self, heads=4, head_dim=8, gpam=True, lam=(0.7, 0.3), is_causal=False, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.head_dim, self.is_causal, self.num_key_value_groups = head_dim, is_causal, 1
        if gpam:
            self.gpam_q_neg = nn.Linear(head_dim, head_dim, bias=False)
            self.gpam_q_neg.weight.data = torch.randn(head_dim, head_dim, generator=generator) / head_dim**0.5
            self.gpam_lambda = GpamLambda(heads, tied=False)
            self.gpam_lambda.weight.data = torch.tensor(lam)[:, None] + 0.1 * torch.arange(heads)
        self.eval()


def qkv(batch=2, heads=4, kv_heads=4, q_len=6, k_len=6, head_dim=8, seed=1, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)

    def rand(h, t):
        return torch.randn(batch, h, t, head_dim, generator=generator).requires_grad_(requires_grad)

    return rand(heads, q_len), rand(kv_heads, k_len), rand(kv_heads, k_len)


def reference_for(module, query, key, value, mask=None, is_causal=False, softcap=None):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    lambda_pos, lambda_neg = module.gpam_lambda()
    return reference_gpam_attention(
        query, key, value, module.gpam_q_neg.weight, lambda_pos, lambda_neg,
        scaling=query.shape[-1] ** -0.5, attention_mask=mask, is_causal=is_causal, softcap=softcap,
    )


def padding_mask(batch, q_len, k_len):
    keep = torch.ones(batch, k_len, dtype=torch.bool)
    keep[-1, -2:] = False
    return keep[:, None, None, :].expand(batch, 1, q_len, k_len)


# --- registration and the stock seams ------------------------------------------------------------------------


def test_backends_are_registered_with_their_mask_functions():
    for name, function in (("gpam_eager", gpam_eager_attention_forward), ("gpam_sdpa", gpam_sdpa_attention_forward)):
        assert AttentionInterface._global_mapping[name] is function
        # without a mask function transformers silently builds no mask for a registered name
        assert name in AttentionMaskInterface._global_mapping
    assert AttentionMaskInterface._global_mapping["gpam_sdpa"] is AttentionMaskInterface._global_mapping["sdpa"]
    assert AttentionMaskInterface._global_mapping["gpam_eager"] is AttentionMaskInterface._global_mapping["eager"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_backend_names_follow_the_requested_implementation(tmp_path, model_type):
    # the model config keeps the stock name (what transformers' own checks read); the daGPAM modules read the daGPAM
    # function for it through their config view
    model = gpam_model(model_type, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert {m.config._attn_implementation for m in model.gpam_modules()} == {"gpam_eager"}
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert {m.config._attn_implementation for m in model.gpam_modules()} == {"gpam_sdpa"}
    model.save_pretrained(tmp_path)
    assert "_attn_implementation" not in (tmp_path / "config.json").read_text()
    reloaded = gpam_head_class(model_type).from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "sdpa"
    assert {m.config._attn_implementation for m in reloaded.gpam_modules()} == {"gpam_sdpa"}
    eager = gpam_head_class(model_type).from_pretrained(tmp_path, attn_implementation="eager")
    assert {m.config._attn_implementation for m in eager.gpam_modules()} == {"gpam_eager"}
    # the names release 0.2 configs held are accepted for the stock ones
    eager.set_attn_implementation("gpam_sdpa")
    assert eager.config._attn_implementation == "sdpa"


def test_no_gpam_class_defines_forward():
    # the stock forwards run: a copied forward is what broke silently at transformers 5.24
    for architecture in hf_gpam.ARCHITECTURES.values():
        for gpam_class in architecture.model_classes.values():
            attention_class = gpam_class.gpam_attention_class
            own = [cls for cls in attention_class.__mro__ if cls.__module__.startswith("hf_gpam")]
            assert own and all("forward" not in vars(cls) for cls in own), attention_class
    package = Path(hf_gpam.__file__).parent / "modeling"
    for path in package.glob("*.py"):
        assert not re.search(r"^\s+def forward\(self, hidden_states", path.read_text(), re.MULTILINE), path.name


def test_stock_seams_keep_the_signatures_this_design_relies_on():
    # if one of these fails, transformers changed a seam hf_gpam plugs into: re-verify before widening the range
    parameters = list(inspect.signature(PreTrainedModel.get_correct_attn_implementation).parameters)
    assert parameters == ["self", "requested_attention", "is_init_check"]
    assert "attn_implementation" in inspect.signature(PreTrainedModel.set_attn_implementation).parameters
    for interface in (AttentionInterface, AttentionMaskInterface):
        assert list(inspect.signature(interface.register).parameters)[-2:] == ["key", "value"]
    sdpa_parameters = inspect.signature(sdpa_attention_forward).parameters
    assert list(sdpa_parameters)[:5] == ["module", "query", "key", "value", "attention_mask"]
    for architecture in hf_gpam.ARCHITECTURES.values():
        for gpam_class in architecture.model_classes.values():
            stock_attention = gpam_class.gpam_attention_class.__mro__[2]
            source = inspect.getsource(sys.modules[stock_attention.__module__])
            assert "ALL_ATTENTION_FUNCTIONS.get_interface(" in source, stock_attention
            assert callable(sys.modules[stock_attention.__module__].eager_attention_forward)


# --- the keyword policy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_unknown_keyword_is_an_error_not_swallowed(backend):
    query, key, value = qkv()
    with pytest.raises(TypeError, match="unknown keyword 'past_key_values'"):
        BACKENDS[backend](ToyGpamAttention(), query, key, value, None, past_key_values=object())


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", [n for n, p in KEYWORD_POLICY.items() if p == "refused"])
def test_refused_keywords_raise_when_set_and_pass_when_none(backend, name):
    query, key, value = qkv()
    module = ToyGpamAttention()
    with pytest.raises(ValueError, match=f"{name}= is not supported"):
        BACKENDS[backend](module, query, key, value, None, **{name: torch.zeros(4)})
    BACKENDS[backend](module, query, key, value, None, **{name: None})


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.filterwarnings("ignore:daGPAM attention \\(sdpa\\) returns no attention maps")
def test_flags_and_mask_encoded_keywords_leave_the_output_unchanged(backend):
    query, key, value = qkv()
    module = ToyGpamAttention()
    plain = BACKENDS[backend](module, query, key, value, None)[0]
    # a window of 2 on 6 tokens: the functions leave it to the mask transformers built (none here), so the output
    # stays the unwindowed one; that the mask really carries the window is tested on Mistral in test_contract.py
    extra = {
        "use_cache": True, "output_attentions": True, "output_hidden_states": True, "sliding_window": 2,
        "position_ids": torch.arange(6)[None].expand(2, 6), "shift_labels": torch.zeros(2, 6, dtype=torch.long),
        "seq_idx": torch.zeros(2, 6, dtype=torch.int32), "ignore_index": -100, "output_router_logits": True,
    }
    torch.testing.assert_close(BACKENDS[backend](module, query, key, value, None, **extra)[0], plain, atol=0, rtol=0)


def test_softcap_is_applied_to_both_maps_on_eager_and_refused_on_sdpa():
    query, key, value = (t * 3 for t in qkv())
    module = ToyGpamAttention()
    output, p_gpam = gpam_eager_attention_forward(module, query, key, value, None, softcap=2.0)
    reference = reference_for(module, query, key, value, softcap=2.0)
    torch.testing.assert_close(p_gpam.double(), reference["p_gpam"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.transpose(1, 2).double(), reference["output"], atol=1e-5, rtol=1e-5)
    uncapped = reference_for(module, query, key, value)["p_gpam"]
    assert not torch.allclose(uncapped, reference["p_gpam"], atol=1e-3), "the softcap should matter here"
    with pytest.raises(ValueError, match="softcap"):
        gpam_sdpa_attention_forward(module, query, key, value, None, softcap=2.0)


# --- fall-through: modules without daGPAM parameters are stock ----------------------------------------------


@pytest.mark.parametrize("upcast", [False, True], ids=["plain", "reorder_and_upcast"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_modules_without_gpam_parameters_get_exactly_the_stock_function(backend, upcast):
    config = hf_gpam.testing_utils.tiny_stock_config("gpt2", reorder_and_upcast_attn=upcast)
    config._attn_implementation = backend
    module = modeling_gpt2.GPT2Attention(config, layer_idx=0).eval()
    query, key, value = qkv()
    mask = torch.zeros(2, 1, 6, 6).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -1e9)
    if backend == "eager":
        got = gpam_eager_attention_forward(module, query, key, value, mask, scaling=module.scaling)
        if upcast:
            want = module._upcast_and_reordered_attn(query, key, value, mask)
        else:
            want = modeling_gpt2.eager_attention_forward(module, query, key, value, mask, scaling=module.scaling)
    else:
        got = gpam_sdpa_attention_forward(module, query, key, value, None, scaling=module.scaling)
        want = sdpa_attention_forward(module, query, key, value, None, scaling=module.scaling)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, atol=0, rtol=0)


# --- grouped-query attention ----------------------------------------------------------------------------------


# eager never adds causality itself (transformers always hands it a complete mask), so it has no causal-without-mask case
GQA_CASES = [
    (backend, causal, masked)
    for backend in BACKENDS
    for causal in (False, True)
    for masked in (False, True)
    if not (backend == "eager" and causal and not masked)
]


@pytest.mark.parametrize(
    ("backend", "causal", "masked"), GQA_CASES,
    ids=[f"{b}-{'causal' if c else 'bidirectional'}-{'padded' if m else 'nomask'}" for b, c, m in GQA_CASES],
)
def test_grouped_query_heads_share_key_value_heads_in_both_maps(backend, causal, masked):
    # 4 query heads, 2 key/value heads: Q⁻ has all 4 heads and reads the same grouped K and V as Q⁺
    query, key, value = qkv(heads=4, kv_heads=2, requires_grad=True)
    module = ToyGpamAttention(is_causal=causal)
    mask = padding_mask(2, 6, 6) if masked else None
    if causal and masked:
        mask = mask & torch.ones(6, 6, dtype=torch.bool).tril()
    if backend == "eager" and mask is not None:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    reference_causal = causal and mask is None
    output = BACKENDS[backend](module, query, key, value, mask)[0].transpose(1, 2)
    ref_inputs = [t.detach().double().requires_grad_() for t in (query, key, value)]
    ref_mask = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    reference = reference_for(module.double(), *ref_inputs, mask=ref_mask, is_causal=reference_causal)["output"]
    torch.testing.assert_close(output.double(), reference, atol=2e-5, rtol=2e-5)
    upstream = torch.randn_like(reference)
    got = torch.autograd.grad((output.double() * upstream).sum(), (query, key, value))
    want = torch.autograd.grad((reference * upstream).sum(), ref_inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("q_len", [1, 5], ids=["decode-step", "bidirectional-5"])
def test_grouped_heads_with_a_padding_row_mask_fold_queries_instead_of_copying_the_cache(monkeypatch, q_len):
    # a padded batch's decode step on a grouped-query model: the mask is one (B, 1, 1, Tk) row, and release 0.2
    # copied the whole KV cache per step (repeat_kv) to serve it; now the 2 query heads of a group share the call
    from hf_gpam.modeling import gpam_interface

    def no_copy(*args):
        raise AssertionError("repeat_kv copied K/V for a one-row mask")

    monkeypatch.setattr(gpam_interface, "repeat_kv", no_copy)
    query, key, value = qkv(heads=4, kv_heads=2, q_len=q_len, k_len=9, requires_grad=True)
    module = ToyGpamAttention(is_causal=False)
    mask = padding_mask(2, q_len, 9)
    output = gpam_sdpa_attention_forward(module, query, key, value, mask)[0].transpose(1, 2)
    ref_inputs = [t.detach().double().requires_grad_() for t in (query, key, value)]
    reference = reference_for(module.double(), *ref_inputs, mask=mask)["output"]
    torch.testing.assert_close(output.double(), reference, atol=2e-5, rtol=2e-5)
    upstream = torch.randn_like(reference)
    got = torch.autograd.grad((output.double() * upstream).sum(), (query, key, value))
    want = torch.autograd.grad((reference * upstream).sum(), ref_inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=5e-5)


# --- masks: no T×T copies on the fused path -------------------------------------------------------------------


@pytest.mark.parametrize(("q_len", "calls"), [(64, 2), (1, 1)], ids=["prefill-two-calls", "decode-one-stacked-call"])
def test_fused_path_passes_a_query_broadcast_mask_as_one_row(monkeypatch, q_len, calls):
    recorded = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, attn_mask=None, **kwargs):
        recorded.append((query.shape[-2], None if attn_mask is None else tuple(attn_mask.shape)))
        return real_sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(gpam_ops.F, "scaled_dot_product_attention", recording_sdpa)
    query, key, value = qkv(q_len=q_len, k_len=64)
    module = ToyGpamAttention()
    # transformers' padding masks for encoders: an expanded (stride 0) view of one row per sequence
    mask = padding_mask(2, q_len, 64)
    assert q_len == 1 or mask.stride(-2) == 0
    output = gpam_sdpa_attention_forward(module, query, key, value, mask)[0]
    # never a (B, 1, 2·Tq, Tk) or (B, 1, Tq, Tk) copy: the kernel gets the one shared row; the queries are stacked
    # (2·Tq rows in one call) only for a decode step
    stacked_rows = 2 * q_len if calls == 1 else q_len
    assert recorded == [(stacked_rows, (2, 1, 1, 64))] * calls
    reference = reference_for(module, query, key, value, mask=mask)["output"]
    torch.testing.assert_close(output.transpose(1, 2).double(), reference, atol=2e-5, rtol=2e-5)


# --- packed (padding-free) batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", ["gpt2"])
def test_packed_batch_gives_the_padded_batch_logits_and_gradients(model_type, implementation):
    model = sharpen_attention(gpam_model(model_type, attn_implementation=implementation, gpam_lambda_init=0.6,
                                         attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0))
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(3, 90, (n,), generator=generator).tolist() for n in (5, 9, 7)]
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s} for s in sequences])
    longest = max(map(len, sequences))
    padded_ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    padded_mask = torch.zeros_like(padded_ids)
    for row, sequence in enumerate(sequences):
        padded_ids[row, : len(sequence)] = torch.tensor(sequence)
        padded_mask[row, : len(sequence)] = 1
    padded_labels = padded_ids.masked_fill(padded_mask == 0, -100)

    def run(**inputs):
        model.zero_grad()
        # no cache, as in training: transformers detects packing from position_ids only without one
        outputs = model(**inputs, use_cache=False)
        # sum of token losses, so that both layouts weigh every token alike
        logits = outputs.logits[..., :-1, :]
        labels = inputs["labels"][..., 1:]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return outputs.logits.detach(), grads

    packed_logits, packed_grads = run(**packed)
    padded_logits, padded_grads = run(input_ids=padded_ids, attention_mask=padded_mask, labels=padded_labels)
    offset = 0
    for row, sequence in enumerate(sequences):
        torch.testing.assert_close(
            packed_logits[0, offset : offset + len(sequence)], padded_logits[row, : len(sequence)],
            atol=1e-5, rtol=1e-5,
        )
        offset += len(sequence)
    assert any("gpam_lambda" in name for name in packed_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


# --- GPT-2's reorder_and_upcast_attn under autocast -------------------------------------------------------------


def test_upcast_scores_and_softmax_stay_float32_under_bf16_autocast():
    module = ToyGpamAttention()
    module.reorder_and_upcast_attn = True
    query, key, value = (t * 4 for t in qkv(q_len=16, k_len=16))
    mask = torch.zeros(2, 1, 16, 16).masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), -1e9)
    reference = reference_for(module, query, key, value, mask=mask)["p_gpam"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, p_gpam = gpam_eager_attention_forward(module, query, key, value, mask)
        module.reorder_and_upcast_attn = False
        _, p_gpam_bf16 = gpam_eager_attention_forward(module, query, key, value, mask)
    # float32 scores and softmax: float32 accuracy, while bf16 scores are off by about 1e-2
    torch.testing.assert_close(p_gpam.double(), reference, atol=1e-5, rtol=1e-5)
    assert (p_gpam_bf16.double() - reference).abs().max() > 1e-3, "autocast should change the non-upcast scores"


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_gpt2_reorder_and_upcast_model_runs_under_bf16_autocast_with_lambda(implementation):
    model = sharpen_attention(gpam_model("gpt2", attn_implementation=implementation, gpam_lambda_init=0.8,
                                         reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True))
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(ids).logits
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), full, atol=0.1, rtol=0.1)


# --- checkpoints written by release 0.1 -----------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_checkpoints_of_release_0_1_load_and_give_the_same_logits(model_type, implementation):
    folder = FIXTURES / model_type
    expected = json.loads((folder / "expected.json").read_text())
    assert expected["hf_gpam_version"] == "0.1.0"
    model, info = gpam_head_class(model_type).from_pretrained(
        folder, attn_implementation=implementation, output_loading_info=True
    )
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    inputs = {k: torch.tensor(v) for k, v in expected["inputs"].items()}
    with torch.no_grad():
        logits = main_output(model.eval()(**inputs))
    want = torch.tensor(expected["logits"])
    valid = inputs["attention_mask"].bool() if model_type == "gpt2" else torch.ones(want.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(logits[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_gpam_names_map_from_and_to_stock_names():
    assert {gpam_interface.gpam_attn_implementation(n) for n in (None, "sdpa", "gpam_sdpa")} == {"gpam_sdpa"}
    assert gpam_interface.gpam_attn_implementation("eager") == "gpam_eager"
    assert set(GPAM_ATTN_IMPLEMENTATIONS.values()) == {"gpam_eager", "gpam_sdpa"}
    # every other backend: the dual-attention wrapper, registered under gpam_<name>
    for stock in ("flash_attention_2", "flex_attention", "paged|eager"):
        name = gpam_interface.gpam_attn_implementation(stock)
        assert name == f"gpam_{stock}" and name in ALL_ATTENTION_FUNCTIONS
        assert gpam_interface.stock_attn_implementation(name) == stock
    assert gpam_interface.stock_attn_implementation("sdpa") == "sdpa"


def test_every_attention_module_of_a_gpam_model_is_a_gpam_subclass_without_own_forward():
    model = gpam_model("bart")
    for module in model.modules():
        if isinstance(module, GpamAttentionMixin):
            assert type(module).forward is type(module).__mro__[2].forward
