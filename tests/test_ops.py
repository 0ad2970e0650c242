"""The daGPAM kernels (eager, fused sdpa) against the float64 reference, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from hf_gpam.modeling.gpam_ops import (
    eager_gpam_attention,
    negative_query,
    reference_gpam_attention,
    sdpa_gpam_attention,
)


# (B, H, Tq, Tk, D); odd lengths on purpose, Tq=1 is a decode step
SHAPES = [(2, 4, 7, 7, 8), (1, 2, 13, 13, 16), (3, 3, 1, 9, 8), (2, 2, 5, 11, 4)]
SHAPE_IDS = [f"B{b}-H{h}-Tq{tq}-Tk{tk}-D{d}" for b, h, tq, tk, d in SHAPES]
KERNELS = {"eager": eager_gpam_attention, "sdpa": sdpa_gpam_attention}


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
    query_neg = negative_query(query, w)
    kernel = KERNELS[name]
    out = kernel(query, key, value, query_neg, lp, ln, scaling=scaling, attention_mask=mask, is_causal=causal)
    return out[0] if name == "eager" else out


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
        query, key, value, negative_query(query, w), lp, ln, scaling=8**-0.5, is_causal=True
    )
    torch.testing.assert_close(p_gpam.sum(-1), torch.ones(2, 4, 9))
    assert (p_gpam < 0).any(), "daGPAM must produce negative attention weights"
    # entries stay in (−λ⁻, 1 + λ⁺)
    assert (p_gpam > -ln.view(1, -1, 1, 1)).all() and (p_gpam < 1 + lp.view(1, -1, 1, 1)).all()


def test_untied_rows_sum_to_one_plus_lambda_pos_minus_lambda_neg():
    query, key, value, w, lp, ln = make_inputs(2, 3, 6, 6, 8, tied=False)
    _, p_gpam = eager_gpam_attention(
        query, key, value, negative_query(query, w), lp, ln, scaling=0.4, attention_mask=padding_mask(2, 6, 6)
    )
    expected = (1 + lp - ln).view(1, -1, 1).expand(2, 3, 6)
    torch.testing.assert_close(p_gpam.sum(-1), expected)


def test_eager_returns_the_reference_map():
    query, key, value, w, lp, ln = inputs = make_inputs(2, 2, 7, 7, 4)
    _, p_gpam = eager_gpam_attention(query, key, value, negative_query(query, w), lp, ln, scaling=0.5, is_causal=True)
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
    for kernel in KERNELS:
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
