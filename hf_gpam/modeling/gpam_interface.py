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

Two concerns live in modules of their own: the RoPE reading of Q⁻ (``gpam_rope``) and the packed-row guard
(``gpam_packed_rows``), which every daGPAM function here calls (eager, sdpa and the wrapper, so flex and flash too).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask, sdpa_mask

from .gpam_ops import broadcasts_over_queries, combine_dual_attention, eager_gpam_attention, sdpa_gpam_attention
from .gpam_packed_rows import check_packed_rows_are_separated
from .gpam_rope import negative_query, relative_position_embeddings
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
#               (gpam_packed_rows)
#   "ignored"   output / cache / loss arguments that do not change attention; stock eager and sdpa ignore them too
#   "paged"     continuous batching's paged-cache bookkeeping: ignored by gpam_eager / gpam_sdpa (the mask describes
#               the batch), passed on by the dual-attention wrapper; the packed-row check is skipped (paged K/V are not
#               laid out by position)
#   "kv_cache"  continuous batching's paged KV cache, which 5.19-5.23 hand to the attention function (5.24+ update it
#               in the attention module): gpam_eager / gpam_sdpa write K/V into it and attend over the K/V it returns,
#               as stock sdpa does (update_paged_cache); the wrapper passes it on to the stock function
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
    "cache": "kv_cache",
    # attention sinks: GPT-OSS-style families (reachable through patch_model(allow_untested=True))
    "s_aux": "refused",
}
REFUSED_REASONS = {
    "s_aux": "attention sinks (an extra softmax column per head) are not defined for the two daGPAM maps",
}


# attention functions that serving engines register under their own names and that run an attention layer of the
# engine's, built with the model's H query heads: the 2H-head layout cannot reach it, so the model would compute plain
# softmax attention (or fail on a shape). Refused by name, in one line, unless the engine's integration registered the
# daGPAM function gpam_<name> itself with 2H-head layers (hf_gpam's vLLM plugin registers gpam_vllm).
FOREIGN_ATTENTION_BACKENDS = {
    "vllm": "vLLM's stock Transformers modeling backend (model_impl='transformers', or vLLM's fallback for an "
    "architecture it does not know)",
    "vllm_mla": "vLLM's Transformers modeling backend with multi-head latent attention",
}


def foreign_backend_error(backend: str, model_name: str = "a daGPAM model", encoder_decoder: bool = False) -> ValueError:
    """The one-line error for a backend of ``FOREIGN_ATTENTION_BACKENDS``."""
    if encoder_decoder:
        return ValueError(
            f"{model_name} is an encoder-decoder daGPAM model, which vLLM cannot serve (vLLM has no model of its own "
            "for BART or Marian, and its Transformers backend runs decoder-only models). Run it with transformers: "
            "model.generate(...) or pipeline('translation', model=...). (hf-gpam serve, which is transformers serve, "
            "serves causal LMs only: it cuts the prompt's length off every output.)"
        )
    return ValueError(
        f"{model_name} cannot run on {FOREIGN_ATTENTION_BACKENDS[backend]}: it gives each attention module a layer "
        "of H query heads and would compute plain softmax attention, not daGPAM. Serve daGPAM causal LMs with "
        "hf_gpam's vLLM plugin (pip install 'hf_gpam[vllm]', and leave model_impl at 'auto'), or run the model in "
        "transformers (generate, generate_batch, hf-gpam serve)."
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
    name = GPAM_ATTN_IMPLEMENTATIONS.get(stock_name, GPAM_BACKEND_PREFIX + stock_name)
    if stock_name in FOREIGN_ATTENTION_BACKENDS and name not in ALL_ATTENTION_FUNCTIONS:
        raise foreign_backend_error(stock_name)
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


def update_paged_cache(module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor, kwargs: dict):
    """``(key, value)`` after the paged cache in ``kwargs["cache"]`` (continuous batching, 5.19-5.23) stored them and
    gathered the sequences' earlier K/V, as stock sdpa does; unchanged without one. K and V are shared by both maps,
    so the cache is updated once."""
    cache = kwargs.get("cache")
    if cache is None:
        return key, value
    # the cache reads its per-layer read / write indices from the keywords and rewrites some of them: a copy
    return cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=dict(kwargs))


def _key_value_groups(query: torch.Tensor, key: torch.Tensor) -> int:
    # grouped-query attention: H query heads share H_kv key/value heads, H = n_rep · H_kv
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"daGPAM attention: {heads} query heads cannot share {kv_heads} key/value heads")
    return heads // kv_heads


def check_packed_rows(
    kwargs: dict, attention_mask, query: torch.Tensor, key: torch.Tensor, backend: str, kernel_separates: bool = False
) -> None:
    """``gpam_packed_rows.check_packed_rows_are_separated`` on an attention function's inputs; skipped for
    continuous batching's calls (paged K/V are not laid out by position, and the mask describes the batch)."""
    if any(KEYWORD_POLICY.get(name) == "paged" and value is not None for name, value in kwargs.items()):
        return
    check_packed_rows_are_separated(
        kwargs.get("position_ids"), attention_mask, query.shape[0], query.shape[-2], key.shape[-2], backend,
        kernel_separates=kernel_separates,
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
    key, value = update_paged_cache(module, key, value, kwargs)
    check_packed_rows(kwargs, attention_mask, query, key, "eager")
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
    key, value = update_paged_cache(module, key, value, kwargs)
    check_packed_rows(kwargs, attention_mask, query, key, "sdpa")
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


class StockBackendConfig:
    """A model config as a stock attention function sees it through the dual-attention wrapper: every attribute is
    the model config's, except ``_attn_implementation``, which is the stock backend name.

    The daGPAM module's own config view names the daGPAM function (``gpam_flash_attention_2``); stock functions that
    read the name back (flash attention's ``lazy_import_flash_attention``, Hub kernels) must see the stock one.
    """

    def __init__(self, config, stock_name: str):
        # the model config behind a daGPAM config view (gpam_attention.GpamAttentionConfig), duck-typed: remote code
        # brings its own copy of that class
        config = config.__dict__.get("gpam_model_config", config) if config is not None else None
        self.__dict__.update(gpam_model_config=config, _attn_implementation=stock_name)

    def __getattr__(self, name: str):
        config = self.__dict__["gpam_model_config"]
        if config is None:
            raise AttributeError(name)
        return getattr(config, name)

    def __repr__(self) -> str:
        return f"StockBackendConfig({type(self.gpam_model_config).__name__}, backend {self._attn_implementation!r})"


class DoubledQueryHeads:
    """An attention module as a stock attention function sees it when called with 2H query heads.

    Every attribute is the module's, except ``num_key_value_groups``: the stock functions repeat K/V heads by it (eager,
    paged eager) or derive grouped-query attention from the shapes (sdpa, flex, flash), and the doubled layout has
    2n query heads per K/V head; and ``config``, whose ``_attn_implementation`` is the stock name ``stock_name``
    (``StockBackendConfig``).
    """

    def __init__(self, module: torch.nn.Module, groups: int, stock_name: str):
        config = StockBackendConfig(getattr(module, "config", None), stock_name)
        self.__dict__.update(module=module, num_key_value_groups=groups, config=config)

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


def is_flash_attention_function(function: Callable) -> bool:
    """Whether ``function`` is transformers' flash attention wrapper (flash 2/3/4 and the Hub kernels it loads)."""
    return function is flash_attention_forward


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
        # flash attention separates packed rows itself from position_ids (or cu_seq_lens) when it gets no mask
        kernel_separates = is_flash_attention_function(stock) and (
            kwargs.get("cu_seq_lens_q") is not None or (query.shape[0] == 1 and query.shape[-2] == key.shape[-2])
        )
        check_packed_rows(kwargs, attention_mask, query, key, stock_name, kernel_separates=kernel_separates)
        passed = {name: v for name, v in kwargs.items() if name != "gpam_position_embeddings"}
        query_neg = negative_query(module, query, position_embeddings=relative_position_embeddings(module, applied))
        kv_heads, groups = key.shape[1], _key_value_groups(query, key)
        doubled = double_query_heads(query, query_neg, kv_heads)
        output, weights = stock(
            DoubledQueryHeads(module, 2 * groups, stock_name), doubled, key, value, attention_mask, **passed
        )
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
        # engines' own functions (FOREIGN_ATTENTION_BACKENDS) get their daGPAM function from the engine integration
        if stock not in GPAM_ATTN_IMPLEMENTATIONS and stock not in FOREIGN_ATTENTION_BACKENDS and not stock.startswith(
            GPAM_BACKEND_PREFIX
        ):
            if replace or name not in ALL_ATTENTION_FUNCTIONS:
                AttentionInterface.register(name, dual_attention_function(stock))


# the package is imported as hf_gpam.modeling.gpam_interface; remote code loads this file under another name
register_gpam_attention(replace=__name__.startswith("hf_gpam."))
