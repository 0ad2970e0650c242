"""daGPAM models for vLLM: vLLM's own Llama, Mistral, Qwen2 and Qwen3 with the dual-attention layout.

Imported by vLLM (through ``hf_gpam.serving.vllm_plugin``, which registers these classes under the architectures a GPAM
checkpoint names, ``GpamLlamaForCausalLM`` ...), never by ``import hf_gpam``: this module imports vLLM.

Each class is the stock vLLM model, built as usual, with every daGPAM layer's attention module converted in place
afterwards. The stock forward is kept as it is::

    q, k = self.rotary_emb(positions, q, k)
    attn_output = self.attn(q, k, v)

and the two modules it calls are replaced:

- ``rotary_emb`` by ``NegativeQueryRotary``: it makes Q⁻ where the query is rotated, and returns the 2H query heads
  [Q⁺_g; Q⁻_g] per K/V head g (the grouped-query layout of hf_gpam's dual-attention wrapper). With
  ``gpam_rope_variant="relative"`` Q⁻ = RoPE(ReLU(Q̃) W⁻) from the query Q̃ before rotation (vLLM hands it over
  unrotated, so no inverse rotation is needed); with "literal" Q⁻ = ReLU(RoPE(Q̃)) W⁻.
- ``attn`` by ``DualAttention``: vLLM's ``Attention`` over 2H query heads sharing the H_kv K/V heads (the KV cache is
  the stock one: only K and V are cached), followed by O = (1+λ⁺)·O⁺ − λ⁻·O⁻ per head.

W⁻ and λ are registered on the attention module under the checkpoint's names (``self_attn.gpam_q_neg.weight``,
``self_attn.gpam_lambda.weight``), so vLLM's weight loading takes them as it takes every other weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.v1.attention.backend import AttentionType

from ..modeling.gpam_attention import GpamLambda
from ..modeling.gpam_interface import combine_doubled_heads, double_query_heads


def _not_a_module(owner: nn.Module, name: str, module: nn.Module) -> None:
    # a reference that nn.Module does not register: the parameter keeps its one name, on the attention module
    owner.__dict__[name] = module


class NegativeQueryRotary(nn.Module):
    """The attention module's rotary embedding, returning the 2H-head query [Q⁺_g; Q⁻_g] instead of Q⁺."""

    def __init__(self, rotary: nn.Module, q_neg: nn.Linear, *, relative: bool, heads: int, kv_heads: int, dim: int):
        super().__init__()
        self.rotary = rotary
        _not_a_module(self, "q_neg", q_neg)
        self.relative, self.heads, self.kv_heads, self.dim = relative, heads, kv_heads, dim

    def _doubled(self, query: torch.Tensor, query_neg: torch.Tensor) -> torch.Tensor:
        # (T, H·D) twice -> (T, 2H·D), hf_gpam's dual-attention layout over vLLM's (T, heads, D)
        tokens = query.shape[0]
        heads = (tokens, self.heads, self.dim)
        return double_query_heads(query.view(heads), query_neg.view(heads), self.kv_heads).reshape(tokens, -1)

    def _negative(self, query: torch.Tensor) -> torch.Tensor:
        tokens = query.shape[0]
        heads = F.relu(query.reshape(tokens, self.heads, self.dim))
        return self.q_neg(heads).reshape(tokens, self.heads * self.dim)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
        if self.relative:
            # Q̃ as it is now, before the rotation (which vLLM's CPU and CUDA kernels apply in place); both query
            # halves are then rotated in one call, with the same positions as K
            doubled = self._doubled(query, self._negative(query))
            return self.rotary(positions, doubled, key)
        query, key = self.rotary(positions, query, key)
        return self._doubled(query, self._negative(query)), key


class DualAttention(Attention):
    """vLLM's attention over the 2H-head layout, with the λ combination after it: (T, 2H·D) in, (T, H·D) out."""

    def __init__(self, gpam_lambda: GpamLambda, *, heads: int, kv_heads: int, dim: int, **attention_args):
        super().__init__(2 * heads, dim, num_kv_heads=kv_heads, **attention_args)
        _not_a_module(self, "gpam_lambda", gpam_lambda)
        self.gpam_heads, self.gpam_kv_heads = heads, kv_heads

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs) -> torch.Tensor:
        output = super().forward(query, key, value, **kwargs)
        tokens = output.shape[0]
        # (T, 2H·D) -> (1, 2H, T, D), the layout combine_doubled_heads takes, and the (1, H, T, D) result back
        doubled = output.view(tokens, 2 * self.gpam_heads, self.head_size_v).transpose(0, 1)[None]
        combined = combine_doubled_heads(doubled, *self.gpam_lambda(), self.gpam_kv_heads)
        return combined[0].transpose(0, 1).reshape(tokens, -1)


def convert_attention(attention: nn.Module, config) -> None:
    """Turn one stock vLLM attention module (Llama/Mistral/Qwen2/Qwen3) into its daGPAM form, in place."""
    stock = attention.attn
    if type(stock) is not Attention or stock.attn_type != AttentionType.DECODER:
        raise ValueError(
            f"hf_gpam's vLLM plugin converts causal decoder attention only; {stock.layer_name} is a "
            f"{type(stock).__name__} ({stock.attn_type})"
        )
    heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    # W⁻ unquantized, in the model's dtype (vLLM builds the model under it as the default dtype)
    attention.gpam_q_neg = nn.Linear(dim, dim, bias=False)
    # a parameter whatever gpam_lambda_trainable says, so that vLLM's loader (which walks named_parameters) fills it
    attention.gpam_lambda = GpamLambda(heads, tied=config.gpam_tie_lambda, trainable=True)
    attention.rotary_emb = NegativeQueryRotary(
        attention.rotary_emb, attention.gpam_q_neg, relative=config.gpam_rope_variant == "relative",
        heads=heads, kv_heads=kv_heads, dim=dim,
    )
    # the 2H-head layer takes the stock layer's name (and so its KV cache): vLLM keeps one entry per name
    get_current_vllm_config().compilation_config.static_forward_context.pop(stock.layer_name)
    attention.attn = DualAttention(
        attention.gpam_lambda, heads=heads, kv_heads=kv_heads, dim=dim, scale=attention.scaling,
        cache_config=get_current_vllm_config().cache_config, quant_config=stock.quant_config,
        per_layer_sliding_window=stock.sliding_window, prefix=stock.layer_name, attn_type=stock.attn_type,
        kv_sharing_target_layer_name=stock.kv_sharing_target_layer_name,
    )


class GpamVllmModelMixin:
    """Placed first in the bases: builds the stock vLLM model, then converts the layers the config selects."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        if not hasattr(config, "gpam_layer_enabled"):
            raise ValueError(
                f"{type(self).__name__} needs a GPAM config (model_type gpam_*), got {type(config).__name__}"
            )
        config.check_gpam_fields()
        if get_tensor_model_parallel_world_size() > 1:
            raise ValueError(
                "hf_gpam's vLLM plugin runs with tensor_parallel_size=1 only (λ is not split across ranks yet); "
                "use pipeline or data parallelism"
            )
        for layer_idx, layer in enumerate(self.model.layers):
            attention = getattr(layer, "self_attn", None)
            if attention is not None and config.gpam_layer_enabled(layer_idx, "self"):
                convert_attention(attention, config)


class GpamLlamaForCausalLM(GpamVllmModelMixin, LlamaForCausalLM):
    pass


class GpamMistralForCausalLM(GpamVllmModelMixin, MistralForCausalLM):
    pass


class GpamQwen2ForCausalLM(GpamVllmModelMixin, Qwen2ForCausalLM):
    pass


class GpamQwen3ForCausalLM(GpamVllmModelMixin, Qwen3ForCausalLM):
    pass
