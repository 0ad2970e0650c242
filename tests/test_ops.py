"""The daGPAM kernels (eager in-place, eager composed, fused sdpa) against the float64 reference, forward and backward.

Every CPU float32/float64 eager call would take the in-place autograd function when left to choose, so the composed
path (the one GPUs, half precision and autocast run) is forced here with ``fast_path=False`` to test it in float32.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from hf_gpam.modeling.gpam_ops import (
    eager_gpam_attention,
    negative_query_from_weight,
    reference_gpam_attention,
    sdpa_gpam_attention,
)


# (B, H, Tq, Tk, D); odd lengths on purpose, Tq=1 is a decode step
SHAPES = [(2, 4, 7, 7, 8), (1, 2, 13, 13, 16), (3, 3, 1, 9, 8), (2, 2, 5, 11, 4)]
SHAPE_IDS = [f"B{b}-H{h}-Tq{tq}-Tk{tk}-D{d}" for b, h, tq, tk, d in SHAPES]
# every path, forced: "eager-fast" raises rather than silently falling back to the composed path
KERNELS = {
    "eager-fast": functools.partial(eager_gpam_attention, fast_path=True),
    "eager-composed": functools.partial(eager_gpam_attention, fast_path=False),
    "sdpa": sdpa_gpam_attention,
}
# what the attention interface calls: the eager path chosen automatically
AUTO_KERNELS = {"eager": eager_gpam_attention, "sdpa": sdpa_gpam_attention}


def make_inputs(b, h, tq, tk, d, dtype=torch.float32, tied=True, lam=0.7):
    query, key, value = (torch.randn(b, h, t, d, dtype=dtype) for t in (tq, tk, tk))
    q_neg_weight = torch.randn(d, d, dtype=dtype) / d**0.5
    lambda_pos = torch.full((h,), lam) + 0.1 * torch.arange(h)
    lambda_neg = lambda_pos.clone() if tied else lambda_pos * 0.5 + 0.2
    return query, key, value, q_neg_weight, lambda_pos, lambda_neg


def padding_mask(b, tq, tk):
    """Boolean (B, 1, Tq, Tk) key-padding mask, True = attend; batch row i has its last i keys padded.

    Key 0 is always kept, so no row is fully masked even under causality (those rows are tested separately).
    """
    keep = torch.ones(b, tk, dtype=torch.bool)
    for i in range(b):
        keep[i, tk - min(i, tk - 1):] = False
    return keep[:, None, None, :].expand(b, 1, tq, tk)


def run_kernel(name, inputs, scaling, mask, causal):
    """The kernel's output for the reference's inputs: Q⁻ = ReLU(Q⁺) W⁻ is computed here, as the modules do."""
    query, key, value, w, lp, ln = inputs
    query_neg = negative_query_from_weight(query, w)
    kernel = KERNELS.get(name) or AUTO_KERNELS[name]
    out = kernel(query, key, value, query_neg, lp, ln, scaling=scaling, attention_mask=mask, is_causal=causal)
    return out[0] if name.startswith("eager") else out


def mask_cases(b, tq, tk):
    cases = {"nomask": (None, False), "padded": (padding_mask(b, tq, tk), False)}
    if tq == tk:
        cases["causal"] = (None, True)
        causal_and_pad = padding_mask(b, tq, tk) & torch.ones(tq, tk, dtype=torch.bool).tril()
        cases["causal+padded-as-mask"] = (causal_and_pad, False)
    return cases


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_forward_and_backward_match_reference(kernel, shape, tied):
    b, h, tq, tk, d = shape
    for mask_name, (mask, causal) in mask_cases(b, tq, tk).items():
        inputs = [t.clone().requires_grad_(True) for t in make_inputs(*shape, tied=tied)]
        ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
        scaling = d**-0.5
        out = run_kernel(kernel, inputs, scaling, mask, causal)
        ref = reference_gpam_attention(*ref_inputs, scaling=scaling, attention_mask=mask, is_causal=causal)["output"]
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5, msg=f"forward, {mask_name}")

        grad_out = torch.randn_like(ref)
        (out.double() * grad_out).sum().backward()
        (ref * grad_out).sum().backward()
        names = ["query", "key", "value", "q_neg_weight", "lambda_pos", "lambda_neg"]
        for name, got, want in zip(names, inputs, ref_inputs):
            if not tied or name != "lambda_neg" or want.grad is not None:
                torch.testing.assert_close(
                    got.grad.double(), want.grad, atol=5e-5, rtol=5e-5, msg=f"grad {name}, {mask_name}"
                )


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_float64_inputs_agree_to_machine_precision(kernel):
    inputs = make_inputs(2, 3, 6, 6, 8, dtype=torch.float64)
    mask = padding_mask(2, 6, 6)
    out = run_kernel(kernel, inputs, 0.3, mask, False)
    ref = reference_gpam_attention(*inputs, scaling=0.3, attention_mask=mask)["output"]
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_additive_float_mask_equals_boolean_mask():
    inputs = make_inputs(2, 2, 5, 5, 8)
    keep = padding_mask(2, 5, 5)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    for kernel in KERNELS:
        torch.testing.assert_close(
            run_kernel(kernel, inputs, 0.35, keep, False), run_kernel(kernel, inputs, 0.35, additive, False)
        )


def test_tied_rows_sum_to_one_and_contain_negative_entries():
    query, key, value, w, lp, ln = make_inputs(2, 4, 9, 9, 8, lam=0.8)
    # W⁻ = −I: the paper's analysis point
    w = -torch.eye(8)
    _, p_gpam = eager_gpam_attention(
        query, key, value, negative_query_from_weight(query, w), lp, ln, scaling=8**-0.5, is_causal=True
    )
    torch.testing.assert_close(p_gpam.sum(-1), torch.ones(2, 4, 9))
    assert (p_gpam < 0).any(), "daGPAM must produce negative attention weights"
    # entries stay in (−λ⁻, 1 + λ⁺)
    assert (p_gpam > -ln.view(1, -1, 1, 1)).all() and (p_gpam < 1 + lp.view(1, -1, 1, 1)).all()


def test_untied_rows_sum_to_one_plus_lambda_pos_minus_lambda_neg():
    query, key, value, w, lp, ln = make_inputs(2, 3, 6, 6, 8, tied=False)
    _, p_gpam = eager_gpam_attention(
        query, key, value, negative_query_from_weight(query, w), lp, ln, scaling=0.4, attention_mask=padding_mask(2, 6, 6)
    )
    expected = (1 + lp - ln).view(1, -1, 1).expand(2, 3, 6)
    torch.testing.assert_close(p_gpam.sum(-1), expected)


def test_eager_returns_the_reference_map():
    query, key, value, w, lp, ln = inputs = make_inputs(2, 2, 7, 7, 4)
    _, p_gpam = eager_gpam_attention(query, key, value, negative_query_from_weight(query, w), lp, ln, scaling=0.5, is_causal=True)
    ref = reference_gpam_attention(*inputs, scaling=0.5, is_causal=True)["p_gpam"]
    torch.testing.assert_close(p_gpam.double(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_zero_lambda_is_plain_softmax_attention(kernel):
    query, key, value, w, _, _ = make_inputs(2, 4, 8, 8, 8)
    zero = torch.zeros(4)
    for mask, causal in [(None, True), (padding_mask(2, 8, 8), False)]:
        expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, scale=0.3)
        torch.testing.assert_close(run_kernel(kernel, (query, key, value, w, zero, zero), 0.3, mask, causal), expected)


def test_eager_causal_mask_is_bottom_right_aligned_for_cached_prefix():
    # 3 new queries after a cache of 4 keys: query i may see keys 0..4+i
    inputs = make_inputs(1, 2, 3, 7, 8)
    out = run_kernel("eager", inputs, 0.3, None, True)
    explicit = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=4)
    ref = reference_gpam_attention(*inputs, scaling=0.3, attention_mask=explicit)["output"]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_forward_backward_finite_and_eager_matches_sdpa(dtype):
    inputs32 = make_inputs(2, 4, 16, 16, 16)
    mask = padding_mask(2, 16, 16) & torch.ones(16, 16, dtype=torch.bool).tril()
    outputs = {}
    for kernel in AUTO_KERNELS:
        inputs = [t.to(dtype).requires_grad_(True) if i < 4 else t.requires_grad_(True) for i, t in
                  enumerate(t.clone() for t in inputs32)]
        out = run_kernel(kernel, inputs, 0.25, mask, False)
        assert out.dtype == dtype
        out.float().square().sum().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(t.grad).all() for t in inputs)
        outputs[kernel] = out.float()
    reference = run_kernel("sdpa", inputs32, 0.25, mask, False)
    tolerance = {torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(outputs["sdpa"], reference, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_fully_masked_rows_stay_finite(kernel):
    # left padding under causality: the padded query rows can attend to nothing
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, :3] = False
    mask = keep[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool).tril()
    inputs = [t.requires_grad_(True) for t in make_inputs(2, 2, 6, 6, 8)]
    out = run_kernel(kernel, inputs, 0.3, mask, False)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in inputs)
    # the rows that can attend to something are exact
    ref = reference_gpam_attention(*[t.detach() for t in inputs], scaling=0.3, attention_mask=mask)["output"]
    torch.testing.assert_close(out[1, :, 3:].double(), ref[1, :, 3:].double(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("shape", SHAPES[:2], ids=SHAPE_IDS[:2])
def test_tied_lambda_as_one_shared_tensor_gets_both_gradients(kernel, shape):
    # What GpamLambda.forward returns when tied: the same tensor as λ⁺ and λ⁻, so its gradient is the sum
    # ∂L/∂λ⁺ + ∂L/∂λ⁻, which the reference (given the same shared tensor) accumulates the same way.
    b, h, tq, tk, d = shape
    query, key, value, w, lam, _ = make_inputs(*shape)
    inputs = [t.requires_grad_(True) for t in (query, key, value, w, lam)]
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    mask = padding_mask(b, tq, tk) & torch.ones(tq, tk, dtype=torch.bool).tril()
    query, key, value, w, lam = inputs
    out = run_kernel(kernel, (query, key, value, w, lam, lam), d**-0.5, mask, False)
    rq, rk, rv, rw, rlam = ref_inputs
    ref = reference_gpam_attention(rq, rk, rv, rw, rlam, rlam, scaling=d**-0.5, attention_mask=mask)["output"]
    grad_out = torch.randn_like(ref)
    (out.double() * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    for name, got, want in zip(["query", "key", "value", "q_neg_weight", "lambda"], inputs, ref_inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=5e-5, rtol=5e-5, msg=f"grad {name}")


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_dropout_of_one_gives_zeros_like_f_dropout(kernel):
    inputs = [t.requires_grad_(True) for t in make_inputs(2, 2, 5, 5, 4)]
    query, key, value, w, lp, ln = inputs
    out = KERNELS[kernel](
        query, key, value, negative_query_from_weight(query, w), lp, ln, scaling=0.5, is_causal=True, dropout_p=1.0
    )
    if kernel.startswith("eager"):
        out, p_gpam = out
        assert torch.equal(p_gpam, torch.zeros_like(p_gpam))
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in inputs)


@pytest.mark.parametrize("kernel", ["eager-fast", "eager-composed"])
@pytest.mark.parametrize("dropout_p", [-0.1, 1.5])
def test_eager_dropout_outside_zero_one_is_refused(kernel, dropout_p):
    query, key, value, w, lp, ln = make_inputs(1, 2, 3, 3, 4)
    with pytest.raises(ValueError, match=r"dropout_p=.* is not a probability in \[0, 1\]"):
        KERNELS[kernel](query, key, value, negative_query_from_weight(query, w), lp, ln, scaling=0.5, dropout_p=dropout_p)


# (mask, is_causal) pairs that take sdpa's two layouts: "causal" two kernel calls, "padded" one stacked call
DROPOUT_MASKS = {"causal": lambda: (None, True), "padded": lambda: (padding_mask(1, 6, 6), False)}


@pytest.mark.parametrize("mask_case", list(DROPOUT_MASKS))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_dropout_is_unbiased_with_the_documented_variance(kernel, mask_case):
    """Both dropout estimators average to the output without dropout; their variances tell which one runs.

    eager drops entries of P_G with one keep-mask m (kept entries scaled by 1/(1−p)):
        O = Σ_j P_G[i,j] m_ij/(1−p) V[j],          Var O = p/(1−p) · Σ_j P_G[i,j]² V[j]²
    sdpa drops entries of P⁺ and P⁻ with independent masks m⁺, m⁻ inside the kernel calls:
        O = (1+λ⁺) Σ_j P⁺ m⁺/(1−p) V − λ⁻ Σ_j P⁻ m⁻/(1−p) V,
        Var O = p/(1−p) · Σ_j ((1+λ⁺)² P⁺[i,j]² + (λ⁻)² P⁻[i,j]²) V[j]²      (≥ eager's: the cross term is gone)
    Both have E[m/(1−p)] = 1, so E[O] is the output without dropout.
    """
    dropout_p, samples, z_max = 0.3, 20_000, 5.0
    head_dim = 4
    shape = (1, 2, 6, 6, head_dim)  # (B, H, Tq, Tk, D)
    # fixed inputs and dropout draws keep the test deterministic; the bounds below fail for ~1 seed in 10⁴
    torch.manual_seed(0)
    inputs = make_inputs(*shape, dtype=torch.float64, tied=False, lam=0.8)
    # W⁻ = −I makes P⁻ differ from P⁺, so the two variances differ
    inputs = inputs[:3] + (-torch.eye(head_dim, dtype=torch.float64),) + inputs[4:]
    mask, causal = DROPOUT_MASKS[mask_case]()
    ref = reference_gpam_attention(*inputs, scaling=0.5, attention_mask=mask, is_causal=causal)
    # `samples` independent dropout draws in one call: the batch axis holds copies of the one input
    query, key, value, w, lp, ln = inputs
    query, key, value = (t.expand(samples, -1, -1, -1).contiguous() for t in (query, key, value))
    out = KERNELS[kernel](
        query, key, value, negative_query_from_weight(query, w), lp, ln,
        scaling=0.5, attention_mask=mask, is_causal=causal, dropout_p=dropout_p,
    )
    out = out[0] if kernel.startswith("eager") else out  # (samples, H, Tq, D)

    lam_pos, lam_neg = lp.view(1, -1, 1, 1).double(), ln.view(1, -1, 1, 1).double()
    if kernel.startswith("eager"):
        squared_weights = ref["p_gpam"] ** 2
    else:
        squared_weights = (1 + lam_pos) ** 2 * ref["p_pos"] ** 2 + lam_neg**2 * ref["p_neg"] ** 2
    variance = dropout_p / (1 - dropout_p) * squared_weights @ value[:1] ** 2  # (1, H, Tq, D)
    # The sample mean of `samples` draws has standard deviation sqrt(Var / samples) per entry and is close to
    # normal at this size; with H·Tq·D = 48 entries, a deviation beyond 5 standard deviations happens with
    # probability ~3e-5 for an unbiased estimator, while a bias (e.g. a missing 1/(1−p), which shrinks the mean
    # by p·|O|) exceeds it by far.
    tolerance = z_max * (variance / samples).sqrt()
    deviation = (out.mean(0, keepdim=True) - ref["output"]).abs()
    assert (deviation <= tolerance).all(), f"max z = {(deviation / (variance / samples).sqrt()).max():.2f}"
    assert (ref["output"].abs() * dropout_p > tolerance).float().mean() > 0.9, "tolerance too loose to see a bias"
    # The sample variance, summed over entries, within 5 % of the documented estimator's: the two estimators'
    # variances differ by more than that here (checked below), so this tells them apart.
    eager_variance = dropout_p / (1 - dropout_p) * ref["p_gpam"] ** 2 @ value[:1] ** 2
    sdpa_variance = (
        dropout_p / (1 - dropout_p) * ((1 + lam_pos) ** 2 * ref["p_pos"] ** 2 + lam_neg**2 * ref["p_neg"] ** 2)
        @ value[:1] ** 2
    )
    assert sdpa_variance.sum() > 1.2 * eager_variance.sum()
    torch.testing.assert_close(out.var(0).sum(), variance.sum(), rtol=0.05, atol=0)
