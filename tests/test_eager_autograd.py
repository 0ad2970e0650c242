"""The in-place eager daGPAM autograd function: the cases tests/test_ops.py does not reach.

tests/test_ops.py compares ``eager_gpam_attention`` with the float64 reference (forward, backward, masks). Here:
dropout (the returned P_G is the dropped map and the gradients follow the same keep-mask), gradients flowing
into and out of the returned P_G (it is the node the output hangs from, as stock eager weights are), backpropagating
twice through the reused workspace, and the cases that take the composed path (torch.func transforms, ...).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import functional_call, grad, vmap

from hf_gpam.modeling import gpam_interface
from hf_gpam.modeling.gpam_eager_autograd import fast_path_refusal
from hf_gpam.modeling.gpam_ops import eager_gpam_attention, negative_query_from_weight, reference_gpam_attention

from .utils import gpam_model, model_inputs


def _inputs(batch=2, heads=3, q_len=5, k_len=6, head_dim=4, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    query, key, value = rand(batch, heads, q_len, head_dim), rand(batch, heads, k_len, head_dim), rand(
        batch, heads, k_len, head_dim
    )
    q_neg_weight = rand(head_dim, head_dim)
    lambdas = (torch.rand(2, heads, generator=generator) + 0.2).requires_grad_()
    return query, key, value, q_neg_weight, lambdas


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("dropout_p", [0.3, 0.7])
def test_dropout_drops_the_combined_map_and_backpropagates_through_the_same_mask(dropout_p):
    query, key, value, q_neg_weight, lambdas = _inputs()
    torch.manual_seed(123)
    output, p_gpam = eager_gpam_attention(
        query, key, value, negative_query_from_weight(query, q_neg_weight), lambdas[0], lambdas[1],
        scaling=0.5, dropout_p=dropout_p, is_causal=True,
    )
    reference = reference_gpam_attention(
        query, key, value, q_neg_weight, lambdas[0], lambdas[1], scaling=0.5, is_causal=True
    )
    keep = p_gpam.detach() != 0
    assert 0 < keep.float().mean() < 1, "dropout should have dropped some entries and kept others"
    # independent computation: the reference map with the same entries dropped and the kept ones rescaled
    expected_map = reference["p_gpam"] * keep / (1.0 - dropout_p)
    expected_output = expected_map @ value
    torch.testing.assert_close(p_gpam, expected_map.detach())
    torch.testing.assert_close(output, expected_output.detach())

    upstream = torch.randn_like(output)
    tensors = (query, key, value, q_neg_weight, lambdas)
    for got, want in zip(
        _grads((output * upstream).sum(), tensors), _grads((expected_output * upstream).sum(), tensors)
    ):
        torch.testing.assert_close(got, want)


def test_gradient_into_the_returned_map_is_propagated():
    query, key, value, q_neg_weight, lambdas = _inputs()
    mask = torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    output, p_gpam = eager_gpam_attention(
        query, key, value, negative_query_from_weight(query, q_neg_weight), lambdas[0], lambdas[1],
        scaling=0.5, attention_mask=mask,
    )
    reference = reference_gpam_attention(
        query, key, value, q_neg_weight, lambdas[0], lambdas[1], scaling=0.5, attention_mask=mask
    )
    map_weight = torch.randn_like(p_gpam)
    tensors = (query, key, value, q_neg_weight, lambdas)
    got = _grads(output.sum() + (p_gpam * map_weight).sum(), tensors)
    want = _grads(reference["output"].sum() + (reference["p_gpam"] * map_weight).sum(), tensors)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dropout_p", [0.0, 0.4], ids=["no-dropout", "dropout"])
def test_backpropagating_twice_through_the_same_graph_gives_the_same_gradients(dropout_p):
    # the first backward uses the saved maps as workspace; the second must recompute them, not read the leftovers
    query, key, value, q_neg_weight, lambdas = _inputs()
    tensors = (query, key, value, q_neg_weight, lambdas)
    torch.manual_seed(0)
    output, _ = eager_gpam_attention(
        query, key, value, negative_query_from_weight(query, q_neg_weight), lambdas[0], lambdas[1],
        scaling=0.5, is_causal=True, dropout_p=dropout_p, fast_path=True,
    )
    upstream = torch.randn_like(output)
    first = torch.autograd.grad(output, tensors, upstream, retain_graph=True)
    second = torch.autograd.grad(output, tensors, upstream, retain_graph=True)
    third = torch.autograd.grad(output, tensors, upstream)
    for a, b, c in zip(first, second, third):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)
    if dropout_p == 0.0:
        reference = reference_gpam_attention(
            query, key, value, q_neg_weight, lambdas[0], lambdas[1], scaling=0.5, is_causal=True
        )["output"]
        for got, want in zip(first, torch.autograd.grad(reference, tensors, upstream)):
            torch.testing.assert_close(got, want)


def test_fast_path_is_skipped_where_it_would_not_be_exact():
    # the path eager_gpam_attention takes, read off the autograd node of P_G: the in-place function where it is exact,
    # the composed ops elsewhere; fast_path=True refuses the cases it does not apply to
    query, key, value, q_neg_weight, lambdas = _inputs(dtype=torch.float32)
    q_neg = query.detach()

    def path(query, key, value, q_neg, mask=None, upcast=False):
        _, p_gpam = eager_gpam_attention(
            query, key, value, q_neg, lambdas[0], lambdas[1], scaling=0.5, attention_mask=mask, upcast=upcast
        )
        return "in-place" if type(p_gpam.grad_fn).__name__ == "EagerGpamFunctionBackward" else "composed"

    def refused(*args, upcast=False):
        with pytest.raises(ValueError, match="does not apply here"):
            eager_gpam_attention(*args, lambdas[0], lambdas[1], scaling=0.5, upcast=upcast, fast_path=True)
        return True

    assert path(query, key, value, q_neg) == "in-place"
    assert path(query, key, value, q_neg, upcast=True) == "in-place", "upcast is a no-op in float32"
    halves = [t.bfloat16() for t in (query, key, value, q_neg)]
    assert path(*halves) == "composed" and refused(*halves)
    as_double = [t.double() for t in (query, key, value, q_neg)]
    assert path(*as_double) == "in-place"
    assert path(*as_double, upcast=True) == "composed", "upcast means float32 scores for float64 inputs"
    assert refused(*as_double, upcast=True)
    learned_bias = torch.zeros(1, 1, 5, 6, requires_grad=True)
    assert path(query, key, value, q_neg, mask=learned_bias) == "composed"
    assert fast_path_refusal(query, key, value, q_neg, learned_bias, False) == "the attention mask requires grad"


def test_bfloat16_falls_back_and_still_matches_the_reference():
    query, key, value, q_neg_weight, lambdas = _inputs(dtype=torch.float32)
    query, key, value, q_neg_weight = (t.detach().bfloat16() for t in (query, key, value, q_neg_weight))
    output, p_gpam = eager_gpam_attention(
        query, key, value, negative_query_from_weight(query, q_neg_weight), lambdas[0], lambdas[1], scaling=0.5, is_causal=True
    )
    reference = reference_gpam_attention(
        query, key, value, q_neg_weight, lambdas[0], lambdas[1], scaling=0.5, is_causal=True
    )
    assert output.dtype == torch.bfloat16 and p_gpam.dtype == torch.bfloat16
    torch.testing.assert_close(output.double(), reference["output"], rtol=3e-2, atol=3e-2)


def _returned_map_gradients(fast_path, dropout_p=0.0):
    """Gradients of a loss through O (and through P_G itself), seen by retain_grad on the returned map."""
    query, key, value, q_neg_weight, lambdas = _inputs(q_len=6, k_len=6)
    torch.manual_seed(1)
    output, p_gpam = eager_gpam_attention(
        query, key, value, negative_query_from_weight(query, q_neg_weight), lambdas[0], lambdas[1],
        scaling=0.5, is_causal=True, dropout_p=dropout_p, fast_path=fast_path,
    )
    p_gpam.retain_grad()
    map_weight = torch.randn(p_gpam.shape, generator=torch.Generator().manual_seed(2), dtype=p_gpam.dtype)
    (output.square().sum() + (p_gpam * map_weight).sum()).backward()
    return p_gpam.grad, [t.grad for t in (query, key, value, q_neg_weight, lambdas)]


@pytest.mark.parametrize("dropout_p", [0.0, 0.4], ids=["no-dropout", "dropout"])
def test_returned_map_is_on_the_gradient_path(dropout_p):
    # stock eager attention returns the weights the output is computed from: hooks and retain_grad see ∂L/∂P_G
    fast_map_grad, fast_grads = _returned_map_gradients(True, dropout_p)
    composed_map_grad, composed_grads = _returned_map_gradients(False, dropout_p)
    assert fast_map_grad is not None
    torch.testing.assert_close(fast_map_grad, composed_map_grad)
    for got, want in zip(fast_grads, composed_grads):
        torch.testing.assert_close(got, want)


def test_gpt2_output_attentions_get_gradients_on_the_fast_path_as_on_the_composed_one(monkeypatch):
    # attention × gradient attribution on a GPAM model: retain_grad on outputs.attentions, as with stock models
    model = gpam_model("gpt2", attn_implementation="eager", gpam_lambda_init=0.6, gpam_negative_init="normal")
    inputs = model_inputs("gpt2")

    def attention_map_gradients():
        model.zero_grad(set_to_none=True)
        outputs = model(**inputs, labels=inputs["input_ids"], output_attentions=True)
        for attention in outputs.attentions:
            attention.retain_grad()
        outputs.loss.backward()
        return [attention.grad for attention in outputs.attentions], [p.grad for p in model.parameters()]

    fast_maps, fast_params = attention_map_gradients()
    # the interface passes nothing, so the kernel chooses; force the composed path there for the comparison
    monkeypatch.setattr(
        gpam_interface, "eager_gpam_attention", functools.partial(eager_gpam_attention, fast_path=False)
    )
    composed_maps, composed_params = attention_map_gradients()
    assert len(fast_maps) == model.config.n_layer
    for got, want in zip(fast_maps, composed_maps):
        assert got is not None and got.abs().sum() > 0
        torch.testing.assert_close(got, want)
    for got, want in zip(fast_params, composed_params):
        torch.testing.assert_close(got, want)


def test_vmap_takes_the_composed_path_and_matches_a_loop():
    query, key, value, q_neg_weight, lambdas = (t.detach() for t in _inputs())

    def attend(q, k, v):
        # one batch element: (H, T, D) -> (1, H, T, D)
        out, _ = eager_gpam_attention(
            q[None], k[None], v[None], negative_query_from_weight(q[None], q_neg_weight), lambdas[0], lambdas[1],
            scaling=0.5, is_causal=True,
        )
        return out[0]

    batched = vmap(attend)(query, key, value)
    looped = torch.stack([attend(q, k, v) for q, k, v in zip(query, key, value)])
    torch.testing.assert_close(batched, looped)


class _TinyGpamAttention(torch.nn.Module):
    """The kernel with its own parameters, to take per-sample gradients of through functional_call."""

    def __init__(self, heads=3, head_dim=4):
        super().__init__()
        self.gpam_q_neg = torch.nn.Linear(head_dim, head_dim, bias=False, dtype=torch.float64)
        self.gpam_lambda = torch.nn.Parameter(torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)[:heads])

    def forward(self, query, key, value):
        query_neg = self.gpam_q_neg(torch.relu(query))
        output, _ = eager_gpam_attention(
            query, key, value, query_neg, self.gpam_lambda, self.gpam_lambda, scaling=0.5, is_causal=True
        )
        return output


def test_per_sample_gradients_with_torch_func_match_one_backward_per_sample():
    torch.manual_seed(0)
    module = _TinyGpamAttention()
    params = {name: p.detach() for name, p in module.named_parameters()}
    query, key, value, _, _ = (t.detach() for t in _inputs())

    def loss(params, q, k, v):
        return functional_call(module, params, (q[None], k[None], v[None])).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, query, key, value)
    for i in range(query.shape[0]):
        module.zero_grad()
        module(query[i : i + 1], key[i : i + 1], value[i : i + 1]).square().sum().backward()
        for name, p in module.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad)


def test_gpt2_per_sample_gradients_with_torch_func_on_the_eager_backend():
    model = gpam_model("gpt2", attn_implementation="eager", gpam_lambda_init=0.6, gpam_negative_init="normal")
    params = {name: p.detach() for name, p in model.named_parameters()}
    # an explicit all-ones mask: without one transformers' padding warning inspects the ids (no vmap there)
    input_ids = model_inputs("gpt2")["input_ids"]

    def loss(params, ids):
        batch = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids[None]), "labels": ids[None]}
        return functional_call(model, params, (), batch).loss

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, input_ids)
    for i in range(input_ids.shape[0]):
        model.zero_grad()
        model(input_ids[i : i + 1], labels=input_ids[i : i + 1]).loss.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, msg=name)


def test_forcing_the_fast_path_where_it_does_not_apply_names_the_reason():
    query, key, value, q_neg_weight, lambdas = (t.detach() for t in _inputs(dtype=torch.float32))
    query_neg = negative_query_from_weight(query, q_neg_weight)
    with pytest.raises(ValueError, match="fast_path=True.*not all float32 or all float64"):
        eager_gpam_attention(
            query.bfloat16(), key.bfloat16(), value.bfloat16(), query_neg.bfloat16(), lambdas[0], lambdas[1],
            scaling=0.5, fast_path=True,
        )
    with pytest.raises(ValueError, match="fast_path=True.*soft-capping"):
        eager_gpam_attention(query, key, value, query_neg, *lambdas, scaling=0.5, softcap=20.0, fast_path=True)

    reasons = []

    def attend(q):
        reasons.append(fast_path_refusal(q, key, value, query_neg, None, False))
        return q

    vmap(attend)(query)
    assert reasons == ["a torch.func transform (vmap, grad, jacrev, ...) is active"]
