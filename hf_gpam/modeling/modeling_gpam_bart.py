"""Bart with daGPAM attention: ``GpamBartModel`` and ``GpamBartForConditionalGeneration``.

The models are the stock transformers classes with each selected ``BartAttention`` (encoder self-attention,
decoder self-attention, decoder cross-attention) converted in place into ``GpamBartAttention``; embeddings,
feed-forward blocks, KV cache and generation are untouched.
"""

from __future__ import annotations

from transformers import GenerationMixin
from transformers.models.bart.modeling_bart import (
    BartAttention,
    BartDecoder,
    BartEncoder,
    BartForConditionalGeneration,
    BartModel,
)

from .configuration_gpam_bart import GpamBartConfig
from .gpam_attention import GpamAttentionMixin
from .gpam_modeling_utils import GpamSeq2SeqModelMixin, GpamSubModelMixin


class GpamBartAttention(GpamAttentionMixin, BartAttention):
    """``BartAttention`` with daGPAM parameters; its forward is the stock one (the map comes from
    ``gpam_interface``), so projections and cache handling are stock."""


class GpamBartEncoder(GpamSubModelMixin, BartEncoder):
    """The encoder of a daGPAM Bart model; refuses to be saved alone (see ``GpamSubModelMixin``)."""


class GpamBartDecoder(GpamSubModelMixin, BartDecoder):
    """The decoder of a daGPAM Bart model; refuses to be saved alone (see ``GpamSubModelMixin``)."""


class GpamBartModelMixin(GpamSeq2SeqModelMixin):
    gpam_attention_class = GpamBartAttention
    gpam_submodel_classes = {BartEncoder: GpamBartEncoder, BartDecoder: GpamBartDecoder}


class GpamBartModel(GpamBartModelMixin, BartModel):
    """``BartModel`` with daGPAM attention."""

    config_class = GpamBartConfig


class GpamBartForConditionalGeneration(GpamBartModelMixin, BartForConditionalGeneration, GenerationMixin):
    """``BartForConditionalGeneration`` with daGPAM attention; generation (greedy, beam, sampling) and cache are stock."""

    config_class = GpamBartConfig


GpamBartConfig.register_for_auto_class()
GpamBartModel.register_for_auto_class("AutoModel")
GpamBartForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = ["GpamBartAttention", "GpamBartModel", "GpamBartForConditionalGeneration"]
