"""The packed-row guard: several sequences packed into one row must not see each other.

``DataCollatorWithFlattening`` packs sequences into one row whose ``position_ids`` restart at 0 at each sequence.
transformers builds a mask that separates them only when the forward gets no 2D attention mask and no cache
(``use_cache=False``), and some families (OPT) never do; stock attention then silently attends across sequences.
daGPAM refuses that instead, reading the mask the attention function received.

A restart is a query whose position is 0 and does not follow a -1. It is separated when its query sees no key before
its own. Restarts whose query the mask blocks from its own key are padding tokens (``generate()`` gives every padding
token position 0), whatever the padding side: they are skipped, as stock runs them. The query's own key column is read
off the mask itself, not assumed to sit at the end of the keys: with a ``StaticCache`` the keys are the whole cache.
"""

from __future__ import annotations

import torch


def _mask_rows(attention_mask, rows: torch.Tensor, queries: torch.Tensor, batch: int, q_len: int, k_len: int):
    """``(allowed, causal_rows)``: ``allowed`` the (N, Tk) boolean rows of the mask (True where query ``queries[n]`` of
    batch row ``rows[n]`` may attend to a key); ``causal_rows`` False when one mask row is shared by every query (no
    causal structure to read a query's own key from)."""
    if not isinstance(attention_mask, torch.Tensor):
        # flex attention's BlockMask: its mask_mod evaluated densely, (B, 1, Tq, Tk)
        from torch.nn.attention.flex_attention import create_mask

        dense = create_mask(attention_mask.mask_mod, batch, 1, q_len, k_len, device=attention_mask.kv_indices.device)
        return dense[rows, 0, queries], True
    columns = torch.arange(k_len, device=attention_mask.device)
    if attention_mask.dim() == 2:
        # flash attention's (B, Tk) padding mask (1 = keep); the kernel's causality is aligned to the bottom right
        causal = columns[None, :] <= (queries + (k_len - q_len))[:, None]
        return attention_mask[rows].bool() & causal, True
    # (B or 1, H or 1, Tq or 1, Tk): boolean (True = attend) or additive float (blocked = the dtype's minimum)
    shared_rows = attention_mask.shape[-2] == 1
    mask = attention_mask[
        rows if attention_mask.shape[0] > 1 else torch.zeros_like(rows), 0,
        torch.zeros_like(queries) if shared_rows else queries, :k_len,
    ]
    return (mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2), not shared_rows


def check_packed_rows_are_separated(
    position_ids: torch.Tensor | None,
    attention_mask,
    batch: int,
    q_len: int,
    k_len: int,
    backend: str,
    *,
    kernel_separates: bool = False,
) -> None:
    """Raise ``ValueError`` when ``position_ids`` restart at 0 inside a row but the mask lets the new sequence attend
    to keys before its own (the sequence packed before it, or a cache in front).

    Args:
        position_ids: (B or 1, Tq), as the attention function received them, or None.
        attention_mask: what the attention function received: a 4D boolean or additive mask (B or 1, H or 1, Tq or 1,
            Tk), flash attention's 2D padding mask (B, Tk), flex attention's ``BlockMask``, or None (causality alone).
        batch, q_len, k_len: B, Tq and Tk of the query and keys.
        kernel_separates: the backend separates packed rows by itself when no mask is given (flash attention's
            varlen path, which reads ``position_ids``).

    A restart's own key is the key its mask row allows and the row of the query before it does not (causality adds
    exactly one key per query): no such key means a padding token, whose key the mask blocks. Only the mask rows of
    restarts and of the queries before them are read. Skipped for single-token steps and while ``torch.compile``
    traces (a data-dependent check would break the graph).
    """
    if position_ids is None or q_len < 2 or position_ids.shape[-1] != q_len or torch.compiler.is_compiling():
        return
    # (B or 1, Tq - 1): True where query j + 1 restarts
    positions = position_ids.reshape(-1, q_len)
    restarts = (positions[:, 1:] == 0) & (positions[:, :-1] != -1)
    if not bool(restarts.any()):
        return
    if attention_mask is None:
        separated = kernel_separates
    else:
        rows, before = restarts.expand(max(batch, positions.shape[0]), -1).nonzero(as_tuple=True)
        query = before + 1
        # (N, Tk) each: the rows of the restart queries and of the queries just before them
        seen, causal_rows = _mask_rows(attention_mask, rows, query, batch, q_len, k_len)
        columns = torch.arange(seen.shape[-1], device=seen.device)
        if causal_rows:
            previous, _ = _mask_rows(attention_mask, rows, before, batch, q_len, k_len)
            new = seen & ~previous
            is_real = new.any(-1)
            own = torch.where(new, columns, -1).amax(-1)
        else:
            # one row for every query (no causal structure): the queries sit at the end of the keys
            own = query + (k_len - q_len)
            is_real = seen.gather(1, own[:, None])[:, 0]
        sees_before = (seen & (columns[None, :] < own[:, None])).any(-1)
        separated = not bool((is_real & sees_before).any())
    if not separated:
        raise ValueError(
            f"daGPAM attention ({backend}): position_ids restart at 0 inside a row (several sequences packed into "
            "one row), but the attention mask lets each sequence attend to the one before it. transformers builds "
            "a mask that separates packed sequences only when the forward gets no attention_mask and no cache: pass "
            "use_cache=False (and no attention_mask), as DataCollatorWithFlattening batches are meant to be used. "
            "Families whose masks ignore position_ids (OPT) cannot run packed rows; pad them instead."
        )
