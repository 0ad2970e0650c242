"""daGPAM models for vLLM: vLLM's Transformers modeling backend running hf_gpam's own modeling code.

Imported by vLLM (through ``hf_gpam.serving.vllm_plugin``, which registers ``GpamTransformersForCausalLM`` under the
architecture every daGPAM causal-LM checkpoint names: ``GpamGPT2LMHeadModel``, ``GpamLlamaForCausalLM``, ...), never
by ``import hf_gpam``: this module imports vLLM.

Why this design: vLLM's Transformers backend builds the transformers model (here the GPAM class, whose attention
modules are the stock ones plus W⁻ and λ), swaps its linear, embedding and norm layers for vLLM's, and routes every
attention module's call of transformers' attention interface to a vLLM ``Attention`` layer (paged KV cache, vLLM's
kernels, continuous batching). daGPAM already lives behind that interface, so one class serves every causal family of
hf_gpam's table, with the family's own projections, q/k norms, RoPE (partial rotary included), sliding windows and
soft-capping exactly as transformers runs them, and nothing is written per family: a new row of the table is served
as soon as transformers' modeling file routes through the interface. Only two things differ from stock vLLM:

- the ``Attention`` layer of each daGPAM module has 2H query heads over the stock H_kv K/V heads (the KV cache is the
  stock one: only K and V are cached), the grouped-query layout [Q⁺_g; Q⁻_g] per K/V head of hf_gpam's dual-attention
  wrapper, with the stock layer's scale, window and soft-capping (Gemma2's soft-capping reaches both maps there);
- the daGPAM modules' attention function ``gpam_vllm`` (``vllm_dual_attention_forward``) builds Q⁻ with the modeling
  code's own ``negative_query`` (W⁻ with its dtype rules, both RoPE readings), calls vLLM's attention function on the
  2H-head layout and combines O = (1+λ⁺)·O⁺ − λ⁻·O⁻ with the modeling code's ``combine_doubled_heads``.

W⁻ and λ are the GPAM model's own parameters, loaded by vLLM's weight loader under the checkpoint's names.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.transformers import TransformersForCausalLM
from vllm.model_executor.models.transformers.base import VLLM_ATTN_ATTR

from ..modeling.gpam_attention import model_config_of, query_head_count
from ..modeling.gpam_interface import (
    check_attention_keywords,
    combine_doubled_heads,
    double_query_heads,
    is_gpam_attention_module,
    negative_query,
    relative_position_embeddings,
)


# the backend name vLLM's Transformers backend writes into the model config, and the daGPAM function for it
VLLM_BACKEND = "vllm"
GPAM_VLLM_BACKEND = "gpam_vllm"


def vllm_dual_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """daGPAM on vLLM's attention layer: ``query`` (1, H, T, D) as the module's stock forward hands it over (T tokens
    of every scheduled sequence in one row), K and V (1, H_kv, T, D). Returns ``(output (1, T, H, D), None)``.

    The packed-row check of the transformers path does not apply: vLLM's attention metadata, not a mask, separates the
    sequences of the row.
    """
    stock = ALL_ATTENTION_FUNCTIONS[VLLM_BACKEND]
    if not is_gpam_attention_module(module):
        return stock(module, query, key, value, attention_mask, **kwargs)
    applied = check_attention_keywords({k: v for k, v in kwargs.items() if k not in ("dropout", "scaling")}, "vllm")
    layer = getattr(module, VLLM_ATTN_ATTR)
    heads, kv_heads = query.shape[1], key.shape[1]
    if layer.num_heads != 2 * heads:
        raise ValueError(
            f"daGPAM attention on vLLM needs an attention layer of {2 * heads} query heads (Q⁺ and Q⁻) for "
            f"{type(module).__name__}, and vLLM built one of {layer.num_heads}: the model runs on vLLM's stock "
            "Transformers backend, not hf_gpam's vLLM plugin. Install hf_gpam (pip install 'hf_gpam[vllm]') and leave "
            "model_impl at 'auto'."
        )
    query_neg = negative_query(module, query, position_embeddings=relative_position_embeddings(module, applied))
    doubled = double_query_heads(query, query_neg, kv_heads)
    passed = {name: v for name, v in kwargs.items() if name != "gpam_position_embeddings"}
    # vLLM returns (T, 2H·D)
    output, _ = stock(module, doubled, key, value, attention_mask, **passed)
    tokens, dim = query.shape[-2], query.shape[-1]
    # (T, 2H·D) -> (1, 2H, T, D), the layout combine_doubled_heads takes; (1, H, T, D) -> (1, T, H, D) back
    doubled_output = output.view(1, tokens, 2 * heads, dim).transpose(1, 2)
    combined = combine_doubled_heads(doubled_output, *module.gpam_lambda(), kv_heads)
    return combined.transpose(1, 2), None


AttentionInterface.register(GPAM_VLLM_BACKEND, vllm_dual_attention_forward)


class GpamTransformersForCausalLM(TransformersForCausalLM):
    """vLLM's Transformers backend for a daGPAM causal LM of any family in hf_gpam's table."""

    def _create_hf_to_vllm_mapper(self):
        super()._create_hf_to_vllm_mapper()
        # vLLM 0.32 drops every checkpoint key in which a pattern of _keys_to_ignore_on_load_unexpected is *found*,
        # where transformers applies them to unexpected keys only: GPT-2's "attn.bias" (its old causal-mask buffer)
        # is found in "h.0.attn.c_attn.bias", whose weights were then never loaded. Here a pattern must match whole
        # module-path segments at the end of the key.
        ignored = set(self.model._keys_to_ignore_on_load_unexpected or ())
        mapper = self.hf_to_vllm_mapper
        mapper.orig_to_new_regex = {
            (re.compile(rf"(?:^|\.)(?:{pattern.pattern})$") if new is None and pattern.pattern in ignored else pattern): new
            for pattern, new in mapper.orig_to_new_regex.items()
        }

    def recursive_replace(self):
        # vLLM finds a layer's attention module by the backend name its config holds ("vllm"); a daGPAM module reads
        # the config through GpamAttentionConfig, which names gpam_vllm, so it is shown the model config while vLLM
        # looks. Restored afterwards: at run time the module calls gpam_vllm.
        views = {module: module.config for module in self.model.modules() if is_gpam_attention_module(module)}
        for module in views:
            module.config = model_config_of(module.config)
        try:
            super().recursive_replace()
        finally:
            for module, view in views.items():
                module.config = view

    def _create_attention_instances(self, prefix: str = ""):
        super()._create_attention_instances(prefix)
        layers = self.compilation_config.static_forward_context
        for module in self.model.modules():
            if not is_gpam_attention_module(module):
                continue
            stock = getattr(module, VLLM_ATTN_ATTR)
            if stock.num_heads != query_head_count(module):
                raise ValueError(
                    f"hf_gpam's vLLM plugin runs with tensor_parallel_size=1 only: {stock.layer_name} holds "
                    f"{stock.num_heads} of {query_head_count(module)} query heads (λ is not split across ranks)"
                )
            # the 2H-head layer takes the stock layer's name, and so its KV cache: vLLM keeps one layer per name
            layers.pop(stock.layer_name)
            setattr(module, VLLM_ATTN_ATTR, Attention(
                num_heads=2 * stock.num_heads,
                head_size=stock.head_size,
                scale=float(stock.impl.scale),
                num_kv_heads=stock.num_kv_heads,
                cache_config=self.cache_config,
                quant_config=self.quant_config,
                logits_soft_cap=getattr(self.text_config, "attn_logit_softcapping", None),
                per_layer_sliding_window=stock.sliding_window,
                prefix=stock.layer_name,
            ))
