"""daGPAM attention modules: the new parameters, their initialisation, and the backend dispatch.

The classes here are mixins placed in front of transformers' own attention classes
(``GpamBartAttention(GpamSeq2SeqAttentionMixin, BartAttention)``), so every projection, cache update and hook of
the stock module stays as it is and only the attention map changes. A stock module is converted in place by
``convert_attention_module``, which is how both new models and ``patch_model`` get their daGPAM layers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.cache_utils import EncoderDecoderCache

from .gpam_config_fields import finite_float
from .gpam_ops import eager_gpam_attention, sdpa_gpam_attention


SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


class GpamLambda(nn.Module):
    """The per-head mixing coefficients λ of one attention module, kept in float32.

    ``weight`` has shape ``(H,)`` when λ⁺ and λ⁻ are tied (rows of P_G sum to exactly 1) or ``(2, H)`` as
    ``[λ⁺; λ⁻]`` when untied. It is a module rather than a bare parameter so that PEFT's ``modules_to_save`` can
    train and save it. A fixed λ is a persistent buffer rather than a frozen parameter: the checkpoint key is the
    same (``gpam_lambda.weight``), it stays fixed across ``from_pretrained`` (which re-creates parameters as
    trainable), and optimisers and DDP never see it.
    """

    def __init__(self, num_heads: int, *, tied: bool, trainable: bool = True, device=None):
        super().__init__()
        shape = (num_heads,) if tied else (2, num_heads)
        weight = torch.zeros(shape, dtype=torch.float32, device=device)
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    @property
    def trainable(self) -> bool:
        return isinstance(self.weight, nn.Parameter)

    @property
    def tied(self) -> bool:
        return self.weight.dim() == 1

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(λ⁺, λ⁻)``, each of shape (H,).

        A forward call rather than a plain attribute read, so that wrappers such as PEFT's ``modules_to_save``
        (which route ``forward`` to the trained copy) are honoured.
        """
        if self.tied:
            return self.weight, self.weight
        return self.weight[0], self.weight[1]

    def extra_repr(self) -> str:
        return f"num_heads={self.weight.shape[-1]}, tied={self.tied}, trainable={self.trainable}"


class GpamAttentionMixin:
    """The daGPAM part of an attention module: ``gpam_q_neg`` (W⁻ᵀ), ``gpam_lambda`` and the dispatch.

    The host module must provide ``config`` (for ``_attn_implementation``), ``num_heads``, ``head_dim``,
    ``scaling``, ``is_causal`` and ``training``, which all transformers attention modules have.
    """

    def add_gpam_parameters(
        self,
        *,
        lambda_init: float,
        lambda_neg_init: float | None,
        tie_lambda: bool,
        lambda_trainable: bool,
        negative_init: str,
        initializer_range: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        """Create and initialise ``gpam_q_neg`` (on ``device`` in ``dtype``) and ``gpam_lambda`` (float32)."""
        if negative_init not in ("neg_identity", "normal"):
            raise ValueError(f"gpam_negative_init={negative_init!r} is not one of 'neg_identity', 'normal'")
        self.gpam_lambda_pos_init = finite_float("gpam_lambda_init", lambda_init)
        self.gpam_lambda_neg_init = (
            self.gpam_lambda_pos_init
            if lambda_neg_init is None
            else finite_float("gpam_lambda_neg_init", lambda_neg_init)
        )
        if tie_lambda and self.gpam_lambda_neg_init != self.gpam_lambda_pos_init:
            raise ValueError(
                "gpam_lambda_neg_init differs from gpam_lambda_init but gpam_tie_lambda=True; "
                "set gpam_tie_lambda=False to use two coefficients"
            )
        self.gpam_negative_init = negative_init
        self.gpam_initializer_range = initializer_range
        self.gpam_q_neg = nn.Linear(self.head_dim, self.head_dim, bias=False, device=device, dtype=dtype)
        self.gpam_lambda = GpamLambda(self.num_heads, tied=tie_lambda, trainable=lambda_trainable, device=device)
        self.reset_gpam_parameters()

    @torch.no_grad()
    def reset_gpam_parameters(self) -> None:
        """(Re)initialise the daGPAM parameters from the stored init settings.

        Uses transformers' guarded init functions, so tensors already loaded from a checkpoint (flagged
        ``_is_hf_initialized``) are left alone; this is what ``initialize_weights`` relies on.
        """
        weight = self.gpam_q_neg.weight
        if self.gpam_negative_init == "neg_identity":
            # W⁻ = −I: Q⁻ = −ReLU(Q⁺), the paper's analysis point
            init.copy_(weight, -torch.eye(self.head_dim, dtype=weight.dtype, device=weight.device))
        else:
            init.normal_(weight, mean=0.0, std=self.gpam_initializer_range)
        lam = self.gpam_lambda.weight
        if self.gpam_lambda.tied:
            init.constant_(lam, self.gpam_lambda_pos_init)
        else:
            values = torch.tensor([self.gpam_lambda_pos_init, self.gpam_lambda_neg_init], dtype=lam.dtype)
            init.copy_(lam, values.to(lam.device)[:, None].expand_as(lam))

    def gpam_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        dropout: float,
        upcast: bool = False,
        is_causal: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drop-in for transformers' attention functions: returns ``(output (B, Tq, H, D), weights or None)``.

        ``eager`` returns the signed map P_G as weights; ``sdpa`` is fused and returns ``None``, as stock sdpa does.
        """
        implementation = self.config._attn_implementation or "eager"
        lambda_pos, lambda_neg = self.gpam_lambda()
        # through the module call, so that a LoRA adapter on gpam_q_neg takes part: Q⁻ = ReLU(Q⁺) W⁻
        query_neg = self.gpam_q_neg(F.relu(query))
        is_causal = self.is_causal if is_causal is None else is_causal
        if implementation == "eager":
            # transformers always hands eager a full mask; causality is applied here only if it did not
            causal = is_causal and attention_mask is None and query.shape[-2] > 1
            output, weights = eager_gpam_attention(
                query, key, value, query_neg, lambda_pos, lambda_neg,
                scaling=self.scaling, attention_mask=attention_mask, is_causal=causal,
                dropout_p=dropout, upcast=upcast,
            )
        elif implementation == "sdpa":
            # the same rule as transformers' sdpa_attention_forward: masks that causality alone would
            # describe arrive as None, and the kernel's is_causal flag must then be set
            q_len = query.shape[-2]
            causal = q_len > 1 and attention_mask is None and is_causal
            if causal and key.shape[-2] > q_len:
                key, value = key[:, :, :q_len], value[:, :, :q_len]
            output = sdpa_gpam_attention(
                query, key, value, query_neg, lambda_pos, lambda_neg,
                scaling=self.scaling, attention_mask=attention_mask, is_causal=causal, dropout_p=dropout,
            )
            weights = None
        else:
            raise ValueError(
                f"daGPAM attention does not support attn_implementation={implementation!r}; supported: "
                f"{', '.join(SUPPORTED_ATTN_IMPLEMENTATIONS)}. Load the model with attn_implementation='sdpa' "
                "(fused, default) or 'eager' (returns the signed attention maps)."
            )
        # (B, H, Tq, D) -> (B, Tq, H, D), the layout transformers' attention functions return
        return output.transpose(1, 2), weights


class GpamSeq2SeqAttentionMixin(GpamAttentionMixin):
    """``forward`` for BART-style attention modules (``q_proj``/``k_proj``/``v_proj``/``out_proj``): BART, Marian.

    Projections and KV-cache handling are those of the stock module; only the attention map is daGPAM. The cache
    holds the stock K and V; Q⁻ is recomputed from Q⁺ at every step.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        is_cross_attention = key_value_states is not None
        input_shape = hidden_states.shape[:-1]
        # (B, Tq, H·D) -> (B, H, Tq, D)
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)

        cache, is_updated = past_key_values, False
        if isinstance(past_key_values, EncoderDecoderCache):
            is_updated = past_key_values.is_updated.get(self.layer_idx)
            if is_cross_attention:
                cache = past_key_values.cross_attention_cache
            else:
                cache = past_key_values.self_attention_cache

        source = key_value_states if is_cross_attention else hidden_states
        if is_cross_attention and cache is not None and is_updated:
            # encoder keys/values were cached at the first decoding step
            key = cache.layers[self.layer_idx].keys
            value = cache.layers[self.layer_idx].values
        else:
            kv_shape = (*source.shape[:-1], -1, self.head_dim)
            key = self.k_proj(source).view(kv_shape).transpose(1, 2)
            value = self.v_proj(source).view(kv_shape).transpose(1, 2)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)
                if is_cross_attention and isinstance(past_key_values, EncoderDecoderCache):
                    past_key_values.is_updated[self.layer_idx] = True

        output, weights = self.gpam_attention(
            query, key, value, attention_mask, dropout=self.dropout if self.training else 0.0, **kwargs
        )
        output = output.reshape(*input_shape, -1).contiguous()
        return self.out_proj(output), weights


def convert_attention_module(module: nn.Module, gpam_class: type, config) -> None:
    """Turn a stock attention module into ``gpam_class`` in place, adding its daGPAM parameters.

    Existing weights are untouched; the new ones are created on the module's device, W⁻ in its dtype and λ in
    float32, and initialised from the ``gpam_*`` fields of ``config``.
    """
    reference = next(module.parameters())
    module.__class__ = gpam_class
    module.add_gpam_parameters(
        lambda_init=config.gpam_lambda_init,
        lambda_neg_init=config.gpam_lambda_neg_init,
        tie_lambda=config.gpam_tie_lambda,
        lambda_trainable=config.gpam_lambda_trainable,
        negative_init=config.gpam_negative_init,
        initializer_range=config.initializer_range if hasattr(config, "initializer_range") else config.init_std,
        device=reference.device,
        dtype=reference.dtype,
    )
