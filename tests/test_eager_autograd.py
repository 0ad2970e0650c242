"""The in-place eager daGPAM autograd function: the cases tests/test_ops.py does not reach.

tests/test_ops.py compares ``eager_gpam_attention`` with the float64 reference (forward, backward, masks). Here:
dropout (the returned P_G is the dropped map and the gradients follow the same keep-mask), gradients flowing
into the returned P_G, the refusal to backpropagate twice through reused workspace, and the fallback cases.
"""

from __future__ import annotations

import pytest
import torch

from hf_gpam.modeling.gpam_eager_autograd import fast_path_applies
from hf_gpam.modeling.gpam_ops import eager_gpam_attention, negative_query, reference_gpam_attention


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
        query, key, value, negative_query(query, q_neg_weight), lambdas[0], lambdas[1],
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
        query, key, value, negative_query(query, q_neg_weight), lambdas[0], lambdas[1],
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


def test_second_backward_through_the_same_graph_raises_a_clear_error():
    query, key, value, q_neg_weight, lambdas = _inputs()
    query_neg = negative_query(query, q_neg_weight)
    output, _ = eager_gpam_attention(query, key, value, query_neg, lambdas[0], lambdas[1], scaling=0.5)
    output.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot be backpropagated twice"):
        output.sum().backward()


def test_fast_path_is_skipped_where_it_would_not_be_exact():
    query, key, value, q_neg_weight, _ = _inputs(dtype=torch.float32)
    q_neg = query.detach()
    assert fast_path_applies(query, key, value, q_neg, None, upcast=False)
    assert fast_path_applies(query, key, value, q_neg, None, upcast=True), "upcast is a no-op in float32"
    assert not fast_path_applies(query.bfloat16(), key.bfloat16(), value.bfloat16(), q_neg.bfloat16(), None, False)
    as_double = [t.double() for t in (query, key, value, q_neg)]
    assert fast_path_applies(*as_double, None, upcast=False)
    assert not fast_path_applies(*as_double, None, upcast=True), "upcast means float32 scores for float64 inputs"
    learned_bias = torch.zeros(1, 1, 5, 6, requires_grad=True)
    assert not fast_path_applies(query, key, value, q_neg, learned_bias, upcast=False)


def test_bfloat16_falls_back_and_still_matches_the_reference():
    query, key, value, q_neg_weight, lambdas = _inputs(dtype=torch.float32)
    query, key, value, q_neg_weight = (t.detach().bfloat16() for t in (query, key, value, q_neg_weight))
    output, p_gpam = eager_gpam_attention(
        query, key, value, negative_query(query, q_neg_weight), lambdas[0], lambdas[1], scaling=0.5, is_causal=True
    )
    reference = reference_gpam_attention(
        query, key, value, q_neg_weight, lambdas[0], lambdas[1], scaling=0.5, is_causal=True
    )
    assert output.dtype == torch.bfloat16 and p_gpam.dtype == torch.bfloat16
    torch.testing.assert_close(output.double(), reference["output"], rtol=3e-2, atol=3e-2)
