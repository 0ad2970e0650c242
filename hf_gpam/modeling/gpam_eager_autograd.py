"""A memory-frugal autograd function for the eager (materialised) daGPAM path.

Why this file exists: written as a chain of ordinary torch ops, eager daGPAM allocates about a dozen fresh
(B, H, Tq, Tk) tensors per forward+backward. On a CPU each fresh buffer of that size is mapped from the kernel and
page-faulted in, which costs more than the arithmetic done on it (measured: an in-place softmax over
4×12×1024×1024 floats takes ~60 ms, the same softmax into a fresh tensor ~260 ms). ``EagerGpamFunction`` computes
the signed map P_G with two fresh T×T buffers in its forward and at most one in its backward (under dropout),
every other step in place:

forward
    S = [s·Q⁺; s·Q⁻] Kᵀ          one matmul for both score maps, (2, B, H, Tq, Tk)     fresh
    S += M, causal fill, softmax  in place, so S holds [P⁺; P⁻]
    P_G = (1+λ⁺)P⁺ − λ⁻P⁻       (dropout applied here when on)                         fresh
backward, given dP_G
    r± = rowsum(dP_G ⊙ P±)        only for the λ gradients (batched vector dots, no temporaries)
    S ← softmax_backward(dP_G, S) in place, per map: the raw score gradients R±
    d[Q⁺; Q⁻] = s·c ⊙ (R K),  dK = Σ± R±ᵀ (c± · s·Q±)     with c = (1+λ⁺, −λ⁻) per map and head

The last step uses the linearity of the softmax backward in its incoming gradient: the per-head coefficients
(1+λ⁺) and −λ⁻ are applied to the small (·, D) operands instead of the T×T maps.

The function returns P_G only; the caller computes O = P_G V with an ordinary matmul. So the map a model returns for
``output_attentions=True`` is the node O hangs from: ``retain_grad()`` and hooks on it see ∂L/∂P_G, as they do on
stock eager attention weights, and autograd's matmul backward gives dP_G = dO Vᵀ and dV = P_Gᵀ dO.

The first backward uses the saved maps S as its workspace; a further backward through the same graph
(``retain_graph=True``) finds them consumed and recomputes them from the saved s·[Q⁺; Q⁻] and K, into the same
buffer. Limits (each takes the plain composed path in ``gpam_ops``, see ``fast_path_refusal``): CPU float32/float64
inputs with matching dtypes and a mask that does not require grad only; not under autocast, ``torch.compile``
(the compiler plans its own buffers) or ``torch.func`` transforms (``vmap``, ``grad``: they need an autograd
function written for them). Double backward (``create_graph=True``) is not supported.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


FAST_PATH_DTYPES = (torch.float32, torch.float64)


def fast_path_refusal(query, key, value, q_neg, attention_mask, upcast: bool) -> str | None:
    """Why ``EagerGpamFunction`` would not compute exactly what the composed eager path computes, or None if it would."""
    if torch.compiler.is_compiling():
        return "torch.compile plans its own buffers"
    if torch._C._are_functorch_transforms_active():
        return "a torch.func transform (vmap, grad, jacrev, ...) is active"
    # under autocast the composed path lets autocast choose each op's precision, as stock attention does
    if torch.is_autocast_enabled(query.device.type):
        return "autocast is enabled"
    # The in-place softmax backward aliases its output with the saved probabilities; that is verified on the CPU
    # kernels only (no GPU was available when this was written), so other devices take the composed path.
    if query.device.type != "cpu":
        return f"the inputs are on {query.device.type}, not cpu"
    dtype = query.dtype
    if dtype not in FAST_PATH_DTYPES or any(t.dtype != dtype for t in (key, value, q_neg)):
        return f"the inputs are not all float32 or all float64 (query {dtype})"
    if attention_mask is not None and attention_mask.requires_grad:
        return "the attention mask requires grad"
    # upcasting computes scores in float32: a no-op for float32 inputs, a change of precision for the others
    if upcast and dtype != torch.float32:
        return f"upcast computes the scores in float32, not {dtype}"
    return None


def _batched_row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Σ_j a[..., i, j] · b[..., i, j] without an elementwise temporary: (…, Tq, 1, Tk) @ (…, Tq, Tk, 1)
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1)


def _dual_softmax_(scores, stacked, key, attention_mask, is_causal):
    """Fill ``scores`` (2, B, H, Tq, Tk) with [P⁺; P⁻] = softmax([s·Q⁺; s·Q⁻] Kᵀ + M), written in place."""
    torch.matmul(stacked, key.transpose(-1, -2), out=scores)
    lowest = torch.finfo(scores.dtype).min
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, lowest)
        else:
            scores.add_(attention_mask)
    if is_causal:
        q_len, k_len = scores.shape[-2:]
        rows = torch.arange(q_len, device=scores.device)[:, None]
        cols = torch.arange(k_len, device=scores.device)[None, :]
        scores.masked_fill_(cols > rows + (k_len - q_len), lowest)
    return torch.softmax(scores, dim=-1, out=scores)


class EagerGpamFunction(torch.autograd.Function):
    """The signed map P_G with its maps computed and differentiated in place; see the module docstring.

    Inputs: query, q_neg (B, H, Tq, D); key (B, H, Tk, D); lambda_pos, lambda_neg (H,) (may be one shared tensor);
    attention_mask (additive float or boolean True = attend, broadcastable to (B, H, Tq, Tk)) or None; scaling;
    is_causal (bottom-right aligned); dropout_p in [0, 1]. Returns P_G (B, H, Tq, Tk), dropped when dropout_p > 0.
    """

    @staticmethod
    def forward(ctx, query, q_neg, key, lambda_pos, lambda_neg, attention_mask, scaling, is_causal, dropout_p):
        dtype = query.dtype
        # The two maps live in one buffer laid out (2, B, H, Tq, Tk), so that each map is a contiguous block:
        # the in-place softmax backward below is exact only on contiguous tensors. Scaling the small (·, D)
        # queries instead of the T×T scores saves a pass over the maps.
        stacked = torch.stack([query, q_neg]).mul_(scaling)  # (2, B, H, Tq, D)
        batch_shape = torch.broadcast_shapes(stacked.shape[:-2], key.shape[:-2])
        scores = stacked.new_empty(*batch_shape, stacked.shape[-2], key.shape[-2])
        _dual_softmax_(scores, stacked, key, attention_mask, is_causal)
        p_pos, p_neg = scores[0], scores[1]  # (B, H, Tq, Tk) each

        coef_pos = (1.0 + lambda_pos.to(dtype)).view(1, -1, 1, 1)
        coef_neg = lambda_neg.to(dtype).view(1, -1, 1, 1)
        p_gpam = torch.mul(p_pos, coef_pos).addcmul_(p_neg, coef_neg, value=-1.0)  # (B, H, Tq, Tk)
        keep = None
        if dropout_p > 0.0:
            keep = torch.empty_like(p_gpam, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
            # dropout_p == 1 drops everything (all zeros, as F.dropout(p=1) gives) rather than dividing by zero
            p_gpam.mul_(keep).mul_(1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0)

        ctx.save_for_backward(stacked, key, scores, lambda_pos, lambda_neg, keep, attention_mask)
        ctx.scaling, ctx.dropout_p, ctx.is_causal = scaling, dropout_p, is_causal
        ctx.maps_consumed = False
        return p_gpam

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_p_gpam):
        stacked, key, scores, lambda_pos, lambda_neg, keep, attention_mask = ctx.saved_tensors
        dtype = scores.dtype
        needs_query, needs_q_neg, needs_key, needs_lambda_pos, needs_lambda_neg = ctx.needs_input_grad[:5]
        # The maps are this backward's workspace (below). Preserving their version counter lets a second backward
        # through the same graph (retain_graph=True) unpack them; it finds them consumed and recomputes them.
        with torch.autograd._unsafe_preserve_version_counter(scores):
            if ctx.maps_consumed:
                _dual_softmax_(scores, stacked, key, attention_mask, ctx.is_causal)

            grad_p = grad_p_gpam.to(dtype).contiguous()  # (B, H, Tq, Tk)
            if keep is not None:
                # a fresh buffer: the incoming gradient may be held elsewhere (retain_grad, hooks)
                scale = 1.0 / (1.0 - ctx.dropout_p) if ctx.dropout_p < 1.0 else 0.0
                grad_p = grad_p * keep * scale

            # ∂L/∂λ⁺ = Σ dP_G ⊙ P⁺ and ∂L/∂λ⁻ = −Σ dP_G ⊙ P⁻, summed over batch, rows and columns
            grad_lambda_pos = grad_lambda_neg = None
            if needs_lambda_pos:
                grad_lambda_pos = _batched_row_dot(grad_p, scores[0]).sum(dim=(0, 2, 3)).to(lambda_pos.dtype)
            if needs_lambda_neg:
                grad_lambda_neg = -_batched_row_dot(grad_p, scores[1]).sum(dim=(0, 2, 3)).to(lambda_neg.dtype)

            grad_query = grad_q_neg = grad_key = None
            if needs_query or needs_q_neg or needs_key:
                ctx.maps_consumed = True
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
        return grad_query, grad_q_neg, grad_key, grad_lambda_pos, grad_lambda_neg, None, None, None, None
