"""daGPAM behind transformers' attention interface.

Every attention module of GPT-2, BART, Marian, Llama, Qwen, Gemma, GPT-NeoX, OPT, OLMo2, ... does its own
projections, q/k norms, rotary embeddings and KV-cache update, then calls

    ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)(
        module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)

daGPAM lives entirely behind that call, and is routed there by module, not by model: a GPAM model's config keeps the
stock backend name ("sdpa", "eager", "flex_attention", "paged|eager", "flash_attention_2", a Hub kernel), so every
check transformers makes on that name (continuous batching, ``transformers serve``, ``output_attentions``, mask
creation) sees a stock model. Each daGPAM attention module reads the config through ``GpamAttentionConfig``
(``gpam_attention``), whose ``_attn_implementation`` is the daGPAM function registered for that backend:

- ``gpam_eager``: the maps materialised, the signed P_G returned (``eager``);
- ``gpam_sdpa``: fused through ``scaled_dot_product_attention`` with no T×T tensor (``sdpa``);
- ``gpam_<backend>`` for every other backend: ``dual_attention_forward`` around the stock function. Q⁺ and Q⁻ share K
  and V, so daGPAM is the stock function over 2H query heads laid out as grouped-query groups ([Q⁺; Q⁻] per K/V
  head), followed by O = (1+λ⁺)·O⁺ − λ⁻·O⁻. Any backend that supports grouped-query attention runs that layout.

The function gets the module, so its ``gpam_q_neg`` (W⁻) and ``gpam_lambda`` (λ) are at hand, and ``query`` is Q⁺
exactly as it enters the softmax. Modules without daGPAM parameters (unselected layers, ``gpam_mode="softmax"``) keep
the stock config and never reach these functions; a module that does is handed to the stock function unchanged.

No stock ``forward`` is copied: when transformers renames something inside its attention modules (5.24 renamed
``past_key_values=`` to ``cache=``), the stock forward still does it right, and daGPAM only sees the keywords that
reach the attention function. Each keyword is handled explicitly (``KEYWORD_POLICY``); an unknown one is an error,
never silently swallowed.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask, sdpa_mask

from .gpam_ops import broadcasts_over_queries, combine_dual_attention, eager_gpam_attention, sdpa_gpam_attention
from .gpam_version import check_transformers_version


check_transformers_version()

# the daGPAM functions written for the stock eager and sdpa backends; every other backend gets "gpam_<name>", the
# dual-attention wrapper around its stock function (registered on first use)
GPAM_ATTN_IMPLEMENTATIONS = {"eager": "gpam_eager", "sdpa": "gpam_sdpa"}
GPAM_BACKEND_PREFIX = "gpam_"

# What daGPAM does with each keyword a stock eager / sdpa attention function can receive. Stock attention modules
# pass their **kwargs on to the attention function, so every keyword of transformers' TransformersKwargs and
# FlashAttentionKwargs, and every loss keyword a model's forward accepts, can arrive here; tests/test_interface.py
# walks those annotations and the loss functions' signatures, so a keyword a new release adds fails a test here
# before it reaches a user's run.
#   "applied"   changes the math; applied to both maps exactly as stock applies it to its one map
#   "mask"      already encoded in the attention mask transformers built from it (sliding windows, packed
#               sequences), which both maps share; the flash-only packing metadata is redundant with that mask.
#               position_ids are also checked: rows that pack several sequences need a mask that separates them
#   "ignored"   output / cache / loss arguments that do not change attention; stock eager and sdpa ignore them too
#   "paged"     continuous batching's paged-cache bookkeeping: ignored by gpam_eager / gpam_sdpa (the mask describes
#               the batch), passed on by the dual-attention wrapper; the packed-row check is skipped (paged K/V are not
#               laid out by position)
#   "refused"   raises ValueError when set (not None): daGPAM has no definition for it yet
KEYWORD_POLICY = {
    "softcap": "applied",
    "is_causal": "applied",
    # (cos, sin) the stock forward rotated the query with, handed on by the GPAM attention class of a RoPE family
    # when gpam_rope_variant="relative" (see negative_query)
    "gpam_position_embeddings": "applied",
    "sliding_window": "mask",
    "position_ids": "mask",
    "cu_seq_lens_q": "mask",
    "cu_seq_lens_k": "mask",
    "max_length_q": "mask",
    "max_length_k": "mask",
    # DataCollatorWithFlattening(return_seq_idx=True): the sequence index of each packed token (Mamba-style layers)
    "seq_idx": "mask",
    "use_cache": "ignored",
    # stock sdpa warns that it returns no maps; gpam_sdpa does the same (see warn_no_attention_maps)
    "output_attentions": "ignored",
    "output_hidden_states": "ignored",
    "output_router_logits": "ignored",
    # the loss keywords of a causal LM's forward travel with its **kwargs down to attention: the Trainer's
    # loss-normalisation count, and shift_labels under context parallelism
    "num_items_in_batch": "ignored",
    "shift_labels": "ignored",
    "ignore_index": "ignored",
    # generate(**batch) on an encoder-decoder hands the batch's labels to the encoder (Seq2SeqTrainer.predict does)
    "labels": "ignored",
    # generate(..., tokenizer=) (stop strings; transformers serve passes it) leaves it in the model keywords
    "tokenizer": "ignored",
    # continuous batching's bookkeeping (paged KV cache, batched logits): the cache hands the attention function the
    # gathered K/V, and the mask it builds describes the batch layout; the wrapper passes them on to paged backends
    "read_index": "paged",
    "write_index": "paged",
    "block_table": "paged",
    "logits_indices": "paged",
    "logits_processor_args": "paged",
    # attention sinks: GPT-OSS-style families (reachable through patch_model(allow_untested=True))
    "s_aux": "refused",
}
REFUSED_REASONS = {
    "s_aux": "attention sinks (an extra softmax column per head) are not defined for the two daGPAM maps",
}


# attention functions that serving engines register under their own names and that run an attention layer of the
# engine's instead of the model's heads: the 2H-head layout cannot reach it, so the model would compute plain softmax
# attention (or fail on a shape). Refused by name, in one line.
FOREIGN_ATTENTION_BACKENDS = {
    "vllm": "vLLM's Transformers modeling backend (model_impl='transformers', or vLLM's fallback for an architecture "
    "it does not know)",
    "vllm_mla": "vLLM's Transformers modeling backend (model_impl='transformers')",
}


def foreign_backend_error(backend: str, model_name: str = "a daGPAM model") -> ValueError:
    """The one-line error for a backend of ``FOREIGN_ATTENTION_BACKENDS``."""
    return ValueError(
        f"{model_name} cannot run on {FOREIGN_ATTENTION_BACKENDS[backend]}: it replaces the attention function with "
        "its own and would compute plain softmax attention, not daGPAM. Serve Llama, Mistral, Qwen2 and Qwen3 GPAM "
        "checkpoints with hf_gpam's vLLM plugin (pip install 'hf_gpam[vllm]', and leave model_impl at 'auto' or "
        "'vllm'), or run the model in transformers (generate, generate_batch, hf-gpam serve)."
    )


def gpam_attn_implementation(stock_name: str | None) -> str:
    """The registered daGPAM function that a daGPAM attention module calls when its model runs ``stock_name``.

    ``"eager"`` -> ``"gpam_eager"``, ``"sdpa"`` and None (a module used alone) -> ``"gpam_sdpa"``, any other backend
    ``X`` -> ``"gpam_X"``, the dual-attention wrapper around X's stock function, registered here on first use. A
    daGPAM name (what release 0.2 configs held) is returned as it is.
    """
    if stock_name is None:
        return GPAM_ATTN_IMPLEMENTATIONS["sdpa"]
    if stock_name.startswith(GPAM_BACKEND_PREFIX):
        return stock_name
    if stock_name in FOREIGN_ATTENTION_BACKENDS:
        raise foreign_backend_error(stock_name)
    name = GPAM_ATTN_IMPLEMENTATIONS.get(stock_name, GPAM_BACKEND_PREFIX + stock_name)
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, dual_attention_function(stock_name))
    return name


def stock_attn_implementation(name: str | None) -> str | None:
    """The stock backend a model config holds for ``name``: ``"gpam_sdpa"`` -> ``"sdpa"``; stock names unchanged."""
    if name is not None and name.startswith(GPAM_BACKEND_PREFIX):
        return name[len(GPAM_BACKEND_PREFIX):]
    return name


def is_gpam_attention_module(module: torch.nn.Module) -> bool:
    """True for an attention module that carries daGPAM parameters (hf_gpam's classes or remote-code ones)."""
    return getattr(module, "gpam_lambda", None) is not None and getattr(module, "gpam_q_neg", None) is not None


def check_attention_keywords(kwargs: dict, backend: str) -> dict:
    """Validate the keywords a daGPAM attention function received; return the ones it applies.

    Raises ``TypeError`` for a keyword not in ``KEYWORD_POLICY`` and ``ValueError`` for a refused one that is set.
    """
    applied = {}
    for name, value in kwargs.items():
        policy = KEYWORD_POLICY.get(name)
        if policy is None:
            raise TypeError(
                f"daGPAM attention ({backend}) received the unknown keyword {name!r}. transformers passes keywords to "
                "attention functions that hf_gpam does not know yet; rather than ignoring one that may change the "
                f"math, it stops here. Known keywords: {', '.join(sorted(KEYWORD_POLICY))}. Check that your "
                "transformers version is in hf_gpam's verified range, and report this keyword."
            )
        if policy == "refused" and value is not None:
            raise ValueError(f"daGPAM attention ({backend}): {name}= is not supported: {REFUSED_REASONS[name]}.")
        if policy == "applied":
            applied[name] = value
    if backend == "sdpa" and kwargs.get("output_attentions"):
        # stock sdpa warns and returns no maps; so does gpam_sdpa, pointing to the backend that returns P_G
        warnings.warn(
            "daGPAM attention (sdpa) returns no attention maps for output_attentions=True (the fused path never "
            "builds them). Load the model with attn_implementation='eager' (or call "
            "model.set_attn_implementation('eager')) to get the signed maps P_G.",
            UserWarning,
            stacklevel=3,
        )
    if backend == "sdpa" and applied.get("softcap") is not None:
        # what stock sdpa does too: scaled_dot_product_attention has no soft-capping
        raise ValueError(
            "daGPAM attention (sdpa) does not support softcap (logit soft-capping), as transformers' sdpa does not; "
            "load the model with attn_implementation='eager'."
        )
    return applied


def _key_value_groups(query: torch.Tensor, key: torch.Tensor) -> int:
    # grouped-query attention: H query heads share H_kv key/value heads, H = n_rep · H_kv
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"daGPAM attention: {heads} query heads cannot share {kv_heads} key/value heads")
    return heads // kv_heads


ROTARY_LAYOUTS = ("half", "interleaved")


def _rotate_pairs(x: torch.Tensor, layout: str) -> torch.Tensor:
    # "half": dims i and i + R/2 form one rotated pair (Llama, Qwen, Gemma, Phi-3, GPT-NeoX, OLMo2: every RoPE
    # family of the table); "interleaved": dims 2i and 2i + 1 do (Cohere, GPT-J)
    if layout == "half":
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    if layout == "interleaved":
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    raise ValueError(f"rotary layout {layout!r} is not one of {', '.join(map(repr, ROTARY_LAYOUTS))}")


def rotate_query(
    query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False, layout: str = "half"
) -> torch.Tensor:
    """RoPE (or its inverse) on the first R = ``cos.shape[-1]`` dims of ``query`` (B, H, T, D); the rest pass through.

    ``cos`` and ``sin`` are (B, T, R), as a stock rotary embedding returns them; R < D is partial rotary (GPT-NeoX
    ``rotary_pct``, Phi-3 ``partial_rotary_factor``). ``layout`` says which dims form a rotated pair (see
    ``ROTARY_LAYOUTS``; ``rotary_layout`` finds it for a stock attention class). RoPE scales each pair by
    a = √(cos² + sin²) (1 for plain RoPE, the attention factor of YaRN-style scalings), so the inverse rotates back
    and divides by a², which undoes the forward map exactly up to rounding.
    """
    rotary = cos.shape[-1]
    # (B, T, R) -> (B, 1, T, R): the same angles for every head
    cos, sin = cos.unsqueeze(1).to(query.dtype), sin.unsqueeze(1).to(query.dtype)
    rot, passed = query[..., :rotary], query[..., rotary:]
    if inverse:
        rotated = (rot * cos - _rotate_pairs(rot, layout) * sin) / (cos * cos + sin * sin)
    else:
        rotated = rot * cos + _rotate_pairs(rot, layout) * sin
    return rotated if rotary == query.shape[-1] else torch.cat((rotated, passed), dim=-1)


_ROTARY_LAYOUTS: dict[type, str | None] = {}


def rotary_layout(attention_class: type, head_dim: int) -> str | None:
    """The rotary layout (``"half"`` or ``"interleaved"``) of a stock attention class, or None if neither fits.

    Read off the ``apply_rotary_pos_emb`` of the transformers modeling file that defines the class: it rotates a
    random query with random angles laid out as each candidate layout lays them out (``cat(θ, θ)`` for "half",
    ``repeat_interleave(θ, 2)`` for "interleaved"), and the layout whose rotation ``rotate_query`` reproduces is
    the class's. None when the file has no such function, or it matches neither (the relative reading of Q⁻ cannot
    be computed then).
    """
    if attention_class in _ROTARY_LAYOUTS:
        return _ROTARY_LAYOUTS[attention_class]
    apply_rotary = None
    for base in attention_class.__mro__:
        if base.__module__.startswith("transformers."):
            apply_rotary = getattr(sys.modules.get(base.__module__), "apply_rotary_pos_emb", None)
            if apply_rotary is not None:
                break
    found = None
    if apply_rotary is not None and head_dim % 2 == 0:
        generator = torch.Generator().manual_seed(0)
        # (1, 1, T, D) query, T = 3 positions with distinct angles per pair; on the CPU explicitly, since models are
        # often built under a meta-device context (from_pretrained)
        query = torch.randn(1, 1, 3, head_dim, generator=generator, dtype=torch.float64, device="cpu")
        angles = torch.rand(1, 3, head_dim // 2, generator=generator, dtype=torch.float64, device="cpu") * 6.0
        for layout in ROTARY_LAYOUTS:
            spread = torch.cat((angles, angles), -1) if layout == "half" else angles.repeat_interleave(2, -1)
            cos, sin = spread.cos(), spread.sin()
            try:
                rotated = apply_rotary(query, query, cos, sin)[0]
            except Exception:  # a signature this probe does not know: no layout, 'relative' is refused
                break
            if rotated.shape == query.shape and torch.allclose(rotated, rotate_query(query, cos, sin, layout=layout)):
                found = layout
                break
    _ROTARY_LAYOUTS[attention_class] = found
    return found


def negative_query(
    module: torch.nn.Module,
    query: torch.Tensor,
    upcast: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Q⁻, (B, H, Tq, D), through the module call so that wrappers (PEFT's LoRA) take part.

    Without ``position_embeddings``: Q⁻ = ReLU(Q⁺) W⁻ from the query as it enters the softmax (the spec, and
    ``gpam_rope_variant="literal"`` in RoPE families). With the ``(cos, sin)`` the stock forward rotated the query
    with (``gpam_rope_variant="relative"``): Q̃ = RoPE⁻¹(Q⁺) is the query before rotation, and
    Q⁻ = RoPE(ReLU(Q̃) W⁻) is rotated with the same positions as Q⁺ and K, so P⁻ depends on i − j only, like P⁺.

    With ``upcast`` (GPT-2's ``reorder_and_upcast_attn``) the projection runs outside autocast in the weight's
    precision: Q⁻ feeds the negative map's scores, which that option computes in float32.
    """
    if position_embeddings is not None:
        cos, sin = position_embeddings
        layout = getattr(module, "gpam_rotary_layout", "half")
        # the rotations in at least float32: in bf16 the inverse alone adds about 1 % relative error to Q⁻
        work = torch.promote_types(query.dtype, torch.float32)
        if layout == "half":
            return relative_negative_query(module, query, cos, sin, work)
        unrotated = rotate_query(query.to(work), cos.to(work), sin.to(work), inverse=True, layout=layout)
        projected = _project(module, F.relu(unrotated).to(query.dtype))
        return rotate_query(projected.to(work), cos.to(work), sin.to(work), layout=layout).to(query.dtype)
    if not upcast:
        return _project(module, F.relu(query))
    with torch.autocast(query.device.type, enabled=False):
        return module.gpam_q_neg(F.relu(query).to(module.gpam_q_neg.weight.dtype))


# the rotation coefficients of the last (cos, sin) pair seen: every layer of a forward pass gets the same two tensors
# from the model's rotary embedding, so they are derived once per pass instead of once per layer
_ROTATION_COEFFICIENTS: dict = {}


def half_rotation_coefficients(cos: torch.Tensor, sin: torch.Tensor, work: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``(c, s, c_inv, s_inv)``, each (B, 1, T, R), for the "half" rotary layout in dtype ``work``.

    With r = ``roll(x, R/2)`` (the two halves of the rotated dims swapped), RoPE is ``x·c + r·s`` and its inverse
    ``x·c_inv + r·s_inv``: ``rotate_half(x)·sin`` = ``r·s`` with s = [−sin₁; sin₂], and the inverse divides by
    a² = cos² + sin² as ``rotate_query(inverse=True)`` does. Cached for the last (cos, sin) pair: the same two tensor
    objects at the same versions (an in-place change of either derives them again); never while compiling or when
    they need gradients.
    """
    key = (cos, sin, cos._version, sin._version, work)
    cached = _ROTATION_COEFFICIENTS.get("last")
    if cached is not None and cached[0] is cos and cached[1] is sin and cached[2:5] == key[2:]:
        return cached[5]
    c, s = cos.to(work).unsqueeze(1), sin.to(work).unsqueeze(1)
    half = c.shape[-1] // 2
    s_signed = torch.cat((-s[..., :half], s[..., half:]), dim=-1)
    inverse_scale = torch.reciprocal(c * c + s * s)
    coefficients = (c, s_signed, c * inverse_scale, -s_signed * inverse_scale)
    if not (cos.requires_grad or sin.requires_grad or torch.compiler.is_compiling()):
        _ROTATION_COEFFICIENTS["last"] = (*key, coefficients)
    return coefficients


def relative_negative_query(
    module: torch.nn.Module, query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, work: torch.dtype
) -> torch.Tensor:
    """Q⁻ = RoPE(ReLU(RoPE⁻¹(Q⁺)) W⁻) for the "half" rotary layout, in few ops: each rotation is one ``roll`` and one
    ``addcmul`` over the query (``half_rotation_coefficients``); partial rotary dims (R < D) pass through.

    Written flat, without helpers or no-op casts: in a decode step every op and Python call costs about as much as the
    arithmetic, once per layer and token.
    """
    c, s, c_inv, s_inv = half_rotation_coefficients(cos, sin, work)
    rotary, half = c.shape[-1], c.shape[-1] // 2
    partial = rotary != query.shape[-1]
    x = query if query.dtype == work else query.to(work)
    part = x[..., :rotary] if partial else x
    unrotated = torch.addcmul(part * c_inv, part.roll(half, dims=-1), s_inv)
    if partial:
        unrotated = torch.cat((unrotated, x[..., rotary:]), dim=-1)
    activations = F.relu(unrotated)
    projected = _project(module, activations if query.dtype == work else activations.to(query.dtype))
    y = projected if projected.dtype == work else projected.to(work)
    part = y[..., :rotary] if partial else y
    rotated = torch.addcmul(part * c, part.roll(half, dims=-1), s)
    if partial:
        rotated = torch.cat((rotated, y[..., rotary:]), dim=-1)
    return rotated if rotated.dtype == query.dtype else rotated.to(query.dtype)


def _project(module: torch.nn.Module, activations: torch.Tensor) -> torch.Tensor:
    # W⁻ may be kept in another dtype than the activations: float32 next to a quantized base loaded in half precision,
    # or after peft.prepare_model_for_kbit_training; outside autocast the input follows W⁻ and the result comes back
    weight = getattr(module.gpam_q_neg, "weight", None)
    if weight is None or weight.dtype == activations.dtype or torch.is_autocast_enabled(activations.device.type):
        return module.gpam_q_neg(activations)
    return module.gpam_q_neg(activations.to(weight.dtype)).to(activations.dtype)


def relative_position_embeddings(module: torch.nn.Module, applied: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(cos, sin)`` that Q⁻ must be rotated with, or None for Q⁻ = ReLU(Q⁺) W⁻.

    On a RoPE family's module (``gpam_rotary``) with ``gpam_rope_variant="relative"``, a forward pre-hook
    (``gpam_attention.hand_on_rotary_embeddings``) hands them on as ``gpam_position_embeddings``; families without
    RoPE ignore the variant.
    """
    if getattr(module, "gpam_rope_variant", "literal") != "relative" or not getattr(module, "gpam_rotary", False):
        return None
    position_embeddings = applied.get("gpam_position_embeddings")
    if position_embeddings is None:
        raise ValueError(
            f"gpam_rope_variant='relative' needs the rotary embeddings (cos, sin) the stock {type(module).__name__} "
            "rotates the query with, and none reached the attention function (the module was called without "
            "position_embeddings, or its class does not hand them on). Pass position_embeddings, or use "
            "gpam_rope_variant='literal'."
        )
    return position_embeddings


def check_packed_rows_are_separated(
    kwargs: dict, attention_mask: torch.Tensor | None, q_len: int, k_len: int, backend: str
) -> None:
    """Raise ``ValueError`` when the ``position_ids`` keyword restarts at 0 inside a row but the mask lets the new
    sequence attend to the one before it.

    transformers builds a mask that separates packed sequences from ``position_ids`` only when no 2D attention mask
    and no cache are given (``use_cache=False``), and some families (OPT) never do; stock attention then silently
    attends across sequences. A row restarts where a position is 0 and does not follow its predecessor; the check
    reads one mask entry per restart (query at the restart, key just before it). Left padding passes: its first
    real token is position 0 and the key before it is padding, which the mask blocks. Skipped for single-token
    steps, continuous batching's calls (paged K/V are not laid out by position) and while ``torch.compile`` traces (a
    data-dependent check would break the graph).
    """
    position_ids = kwargs.get("position_ids")
    if position_ids is None or q_len < 2 or position_ids.shape[-1] != q_len or torch.compiler.is_compiling():
        return
    if any(KEYWORD_POLICY.get(name) == "paged" and value is not None for name, value in kwargs.items()):
        return
    # (B or 1, Tq)
    positions = position_ids.reshape(-1, q_len)
    restarts = (positions[:, 1:] == 0) & (positions[:, :-1] != -1)
    if not bool(restarts.any()):
        return
    separated = attention_mask is not None
    if separated:
        rows, before = restarts.nonzero(as_tuple=True)
        # query at the restart (before + 1) against the key just before it, in the mask's (B, H, Tq, Tk) layout
        # (size-1 axes broadcast; queries sit at the end of the keys when a cache is in front)
        mask = attention_mask
        batch_index = rows if mask.shape[0] > 1 else torch.zeros_like(rows)
        query_index = before + 1 if mask.shape[-2] > 1 else torch.zeros_like(before)
        entries = mask[batch_index, 0, query_index, before + (k_len - q_len)]
        allowed = entries if entries.dtype == torch.bool else entries > torch.finfo(entries.dtype).min / 2
        separated = not bool(allowed.any())
    if not separated:
        raise ValueError(
            f"daGPAM attention ({backend}): position_ids restart at 0 inside a row (several sequences packed into "
            "one row), but the attention mask lets each sequence attend to the one before it. transformers builds "
            "a mask that separates packed sequences only when the forward gets no attention_mask and no cache: pass "
            "use_cache=False (and no attention_mask), as DataCollatorWithFlattening batches are meant to be used. "
            "Families whose masks ignore position_ids (OPT) cannot run packed rows; pad them instead."
        )


_STOCK_EAGER_FUNCTIONS: dict[type, Callable] = {}


def stock_eager_attention_function(module: torch.nn.Module) -> Callable:
    """The ``eager_attention_forward`` of the transformers modeling file that defines ``module``'s class.

    That is the default every stock attention module passes to ``get_interface``, so a module without daGPAM
    parameters computes under ``gpam_eager`` exactly what it computes under ``eager``.
    """
    cls = type(module)
    function = _STOCK_EAGER_FUNCTIONS.get(cls)
    if function is None:
        for base in cls.__mro__:
            function = getattr(sys.modules.get(base.__module__), "eager_attention_forward", None)
            if function is not None and base.__module__.startswith("transformers."):
                break
            function = None
        if function is None:
            raise ValueError(
                f"{cls.__name__} is not an attention module of a transformers modeling file with an "
                "eager_attention_forward; daGPAM's gpam_eager backend cannot reproduce its stock eager attention"
            )
        _STOCK_EAGER_FUNCTIONS[cls] = function
    return function


def gpam_eager_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``gpam_eager`` attention function: daGPAM with materialised maps, returning the signed P_G.

    Args follow transformers' attention functions: query (B, H, Tq, D), key and value (B, H_kv, Tk, D), the
    additive mask transformers built for eager (B, 1, Tq, Tk) or None. Returns ``(output (B, Tq, H, D), P_G)``.
    """
    if not is_gpam_attention_module(module):
        if getattr(module, "reorder_and_upcast_attn", False):
            # GPT-2 takes this method instead of its eager function when the backend is "eager"
            return module._upcast_and_reordered_attn(query, key, value, attention_mask)
        return stock_eager_attention_function(module)(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    applied = check_attention_keywords(kwargs, "eager")
    check_packed_rows_are_separated(kwargs, attention_mask, query.shape[-2], key.shape[-2], "eager")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    upcast = bool(getattr(module, "reorder_and_upcast_attn", False))
    # Q⁻ from Q⁺ before K and V are repeated; repeat_kv is what stock eager functions do for grouped-query heads
    query_neg = negative_query(module, query, upcast, relative_position_embeddings(module, applied))
    groups = _key_value_groups(query, key)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    lambda_pos, lambda_neg = module.gpam_lambda()
    # stock eager functions never add causality themselves: the eager mask transformers builds is always complete
    output, p_gpam = eager_gpam_attention(
        query, key, value, query_neg, lambda_pos, lambda_neg,
        scaling=scaling, attention_mask=attention_mask, dropout_p=dropout if module.training else 0.0,
        upcast=upcast, softcap=applied.get("softcap"),
    )
    # (B, H, Tq, D) -> (B, Tq, H, D), the layout attention functions return
    return output.transpose(1, 2).contiguous(), p_gpam


def gpam_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``gpam_sdpa`` attention function: fused daGPAM through ``scaled_dot_product_attention``.

    Causality follows transformers' own sdpa function: a mask that causality alone describes arrives as None, and
    the kernel's ``is_causal`` flag is then set (``is_causal`` keyword, else ``module.is_causal``). Returns
    ``(output (B, Tq, H, D), None)``.
    """
    if not is_gpam_attention_module(module):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    applied = check_attention_keywords(kwargs, "sdpa")
    check_packed_rows_are_separated(kwargs, attention_mask, query.shape[-2], key.shape[-2], "sdpa")
    is_causal = applied.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    q_len = query.shape[-2]
    is_causal = q_len > 1 and attention_mask is None and bool(is_causal)
    if is_causal and key.shape[-2] > q_len:
        # prefill into an empty static cache: the kernel's causal mask is top-left aligned, the unused slots go
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    groups = _key_value_groups(query, key)
    # grouped-query heads: the kernel reads shared K/V heads itself when no mask forces its math path (stock's rule);
    # with a one-row mask (padded decode steps) the query heads of a group are folded into the query axis instead,
    # so the KV cache is never copied per step; only other masks (padded prefill) repeat K and V, as stock does
    enable_gqa = groups > 1 and attention_mask is None
    fold = (
        groups > 1 and not enable_gqa and not is_causal and attention_mask.shape[1] == 1
        and broadcasts_over_queries(attention_mask)
    )
    if groups > 1 and not enable_gqa and not fold:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    lambda_pos, lambda_neg = module.gpam_lambda()
    # Q⁻ is handed over without a name here, so the kernel can free it after its use (see sdpa_gpam_attention)
    output = sdpa_gpam_attention(
        query, key, value, negative_query(module, query, position_embeddings=relative_position_embeddings(module, applied)),
        lambda_pos, lambda_neg,
        scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
        attention_mask=attention_mask, is_causal=is_causal, dropout_p=dropout, enable_gqa=enable_gqa,
        fold_groups=groups if fold else 1,
    )
    return output.transpose(1, 2).contiguous(), None


class DoubledQueryHeads:
    """An attention module as a stock attention function sees it when called with 2H query heads.

    Every attribute is the module's, except ``num_key_value_groups``: the stock functions repeat K/V heads by it (eager,
    paged eager) or derive grouped-query attention from the shapes (sdpa, flex, flash), and the doubled layout has
    2n query heads per K/V head.
    """

    def __init__(self, module: torch.nn.Module, groups: int):
        self.__dict__.update(module=module, num_key_value_groups=groups)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["module"], name)


def double_query_heads(query: torch.Tensor, query_neg: torch.Tensor, kv_heads: int, head_axis: int = 1) -> torch.Tensor:
    """The dual-attention layout: Q⁺ and Q⁻ (H heads each along ``head_axis``) -> 2H heads, [Q⁺_g; Q⁻_g] for each of
    the ``kv_heads`` K/V heads g, so that every K/V head serves its n = H / H_kv positive and its n negative heads as
    one grouped-query group of 2n. (B, H, T, D) here; vLLM's (T, H, D) with ``head_axis=1`` too (hf_gpam.serving.vllm_models).
    """
    pair = (query.unflatten(head_axis, (kv_heads, -1)), query_neg.unflatten(head_axis, (kv_heads, -1)))
    return torch.stack(pair, dim=head_axis + 1).flatten(head_axis, head_axis + 2)


def combine_doubled_heads(
    doubled: torch.Tensor, lambda_pos: torch.Tensor, lambda_neg: torch.Tensor, kv_heads: int
) -> torch.Tensor:
    """(B, 2H, Tq, *) laid out by ``double_query_heads`` -> (1+λ⁺)·positive − λ⁻·negative, (B, H, Tq, *): outputs and
    attention maps alike."""
    positive, negative = (half.flatten(1, 2) for half in doubled.unflatten(1, (kv_heads, 2, -1)).unbind(2))
    return combine_dual_attention(positive, negative, lambda_pos, lambda_neg)


def stock_attention_function(stock_name: str, module: torch.nn.Module) -> Callable:
    """The stock attention function a module calls under ``stock_name``, looked up at call time (so a kernel
    registered later under that name is the one used)."""
    if stock_name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[stock_name]
    # a name transformers resolves itself (a deprecated "paged|" prefix, or the module's own eager function)
    return ALL_ATTENTION_FUNCTIONS.get_interface(stock_name, stock_eager_attention_function(module))


def dual_attention_function(stock_name: str) -> Callable:
    """The daGPAM function ``gpam_<stock_name>``: the stock function of ``stock_name`` over 2H query heads.

    Q⁺ and Q⁻ (B, H, Tq, D) share K and V (B, H_kv, Tk, D), so each K/V head g serves its n = H / H_kv positive and its
    n negative query heads: [Q⁺_g; Q⁻_g] laid out as one grouped-query group of 2n heads. The stock function attends
    over that layout (its own mask, cache, sliding window, soft-capping and GQA handling, applied to both maps alike),
    and O = (1+λ⁺)·O⁺ − λ⁻·O⁻ follows outside it. The stock function is looked up at call time, so a kernel
    registered later under the same name is the one used. Returned attention maps, where the backend returns any,
    are combined the same way into the signed P_G.
    """

    def dual_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        **kwargs,
    ):
        stock = stock_attention_function(stock_name, module)
        if not is_gpam_attention_module(module):
            return stock(module, query, key, value, attention_mask, **kwargs)
        applied = check_attention_keywords({k: v for k, v in kwargs.items() if k not in ("dropout", "scaling")},
                                           stock_name)
        passed = {name: v for name, v in kwargs.items() if name != "gpam_position_embeddings"}
        query_neg = negative_query(module, query, position_embeddings=relative_position_embeddings(module, applied))
        kv_heads, groups = key.shape[1], _key_value_groups(query, key)
        doubled = double_query_heads(query, query_neg, kv_heads)
        output, weights = stock(DoubledQueryHeads(module, 2 * groups), doubled, key, value, attention_mask, **passed)
        # outputs come back (B, Tq, 2H, D), maps (where the backend returns any) (B, 2H, Tq, Tk): the signed P_G
        lambdas = module.gpam_lambda()
        combined = combine_doubled_heads(output.transpose(1, 2), *lambdas, kv_heads).transpose(1, 2)
        if weights is not None:
            weights = combine_doubled_heads(weights, *lambdas, kv_heads)
        return combined, weights

    dual_attention_forward.__qualname__ = dual_attention_forward.__name__ = f"gpam_{stock_name}_attention_forward"
    return dual_attention_forward


def register_gpam_attention(replace: bool) -> None:
    """Register ``gpam_eager`` and ``gpam_sdpa`` (attention and mask functions).

    Done when this module is imported, by hf_gpam and by checkpoints' remote code alike. The installed package
    always takes the names (``replace=True``); a copy shipped next to a checkpoint takes them only while they are
    free. So whatever the import order, a process with hf_gpam installed runs the package's functions, for its own
    models and for remote-code ones, and a checkpoint frozen on the Hub never replaces them. The mask functions
    are the stock ones, so both daGPAM maps see exactly the mask (causal, padding, sliding window, packed
    sequences) that stock attention would.
    """
    functions = {"eager": gpam_eager_attention_forward, "sdpa": gpam_sdpa_attention_forward}
    masks = {"eager": eager_mask, "sdpa": sdpa_mask}
    for stock, name in GPAM_ATTN_IMPLEMENTATIONS.items():
        if replace or name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, functions[stock])
        # models hold stock names, whose stock masks they get; the daGPAM names keep theirs for code written for 0.2
        if replace or name not in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, masks[stock])
    # the wrapper for every other backend transformers has now (others, e.g. Hub kernels, on first use)
    for stock in list(ALL_ATTENTION_FUNCTIONS.valid_keys()):
        name = GPAM_BACKEND_PREFIX + stock
        if stock not in GPAM_ATTN_IMPLEMENTATIONS and not stock.startswith(GPAM_BACKEND_PREFIX):
            if replace or name not in ALL_ATTENTION_FUNCTIONS:
                AttentionInterface.register(name, dual_attention_function(stock))


# the package is imported as hf_gpam.modeling.gpam_interface; remote code loads this file under another name
register_gpam_attention(replace=__name__.startswith("hf_gpam."))
