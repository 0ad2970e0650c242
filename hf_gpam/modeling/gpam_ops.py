"""The daGPAM math as pure functions of tensors (torch only).

Notation, used in every shape comment of this package:
    B batch, H query heads, Tq query length, Tk key length, D head dimension.

The dual-attention GPAM map of Heo & Choi (2024) for one head:

    P⁺  = softmax(Q⁺ Kᵀ · s + M)
    Q⁻  = ReLU(Q⁺) W⁻
    P⁻  = softmax(Q⁻ Kᵀ · s + M)                 same keys K, same mask M, same scaling s
    P_G = (1 + λ⁺) P⁺ − λ⁻ P⁻                    rows sum to 1 + λ⁺ − λ⁻ (exactly 1 when tied)
    O   = P_G V

Three implementations live here:
    ``reference_gpam_attention``  float64, materialises everything: the ground truth of the tests.
    ``eager_gpam_attention``      materialises P_G (returned for ``output_attentions=True``).
    ``sdpa_gpam_attention``       fused through ``scaled_dot_product_attention``; by linearity
                                  O = (1+λ⁺)·SDPA(Q⁺,K,V) − λ⁻·SDPA(Q⁻,K,V), so no T×T tensor exists.

The kernels take Q⁻ itself (``query_neg``), computed by the caller as ``gpam_q_neg(ReLU(Q⁺))`` through the
module, so that wrappers of that module (PEFT's LoRA) take part. The reference takes ``W⁻`` as
``q_neg_weight``, the weight of an ``nn.Linear(D, D, bias=False)``, i.e. W⁻ᵀ: ``Q⁻ = F.linear(ReLU(Q⁺), W⁻ᵀ)``. ``lambda_pos`` / ``lambda_neg`` are ``(H,)`` tensors (float32 in the
models); the combination of the two maps is done in at least float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gpam_eager_autograd import EagerGpamFunction, fast_path_refusal


def negative_query_from_weight(query: torch.Tensor, q_neg_weight: torch.Tensor) -> torch.Tensor:
    """Q⁻ = ReLU(Q⁺) W⁻ for ``query`` of shape (B, H, Tq, D); W⁻ is shared by all heads."""
    return F.linear(F.relu(query), q_neg_weight)


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where attending is allowed, aligned to the bottom right.

    Query i sits at absolute position ``k_len - q_len + i`` (the usual layout with a KV cache in front).
    """
    offset = k_len - q_len
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(k_len, device=device)[None, :]
    return cols <= rows + offset


def additive_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Turn a boolean mask (True = attend) into an additive one; float masks are returned as they are."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return attention_mask
    blocked = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return blocked.masked_fill_(~attention_mask, torch.finfo(dtype).min)


def _lambdas_as_columns(lambda_pos: torch.Tensor, lambda_neg: torch.Tensor, dtype: torch.dtype):
    # (H,) -> (1, H, 1, 1), broadcast against (B, H, Tq, *)
    return lambda_pos.to(dtype).view(1, -1, 1, 1), lambda_neg.to(dtype).view(1, -1, 1, 1)


def combine_dual_attention(
    positive: torch.Tensor,
    negative: torch.Tensor,
    lambda_pos: torch.Tensor,
    lambda_neg: torch.Tensor,
    *,
    overwrite_positive: bool = False,
) -> torch.Tensor:
    """(1 + λ⁺)·positive − λ⁻·negative, per head, for tensors of shape (B, H, Tq, *).

    Works for the two probability maps (eager) and for the two attention outputs (fused path) alike. Half
    precision inputs are combined in float32 and cast back, so small λ are not rounded away.
    ``overwrite_positive`` lets the result be written over ``positive`` when nothing needs gradients and it is
    already in the working precision (inference: one (B, H, Tq, *) buffer less at the memory peak).
    """
    out_dtype = positive.dtype
    work_dtype = torch.promote_types(out_dtype, torch.float32)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (positive, negative, lambda_pos, lambda_neg)
    )
    if lambda_pos is lambda_neg and out_dtype == work_dtype and negative.dtype == work_dtype:
        # tied λ: (1 + λ)·P − λ·N = P + (−λ)·(N − P), one lerp (the same tensor for both: GpamLambda's tied form)
        weight = -lambda_pos.to(work_dtype).view(1, -1, 1, 1)
        if overwrite_positive and not needs_grad:
            return positive.lerp_(negative, weight)
        return torch.lerp(positive, negative, weight)
    lam_pos, lam_neg = _lambdas_as_columns(lambda_pos, lambda_neg, work_dtype)
    if overwrite_positive and not needs_grad and positive.dtype == work_dtype:
        return positive.mul_(1.0 + lam_pos).addcmul_(negative, lam_neg.to(negative.dtype), value=-1.0)
    # one fresh tensor, the subtraction in place on it (autograd-safe: mul's backward does not need its output)
    combined = positive.to(work_dtype) * (1.0 + lam_pos)
    combined.addcmul_(negative.to(work_dtype), lam_neg, value=-1.0)
    return combined.to(out_dtype)


def _scores(query, key, scaling, mask, is_causal, upcast, softcap=None):
    # (B, H, Tq, D) @ (B, H, D, Tk) -> (B, H, Tq, Tk)
    if upcast:
        # GPT-2's reorder_and_upcast_attn: scores and softmax really in float32, also under autocast (which would
        # otherwise run the matmul in half precision), as the stock module does
        with torch.autocast(query.device.type, enabled=False):
            scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    else:
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        # logit soft-capping (Gemma 2), before the mask as stock applies it
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    if is_causal:
        allowed = causal_mask(query.shape[-2], key.shape[-2], query.device)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return scores


def eager_gpam_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_neg: torch.Tensor,
    lambda_pos: torch.Tensor,
    lambda_neg: torch.Tensor,
    *,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    upcast: bool = False,
    softcap: float | None = None,
    fast_path: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """daGPAM with the maps materialised.

    Two implementations compute the same numbers: the in-place autograd function of ``gpam_eager_autograd`` (CPU
    float32/float64, a fraction of the T×T buffers) and a composition of ordinary torch ops (everything else: GPU,
    half precision, autocast, ``torch.compile``, ``torch.func`` transforms, soft-capping). Either way the returned
    P_G is the autograd node the output hangs from, so hooks and ``retain_grad()`` on it see ∂L/∂P_G.

    Args:
        query: Q⁺ (B, H, Tq, D). key, value: (B, H, Tk, D).
        query_neg: Q⁻ = ReLU(Q⁺) W⁻ (B, H, Tq, D), see ``negative_query_from_weight`` (``gpam_rope.negative_query``
            for a module).
        attention_mask: additive float or boolean (True = attend) mask broadcastable to (B, H, Tq, Tk).
        is_causal: apply a bottom-right aligned causal mask on top of ``attention_mask``.
        dropout_p: dropout on the combined map P_G, in [0, 1] (pass 0.0 at inference): one keep-mask over the
            entries of P_G, kept entries scaled by 1 / (1 − p), so E[output] is the output without dropout; 1.0
            gives zeros, as ``F.dropout(p=1)`` does. The returned map is the dropped one, as in stock eager.
            (``sdpa_gpam_attention`` drops P⁺ and P⁻ independently instead: same expectation, more variance.)
        upcast: compute scores and softmax in float32 (GPT-2's ``reorder_and_upcast_attn``).
        softcap: logit soft-capping ``tanh(s / softcap) · softcap`` of both score maps (Gemma 2), or None.
        fast_path: None (default) takes the in-place autograd function wherever it is exact; False forces the
            composed path; True requires the in-place one and raises ``ValueError`` where it does not apply.

    Returns:
        ``(output, p_gpam)``: output (B, H, Tq, D) and the signed map P_G (B, H, Tq, Tk) in ``value``'s dtype.

    Example:

    ```python
    >>> q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    >>> lam = torch.full((2,), 0.5)
    >>> out, p_gpam = eager_gpam_attention(q, k, v, negative_query_from_weight(q, -torch.eye(8)), lam, lam, scaling=8**-0.5)
    >>> out.shape, p_gpam.shape
    (torch.Size([1, 2, 5, 8]), torch.Size([1, 2, 5, 5]))
    ```
    """
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"eager_gpam_attention: dropout_p={dropout_p} is not a probability in [0, 1]")
    if fast_path is not False:
        refusal = "soft-capping is not implemented there" if softcap is not None else fast_path_refusal(
            query, key, value, query_neg, attention_mask, upcast
        )
        if refusal is None:
            # same numbers with a fraction of the T×T buffers; see gpam_eager_autograd. O = P_G V is computed here,
            # outside the function, so that the returned P_G is the node the output depends on.
            p_gpam = EagerGpamFunction.apply(
                query, query_neg, key, lambda_pos, lambda_neg, attention_mask, scaling, is_causal, dropout_p
            )
            return torch.matmul(p_gpam, value), p_gpam
        if fast_path:
            raise ValueError(
                f"eager_gpam_attention(fast_path=True): the in-place path does not apply here: {refusal}. Pass "
                "fast_path=None to choose automatically, or False for the composed path."
            )
    mask = additive_mask(attention_mask, torch.float32 if upcast else query.dtype)
    # softmax in at least float32 (as transformers' eager functions do), the maps back in the input dtype
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)
    p_pos = torch.softmax(_scores(query, key, scaling, mask, is_causal, upcast, softcap), dim=-1, dtype=softmax_dtype)
    p_neg = torch.softmax(
        _scores(query_neg, key, scaling, mask, is_causal, upcast, softcap), dim=-1, dtype=softmax_dtype
    )
    # (B, H, Tq, Tk)
    p_gpam = combine_dual_attention(p_pos, p_neg, lambda_pos, lambda_neg).to(value.dtype)
    if dropout_p > 0.0:
        p_gpam = F.dropout(p_gpam, p=dropout_p, training=True)
    return torch.matmul(p_gpam, value), p_gpam


def broadcasts_over_queries(attention_mask: torch.Tensor | None) -> bool:
    """Whether every query row of ``attention_mask`` (…, Tq, Tk) is the same row: size 1 or stride 0 on that axis.

    transformers' padding masks for encoders and cross-attention are such expanded views of one (B, 1, 1, Tk) row.
    """
    return attention_mask is None or attention_mask.shape[-2] == 1 or attention_mask.stride(-2) == 0


def sdpa_gpam_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_neg: torch.Tensor,
    lambda_pos: torch.Tensor,
    lambda_neg: torch.Tensor,
    *,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
    fold_groups: int = 1,
) -> torch.Tensor:
    """Fused daGPAM: two softmax attentions through ``scaled_dot_product_attention``, combined linearly.

    ``is_causal`` is SDPA's flag (top-left aligned; only meaningful with ``attention_mask=None`` and Tq == Tk).
    ``enable_gqa`` lets K and V have fewer heads than the queries (grouped-query attention), read without copies.
    ``fold_groups`` = n > 1 reads grouped K/V heads another way, for masks that SDPA's GQA mode would send down its
    math path: the n query heads sharing a K/V head are folded into the query axis, (B, H, Tq, D) ->
    (B, H/n, n·Tq, D), so one call attends with K and V as they are. Only valid when the mask is one row shared by
    every query and head ((B, 1, 1, Tk), padding masks of decode steps) and ``is_causal`` is False; nothing is
    copied but the query (one row per head in a decode step).

    Two layouts, neither with any T×T tensor:
      * decode steps (one query row): one call with [Q⁺; Q⁻] stacked along the query axis, which reads the KV cache
        once for both maps;
      * everything else: two kernel calls, one per map. That measures fastest for causal training shapes, and at
        long lengths it needs no (B, H, 2·Tq, D) stacked copies, so peak memory stays near the stock one.
    A mask whose query rows are all the same row (transformers' padding masks for encoders and cross-attention are
    expanded views of one (B, 1, 1, Tk) row) is passed as that row, never expanded or copied.
    Dropout, when on, is applied inside the kernel calls: entries of P⁺ and P⁻ are dropped independently. The
    expected output is the output without dropout, as with eager's single mask over P_G, but the variance per
    entry is p/(1−p)·Σ_j ((1+λ⁺)²P⁺² + (λ⁻)²P⁻²)·V² instead of p/(1−p)·Σ_j P_G²·V²: larger for λ⁻ ≥ 0, since
    the negative cross term of P_G² is gone.

    Returns the output (B, H, Tq, D).
    """
    q_len = query.shape[-2]
    if attention_mask is not None and broadcasts_over_queries(attention_mask):
        # one mask row shared by every query: a view of that row broadcasts over any number of queries
        attention_mask = attention_mask[..., :1, :]
    if fold_groups > 1 and (
        is_causal or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1:3] != (1, 1)
    ):
        raise ValueError("sdpa_gpam_attention: fold_groups needs a one-row (B, 1, 1, Tk) mask and is_causal=False")

    def sdpa(queries, key, value, **options):
        if fold_groups == 1:
            return F.scaled_dot_product_attention(queries, key, value, **options)
        batch, heads, length, dim = queries.shape
        # (B, H, T, D) -> (B, H/n, n·T, D): query head h = g·n + r reads K/V head g, as repeat_kv would give it
        folded = queries.reshape(batch, heads // fold_groups, fold_groups * length, dim)
        return F.scaled_dot_product_attention(folded, key, value, **options).reshape(batch, heads, length, dim)

    if q_len == 1 and not is_causal:
        # (B, H, 2, D): both queries of a decode step in one call
        stacked = torch.cat([query, query_neg], dim=-2)
        out = sdpa(stacked, key, value, attn_mask=attention_mask, dropout_p=dropout_p, scale=scaling,
                   enable_gqa=enable_gqa)
        out_pos, out_neg = out[..., :q_len, :], out[..., q_len:, :]
    else:
        # the negative map first, so that Q⁻ (when the caller holds no other reference to it) is freed before the
        # second kernel call: at inference one (B, H, Tq, D) buffer less at this layer's memory peak
        out_neg = sdpa(query_neg, key, value, attn_mask=attention_mask, dropout_p=dropout_p, is_causal=is_causal,
                       scale=scaling, enable_gqa=enable_gqa)
        del query_neg
        out_pos = sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout_p, is_causal=is_causal,
                       scale=scaling, enable_gqa=enable_gqa)
    # the two kernel outputs are this function's own buffers
    return combine_dual_attention(out_pos, out_neg, lambda_pos, lambda_neg, overwrite_positive=True)


def reference_gpam_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_neg_weight: torch.Tensor,
    lambda_pos: torch.Tensor,
    lambda_neg: torch.Tensor,
    *,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """The spec's formulas, written out literally in float64; the tests' ground truth.

    Masks follow the eager convention (boolean True = attend, or additive float). Returns a dict with
    ``output`` (B, H, Tq, D) and the maps ``p_pos``, ``p_neg``, ``p_gpam`` (B, H, Tq, Tk), all float64.
    """
    q, k, v, w = (t.to(torch.float64) for t in (query, key, value, q_neg_weight))
    lam_pos = lambda_pos.to(torch.float64).view(1, -1, 1, 1)
    lam_neg = lambda_neg.to(torch.float64).view(1, -1, 1, 1)
    allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = causal_mask(q.shape[-2], k.shape[-2], q.device)
    bias = torch.zeros((), dtype=torch.float64, device=q.device)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            allowed = allowed & attention_mask
        else:
            bias = attention_mask.to(torch.float64)

    def softmax_map(queries):
        scores = queries @ k.transpose(-1, -2) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores + bias
        scores = scores.masked_fill(~allowed, float("-inf"))
        # rows with nothing to attend to come out uniform, as they do with transformers' finite masks
        scores = torch.where(allowed.any(-1, keepdim=True), scores, torch.zeros_like(scores))
        return torch.softmax(scores, dim=-1)

    p_pos = softmax_map(q)
    p_neg = softmax_map(torch.relu(q) @ w.transpose(0, 1))
    p_gpam = (1 + lam_pos) * p_pos - lam_neg * p_neg
    return {"output": p_gpam @ v, "p_pos": p_pos, "p_neg": p_neg, "p_gpam": p_gpam}
