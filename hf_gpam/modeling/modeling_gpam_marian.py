"""Marian with daGPAM attention: ``GpamMarianModel`` and ``GpamMarianMTModel``.

The models are the stock transformers classes with each selected ``MarianAttention`` (encoder self-attention,
decoder self-attention, decoder cross-attention) converted in place into ``GpamMarianAttention``; embeddings,
feed-forward blocks, KV cache and generation are untouched.
"""

from __future__ import annotations

from transformers import GenerationMixin
from transformers.models.marian.modeling_marian import (
    MarianAttention,
    MarianDecoder,
    MarianEncoder,
    MarianMTModel,
    MarianModel,
)

from .configuration_gpam_marian import GpamMarianConfig
from .gpam_attention import GpamAttentionMixin
from .gpam_modeling_utils import GpamSeq2SeqModelMixin, GpamSubModelMixin


class GpamMarianAttention(GpamAttentionMixin, MarianAttention):
    """``MarianAttention`` with daGPAM parameters; its forward is the stock one (the map comes from
    ``gpam_interface``), so projections and cache handling are stock."""


class GpamMarianEncoder(GpamSubModelMixin, MarianEncoder):
    """The encoder of a daGPAM Marian model; refuses to be saved alone (see ``GpamSubModelMixin``)."""


class GpamMarianDecoder(GpamSubModelMixin, MarianDecoder):
    """The decoder of a daGPAM Marian model; refuses to be saved alone (see ``GpamSubModelMixin``)."""


class GpamMarianModelMixin(GpamSeq2SeqModelMixin):
    gpam_attention_class = GpamMarianAttention
    gpam_submodel_classes = {MarianEncoder: GpamMarianEncoder, MarianDecoder: GpamMarianDecoder}


class GpamMarianModel(GpamMarianModelMixin, MarianModel):
    """``MarianModel`` with daGPAM attention."""

    config_class = GpamMarianConfig


class GpamMarianMTModel(GpamMarianModelMixin, MarianMTModel, GenerationMixin):
    """``MarianMTModel`` with daGPAM attention; generation (greedy, beam, sampling) and cache are stock."""

    config_class = GpamMarianConfig


GpamMarianConfig.register_for_auto_class()
GpamMarianModel.register_for_auto_class("AutoModel")
GpamMarianMTModel.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = ["GpamMarianAttention", "GpamMarianModel", "GpamMarianMTModel"]
