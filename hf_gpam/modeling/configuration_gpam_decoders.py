"""Configurations of the decoder-only families with daGPAM attention (Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3,
Phi-3, GPT-NeoX, OPT, OLMo2), generated from one table.

Each family is one row of ``DECODER_FAMILIES``. Its GPAM config class is the stock config class with the ``gpam_*``
fields in front (``GpamLlamaConfig(GpamConfigFields, LlamaConfig)``, model type ``gpam_llama``), built the first
time it is asked for (``gpam_config_class``, or the module attribute of its name) and then bound to a module global
of that name. The classes are generated rather than written out because they differ only in their stock parent: a
hand-written file per family would be ten copies of the same five lines. This module ships next to every decoder
checkpoint (``save_pretrained`` copies it), and remote code resolves ``configuration_gpam_decoders.GpamLlamaConfig``
with ``getattr`` on it; building on first access means a Llama checkpoint only needs transformers' Llama, not the
other nine families (an older or trimmed transformers may lack one of them).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import transformers

from .gpam_config_fields import GpamConfigFields


@dataclass(frozen=True)
class DecoderFamily:
    """One decoder-only family daGPAM supports, by the names transformers gives its pieces.

    Attributes:
        model_type: the stock ``model_type`` ("llama", "gemma3_text"); the GPAM one is ``gpam_<model_type>``.
        package: the transformers sub-package of its modeling file (``transformers.models.<package>``).
        config_class: the stock config class, exported by ``transformers``.
        attention_class: the stock attention class of the modeling file. Every module of that class is a daGPAM
            site ("self" attention, layer index ``module.layer_idx``).
        model_classes: the stock model classes that get a GPAM twin: the base model first, then the causal LM,
            then the sequence classifier where transformers has one.
        head_dim_attribute: the attention module's attribute holding the head dimension, where it is not
            ``head_dim`` (GPT-NeoX calls it ``head_size``).
        softcap_attribute: the config field holding attention logit soft-capping, for families whose stock attention
            passes it to the attention function (Gemma2). A soft-capped model runs on the eager backend only, as in
            stock transformers (SDPA has no soft-capping). Gemma3's config has the field too, but its attention never
            passes it on: soft-capping does nothing there in stock transformers, so the row leaves it unset.
    """

    model_type: str
    package: str
    config_class: str
    attention_class: str
    model_classes: tuple[str, ...]
    head_dim_attribute: str = "head_dim"
    softcap_attribute: str | None = None

    @property
    def gpam_model_type(self) -> str:
        return f"gpam_{self.model_type}"


def _family(model_type: str, stem: str, *, package: str | None = None, classifier: bool = True, **extra) -> DecoderFamily:
    # the usual transformers naming: <Stem>Config, <Stem>Attention, <Stem>Model, <Stem>ForCausalLM, ...
    heads = (f"{stem}Model", f"{stem}ForCausalLM") + ((f"{stem}ForSequenceClassification",) if classifier else ())
    return DecoderFamily(
        model_type=model_type, package=package or model_type, config_class=f"{stem}Config",
        attention_class=f"{stem}Attention", model_classes=heads, **extra,
    )


DECODER_FAMILIES: dict[str, DecoderFamily] = {
    family.model_type: family
    for family in (
        _family("llama", "Llama"),
        _family("mistral", "Mistral"),
        _family("qwen2", "Qwen2"),
        _family("qwen3", "Qwen3"),
        _family("gemma2", "Gemma2", softcap_attribute="attn_logit_softcapping"),
        # Gemma3's text-only checkpoints: the causal LM keeps the family's short name, the others carry "Text"
        DecoderFamily(
            model_type="gemma3_text", package="gemma3", config_class="Gemma3TextConfig",
            attention_class="Gemma3Attention",
            model_classes=("Gemma3TextModel", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
        ),
        _family("phi3", "Phi3"),
        _family("gpt_neox", "GPTNeoX", head_dim_attribute="head_size"),
        _family("opt", "OPT"),
        _family("olmo2", "Olmo2"),
    )
}


# the Auto class of each head, by the suffix transformers gives the stock class (here, not in the modeling file, so
# that hf_gpam's table can name a family's Auto classes without building them)
AUTO_CLASS_BY_SUFFIX = {
    "ForCausalLM": "AutoModelForCausalLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "Model": "AutoModel",
}


def auto_class_name(stock_class_name: str) -> str:
    """``"AutoModelForCausalLM"`` for ``"LlamaForCausalLM"``; ``"AutoModel"`` for a base model."""
    for suffix, auto_class in AUTO_CLASS_BY_SUFFIX.items():
        if stock_class_name.endswith(suffix):
            return auto_class
    raise ValueError(f"{stock_class_name} is not a base model, causal LM or sequence classifier")


def gpam_class_name(stock_name: str) -> str:
    """The GPAM twin's name of a stock class name: ``LlamaForCausalLM`` -> ``GpamLlamaForCausalLM``."""
    return f"Gpam{stock_name}"


def make_gpam_config_class(stock_config_class: type, model_type: str, module_name: str = __name__) -> type:
    """``Gpam<StockConfig>(GpamConfigFields, StockConfig)`` with model type ``gpam_<model_type>``.

    ``module_name`` is what ``__module__`` says; a class saved with a checkpoint must name the module that defines
    it as a global, or remote code cannot find it.
    """
    name = gpam_class_name(stock_config_class.__name__)
    namespace = {
        "model_type": f"gpam_{model_type}",
        "__module__": module_name,
        "__qualname__": name,
        "__doc__": (
            f"A [`{stock_config_class.__name__}`] plus the ``gpam_*`` fields of [`GpamConfigFields`]; every stock "
            f"field keeps its meaning. Model type ``gpam_{model_type}``."
        ),
    }
    return types.new_class(name, (GpamConfigFields, stock_config_class), exec_body=lambda ns: ns.update(namespace))


# stock model type -> its GPAM config class, for the families built so far
GPAM_CONFIG_CLASSES: dict[str, type] = {}
# "GpamLlamaConfig" -> "llama": which family a module attribute builds
_FAMILY_OF_CONFIG_NAME = {gpam_class_name(row.config_class): row.model_type for row in DECODER_FAMILIES.values()}


def gpam_config_class(model_type: str) -> type:
    """The GPAM config class of the family ``model_type`` ("llama"), built and registered on first use."""
    config_class = GPAM_CONFIG_CLASSES.get(model_type)
    if config_class is None:
        row = DECODER_FAMILIES[model_type]
        config_class = make_gpam_config_class(getattr(transformers, row.config_class), model_type)
        config_class.register_for_auto_class()
        GPAM_CONFIG_CLASSES[model_type] = config_class
        globals()[config_class.__name__] = config_class
    return config_class


def __getattr__(name: str):
    # module attributes of not-yet-built families (PEP 562): remote code's getattr(module, "GpamLlamaConfig")
    model_type = _FAMILY_OF_CONFIG_NAME.get(name)
    if model_type is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return gpam_config_class(model_type)


__all__ = ["DECODER_FAMILIES", "DecoderFamily", "gpam_config_class", *_FAMILY_OF_CONFIG_NAME]
