"""GPT-2 with daGPAM attention: ``GpamGPT2Model`` and ``GpamGPT2LMHeadModel``.

The models are the stock transformers classes with each selected ``GPT2Attention`` converted in place into
``GpamGPT2Attention``; everything else (embeddings, MLPs, KV cache, generation) is untouched.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2LMHeadModel, GPT2Model

from .configuration_gpam_gpt2 import GpamGPT2Config
from .gpam_attention import GpamAttentionMixin
from .gpam_modeling_utils import GpamModelMixin


class GpamGPT2Attention(GpamAttentionMixin, GPT2Attention):
    """``GPT2Attention`` with the daGPAM map; projections, layer-index scaling and cache handling are stock."""

    def _split_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        # (B, T, H·D) -> (B, H, T, D)
        return tensor.view(*tensor.shape[:-1], -1, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        is_cross_attention = encoder_hidden_states is not None
        cache, is_updated = past_key_values, False
        if isinstance(past_key_values, EncoderDecoderCache):
            is_updated = past_key_values.is_updated.get(self.layer_idx)
            if is_cross_attention:
                cache = past_key_values.cross_attention_cache
            else:
                cache = past_key_values.self_attention_cache

        if is_cross_attention:
            query = self._split_heads(self.q_attn(hidden_states))
            attention_mask = encoder_attention_mask
            if cache is not None and is_updated:
                # encoder keys/values were cached at the first decoding step
                key = cache.layers[self.layer_idx].keys
                value = cache.layers[self.layer_idx].values
            else:
                key, value = map(self._split_heads, self.c_attn(encoder_hidden_states).split(self.split_size, dim=2))
        else:
            query, key, value = map(self._split_heads, self.c_attn(hidden_states).split(self.split_size, dim=2))

        if cache is not None and not (is_cross_attention and is_updated):
            key, value = cache.update(key, value, self.layer_idx)
            if is_cross_attention:
                past_key_values.is_updated[self.layer_idx] = True

        output, weights = self.gpam_attention(
            query,
            key,
            value,
            attention_mask,
            dropout=self.attn_dropout.p if self.training else 0.0,
            upcast=self.reorder_and_upcast_attn and self.config._attn_implementation == "eager",
            **kwargs,
        )
        output = self.c_proj(output.reshape(*output.shape[:-2], -1).contiguous())
        return self.resid_dropout(output), weights


class GpamGPT2ModelMixin(GpamModelMixin):
    gpam_attention_class = GpamGPT2Attention

    def gpam_attention_sites(self) -> Iterator[tuple[int, str, nn.Module]]:
        for layer_idx, block in enumerate(self.base_model.h):
            yield layer_idx, "self", block.attn
            if hasattr(block, "crossattention"):
                yield layer_idx, "cross", block.crossattention


class GpamGPT2Model(GpamGPT2ModelMixin, GPT2Model):
    """``GPT2Model`` with daGPAM attention.

    Example:

    ```python
    >>> from hf_gpam import GpamGPT2Config, GpamGPT2Model
    >>> model = GpamGPT2Model(GpamGPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128))
    >>> model.h[0].attn.gpam_lambda.weight.shape
    torch.Size([4])
    ```
    """

    config_class = GpamGPT2Config


class GpamGPT2LMHeadModel(GpamGPT2ModelMixin, GPT2LMHeadModel):
    """``GPT2LMHeadModel`` with daGPAM attention; generation, cache and loss are the stock ones."""

    config_class = GpamGPT2Config
    # GPT2LMHeadModel leaves loss_type unset, which makes torch.compile(fullgraph=True) break on a logging call
    gpam_loss_type = "ForCausalLM"


GpamGPT2Config.register_for_auto_class()
GpamGPT2Model.register_for_auto_class("AutoModel")
GpamGPT2LMHeadModel.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["GpamGPT2Attention", "GpamGPT2Model", "GpamGPT2LMHeadModel"]
