"""GPT-2 with daGPAM attention: ``GpamGPT2Model`` and ``GpamGPT2LMHeadModel``.

The models are the stock transformers classes with each selected ``GPT2Attention`` converted in place into
``GpamGPT2Attention``; everything else (embeddings, MLPs, KV cache, generation) is untouched.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from transformers import GenerationMixin
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2LMHeadModel, GPT2Model

from .configuration_gpam_gpt2 import GpamGPT2Config
from .gpam_attention import GpamAttentionMixin
from .gpam_modeling_utils import GpamModelMixin


class GpamGPT2Attention(GpamAttentionMixin, GPT2Attention):
    """``GPT2Attention`` with daGPAM parameters; its forward is the stock one (the map comes from
    ``gpam_interface``), so projections, layer-index scaling, cross-attention and cache handling are stock."""


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


class GpamGPT2LMHeadModel(GpamGPT2ModelMixin, GPT2LMHeadModel, GenerationMixin):
    """``GPT2LMHeadModel`` with daGPAM attention; generation, cache and loss are the stock ones."""

    config_class = GpamGPT2Config
    # GPT2LMHeadModel leaves loss_type unset, which makes torch.compile(fullgraph=True) break on a logging call
    gpam_loss_type = "ForCausalLM"


GpamGPT2Config.register_for_auto_class()
GpamGPT2Model.register_for_auto_class("AutoModel")
GpamGPT2LMHeadModel.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["GpamGPT2Attention", "GpamGPT2Model", "GpamGPT2LMHeadModel"]
