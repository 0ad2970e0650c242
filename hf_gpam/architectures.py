"""The supported-architecture table: one row per stock ``model_type``, the single place that says which GPAM
config and model classes stand for which stock ones. Registration, ``patch_model`` and the tests all read it."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartForConditionalGeneration,
    BartModel,
    GPT2LMHeadModel,
    GPT2Model,
    MarianModel,
    MarianMTModel,
)

from .modeling import (
    GpamBartConfig,
    GpamBartForConditionalGeneration,
    GpamBartModel,
    GpamGPT2Config,
    GpamGPT2LMHeadModel,
    GpamGPT2Model,
    GpamMarianConfig,
    GpamMarianModel,
    GpamMarianMTModel,
)


@dataclass(frozen=True)
class GpamArchitecture:
    """One supported architecture.

    Attributes:
        model_type: the stock transformers ``model_type`` ("gpt2").
        config_class: the GPAM config class; its ``model_type`` is the GPAM one ("gpam_gpt2").
        model_classes: stock model class -> GPAM model class, for every class ``patch_model`` converts.
        auto_classes: Auto class -> GPAM model class, registered when ``hf_gpam`` is imported.
    """

    model_type: str
    config_class: type
    model_classes: dict[type, type]
    auto_classes: dict[type, type]

    @property
    def gpam_model_type(self) -> str:
        return self.config_class.model_type


ARCHITECTURES: dict[str, GpamArchitecture] = {
    "gpt2": GpamArchitecture(
        model_type="gpt2",
        config_class=GpamGPT2Config,
        model_classes={GPT2Model: GpamGPT2Model, GPT2LMHeadModel: GpamGPT2LMHeadModel},
        auto_classes={AutoModel: GpamGPT2Model, AutoModelForCausalLM: GpamGPT2LMHeadModel},
    ),
    "bart": GpamArchitecture(
        model_type="bart",
        config_class=GpamBartConfig,
        model_classes={BartModel: GpamBartModel, BartForConditionalGeneration: GpamBartForConditionalGeneration},
        auto_classes={AutoModel: GpamBartModel, AutoModelForSeq2SeqLM: GpamBartForConditionalGeneration},
    ),
    "marian": GpamArchitecture(
        model_type="marian",
        config_class=GpamMarianConfig,
        model_classes={MarianModel: GpamMarianModel, MarianMTModel: GpamMarianMTModel},
        auto_classes={AutoModel: GpamMarianModel, AutoModelForSeq2SeqLM: GpamMarianMTModel},
    ),
}

GPAM_MODEL_TYPES = {arch.gpam_model_type: arch for arch in ARCHITECTURES.values()}


def supported_model_types() -> str:
    return ", ".join(ARCHITECTURES)
