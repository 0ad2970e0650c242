"""A memory-frugal autograd function for the eager (materialised) daGPAM path.

Why this file exists: written as a chain of ordinary torch ops, eager daGPAM allocates about a dozen fresh
(B, H, Tq, Tk) tensors per forward+backward. On a CPU each fresh buffer of that size is mapped from the kernel and
page-faulted in, which costs more than the arithmetic done on it (measured: an in-place softmax over
4×12×1024×1024 floats takes ~60 ms, the same softmax into a fresh tensor ~260 ms). ``EagerGpamFunction`` computes
the same numbers with four fresh T×T buffers in total and every other step in place:

forward
    S = [s·Q⁺; s·Q⁻] Kᵀ          one matmul for both score maps, (2, B, H, Tq, Tk)     fresh
    S += M, causal fill, softmax  in place, so S holds [P⁺; P⁻]
    P_G = (1+λ⁺)P⁺ − λ⁻P⁻       (dropout applied here when on)                         fresh
    O = P_G V
backward
    dP_G = dO Vᵀ  (+ the incoming gradient of the returned P_G)                           fresh
    dV = P_Gᵀ dO
    r± = rowsum(dP_G ⊙ P±)        only for the λ gradients (batched vector dots, no temporaries)
    S ← softmax_backward(dP_G, S) in place, per map: the raw score gradients R±
    d[Q⁺; Q⁻] = s·c ⊙ (R K),  dK = Σ± R±ᵀ (c± · s·Q±)     with c = (1+λ⁺, −λ⁻) per map and head

The last step uses the linearity of the softmax backward in its incoming gradient: the per-head coefficients
(1+λ⁺) and −λ⁻ are applied to the small (·, D) operands instead of the T×T maps.

Limits (each falls back to the plain composed path in ``gpam_ops`` or raises a clear error):
    * only CPU float32/float64 inputs with matching dtypes and a mask that does not require grad take this path;
    * the backward reuses the saved maps as its workspace, so backpropagating twice through the same graph
      (``retain_graph=True``) raises, and double backward (``create_graph=True``) is not supported;
    * under ``torch.compile`` the composed path is used, because the compiler plans its own buffers.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


FAST_PATH_DTYPES = (torch.float32, torch.float64)


def fast_path_applies(query, key, value, q_neg, attention_mask, upcast: bool) -> bool:
    """Whether ``EagerGpamFunction`` computes exactly what the composed eager path would."""
    if torch.compiler.is_compiling():
        return False
    # under autocast the composed path lets autocast choose each op's precision, as stock attention does
    if torch.is_autocast_enabled(query.device.type):
        return False
    # The in-place softmax backward aliases its output with the saved probabilities; that is verified on the CPU
    # kernels only (no GPU was available when this was written), so other devices take the composed path.
    if query.device.type != "cpu":
        return False
    dtype = query.dtype
    if dtype not in FAST_PATH_DTYPES or any(t.dtype != dtype for t in (key, value, q_neg)):
        return False
    if attention_mask is not None and attention_mask.requires_grad:
        return False
    # upcasting computes scores in float32: a no-op for float32 inputs, a change of precision for the others
    return not upcast or dtype == torch.float32


def _batched_row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Σ_j a[..., i, j] · b[..., i, j] without an elementwise temporary: (…, Tq, 1, Tk) @ (…, Tq, Tk, 1)
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1)


class EagerGpamFunction(torch.autograd.Function):
    """daGPAM with materialised maps; see the module docstring for the algorithm.

    Inputs: query, q_neg (B, H, Tq, D); key, value (B, H, Tk, D); lambda_pos, lambda_neg (H,); attention_mask
    (additive float or boolean True = attend, broadcastable to (B, H, Tq, Tk)) or None; scaling; is_causal
    (bottom-right aligned); dropout_p. Returns ``(output (B, H, Tq, D), p_gpam (B, H, Tq, Tk))``.
    """

    @staticmethod
    def forward(ctx, query, q_neg, key, value, lambda_pos, lambda_neg, attention_mask, scaling, is_causal, dropout_p):
        q_len, k_len = query.shape[-2], key.shape[-2]
        dtype = query.dtype
        # The two maps live in one buffer laid out (2, B, H, Tq, Tk), so that each map is a contiguous block:
        # the in-place softmax backward below is exact only on contiguous tensors. Scaling the small (·, D)
        # queries instead of the T×T scores saves a pass over the maps.
        stacked = torch.stack([query, q_neg]).mul_(scaling)  # (2, B, H, Tq, D)
        scores = torch.matmul(stacked, key.transpose(-1, -2))  # (2, B, H, Tq, Tk)
        lowest = torch.finfo(dtype).min
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores.masked_fill_(~attention_mask, lowest)
            else:
                scores.add_(attention_mask)
        if is_causal:
            rows = torch.arange(q_len, device=query.device)[:, None]
            cols = torch.arange(k_len, device=query.device)[None, :]
            scores.masked_fill_(cols > rows + (k_len - q_len), lowest)
        torch.softmax(scores, dim=-1, out=scores)
        p_pos, p_neg = scores[0], scores[1]  # (B, H, Tq, Tk) each

        coef_pos = (1.0 + lambda_pos.to(dtype)).view(1, -1, 1, 1)
        coef_neg = lambda_neg.to(dtype).view(1, -1, 1, 1)
        p_gpam = torch.mul(p_pos, coef_pos).addcmul_(p_neg, coef_neg, value=-1.0)  # (B, H, Tq, Tk)
        keep = None
        if dropout_p > 0.0:
            keep = torch.empty_like(p_gpam, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
            p_gpam.mul_(keep).mul_(1.0 / (1.0 - dropout_p))
        output = torch.matmul(p_gpam, value)  # (B, H, Tq, D)

        ctx.save_for_backward(stacked, key, value, scores, p_gpam, lambda_pos, lambda_neg, keep)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.consumed = False
        return output, p_gpam

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_p_gpam):
        if ctx.consumed:
            raise RuntimeError(
                "eager daGPAM attention reuses its saved attention maps as backward workspace, so it cannot be "
                "backpropagated twice (retain_graph=True); use attn_implementation='sdpa', or run the forward again"
            )
        ctx.consumed = True
        stacked, key, value, scores, p_gpam, lambda_pos, lambda_neg, keep = ctx.saved_tensors
        dtype = scores.dtype
        needs_query, needs_q_neg, needs_key, needs_value, needs_lambda_pos, needs_lambda_neg = ctx.needs_input_grad[:6]

        grad_value = None
        if needs_value:
            grad_value = torch.matmul(p_gpam.transpose(-1, -2), grad_output.to(dtype))  # (B, H, Tk, D)
        grad_p = torch.matmul(grad_output.to(dtype), value.transpose(-1, -2))  # (B, H, Tq, Tk)
        if grad_p_gpam is not None:
            grad_p.add_(grad_p_gpam)
        if keep is not None:
            grad_p.mul_(keep).mul_(1.0 / (1.0 - ctx.dropout_p))

        # ∂L/∂λ⁺ = Σ dP_G ⊙ P⁺ and ∂L/∂λ⁻ = −Σ dP_G ⊙ P⁻, summed over batch, rows and columns
        grad_lambda_pos = grad_lambda_neg = None
        if needs_lambda_pos:
            grad_lambda_pos = _batched_row_dot(grad_p, scores[0]).sum(dim=(0, 2, 3)).to(lambda_pos.dtype)
        if needs_lambda_neg:
            grad_lambda_neg = -_batched_row_dot(grad_p, scores[1]).sum(dim=(0, 2, 3)).to(lambda_neg.dtype)

        grad_query = grad_q_neg = grad_key = None
        if needs_query or needs_q_neg or needs_key:
            # softmax backward of each map, written over it: R± = P± ⊙ (dP_G − rowsum(dP_G ⊙ P±))
            for half in (scores[0], scores[1]):
                torch.ops.aten._softmax_backward_data.out(grad_p, half, -1, dtype, grad_input=half)
            # (2, 1, H, 1, 1): the per-head coefficients (1+λ⁺) and −λ⁻, applied to the small operands
            coef = torch.stack([1.0 + lambda_pos.to(dtype), -lambda_neg.to(dtype)]).view(2, 1, -1, 1, 1)
            if needs_key:
                # stacked holds s·[Q⁺; Q⁻], so dK = Σ_halves R±ᵀ (c± · s·Q±)
                weighted = stacked * coef
                grad_key = torch.matmul(scores[0].transpose(-1, -2), weighted[0])  # (B, H, Tk, D)
                grad_key.add_(torch.matmul(scores[1].transpose(-1, -2), weighted[1]))
            if needs_query or needs_q_neg:
                # d(s·Q±) = c± · R± K, so dQ± = s · c± · (R± K)
                grad_stacked = torch.matmul(scores, key).mul_(coef * ctx.scaling)  # (2, B, H, Tq, D)
                grad_query, grad_q_neg = grad_stacked[0], grad_stacked[1]
        return grad_query, grad_q_neg, grad_key, grad_value, grad_lambda_pos, grad_lambda_neg, None, None, None, None
