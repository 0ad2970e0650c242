"""The decoder-only families with daGPAM attention, generated from ``DECODER_FAMILIES``.

For each family row (see ``configuration_gpam_decoders``) this module builds, when imported:

- ``Gpam<Stock>Attention(GpamAttentionMixin, <Stock>Attention)``: the stock attention module plus ``gpam_q_neg``
  and ``gpam_lambda``. Its forward is the stock one (projections, q/k norms, rotary embeddings, sliding windows,
  KV cache); the daGPAM map is computed behind transformers' attention interface (``gpam_interface``), so nothing
  family-specific is copied here;
- ``Gpam<Stock>Model``, ``Gpam<Stock>ForCausalLM`` and ``Gpam<Stock>ForSequenceClassification`` (where transformers
  has it): the stock classes with ``GpamDecoderModelMixin`` in front, registered for ``AutoModel``,
  ``AutoModelForCausalLM`` and ``AutoModelForSequenceClassification``.

A family's classes are built the first time one of them is asked for (``gpam_model_classes``, or the module attribute
of its name), and each is then bound to a module global of its own name, with ``__module__`` naming this module, so
that remote code (which copies this file next to the checkpoint and resolves
``modeling_gpam_decoders.GpamLlamaForCausalLM`` with ``getattr``) finds it. A Llama checkpoint therefore builds the
Llama classes only, and loads with a transformers that lacks any of the other families. Grouped-query families keep their K/V heads: W⁻ is (head_dim × head_dim), shared by all query
heads, and λ has one entry per query head.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Iterator

from torch import nn
from transformers import GenerationMixin
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configuration_gpam_decoders import (  # noqa: F401  (AUTO_CLASS_BY_SUFFIX: imported from here before 0.4)
    AUTO_CLASS_BY_SUFFIX,
    DECODER_FAMILIES,
    DecoderFamily,
    auto_class_name,
    gpam_class_name,
    gpam_config_class,
)
from .gpam_attention import GpamAttentionMixin
from .gpam_interface import stock_attn_implementation
from .gpam_modeling_utils import GpamModelMixin


class GpamDecoderModelMixin(GpamModelMixin):
    """Placed first in the bases of every generated decoder model class.

    The daGPAM sites are the modules of the family's stock attention class (``gpam_stock_attention_class``), each
    a "self" site at ``module.layer_idx``: decoder-only families have one attention module per layer and record its
    index there for the KV cache.
    """

    gpam_stock_attention_class: type = None
    # config field with attention logit soft-capping (Gemma2/3), which only the eager backend implements
    gpam_softcap_attribute: str | None = None

    def gpam_attention_sites(self) -> Iterator[tuple[int, str, nn.Module]]:
        for module in self.modules():
            if isinstance(module, self.gpam_stock_attention_class):
                yield module.layer_idx, "self", module

    def _gpam_softcap(self) -> float | None:
        return None if self.gpam_softcap_attribute is None else getattr(self.config, self.gpam_softcap_attribute, None)

    def _gpam_eager_only_reason(self) -> str | None:
        """Why this model runs on the eager backend only (None when sdpa works too)."""
        softcap = self._gpam_softcap()
        if softcap is not None:
            return (
                f"{self.gpam_softcap_attribute}={softcap} (attention logit soft-capping) needs the eager backend: SDPA "
                f"has no soft-capping, in stock transformers as in daGPAM. Use attn_implementation='eager', or set "
                f"{self.gpam_softcap_attribute}=None"
            )
        if not self._supports_sdpa:
            # the stock family refuses sdpa (Gemma2, whatever its soft-capping); daGPAM follows it
            return "the stock model does not support sdpa; use attn_implementation='eager'"
        return None

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        if self._gpam_eager_only_reason() is not None:
            # as stock transformers does for these families: eager by default, sdpa refused
            if requested_attention is None:
                requested_attention = "eager"
            self._check_gpam_backend(requested_attention)
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    def convert_to_gpam(self) -> None:
        if self._gpam_eager_only_reason() is not None:
            self._check_gpam_backend(self.config._attn_implementation or "eager")
        super().convert_to_gpam()

    def _check_gpam_backend(self, requested: str) -> None:
        if stock_attn_implementation(requested) == "sdpa":
            raise ValueError(
                f"{type(self).__name__} cannot use attn_implementation={requested!r}: {self._gpam_eager_only_reason()}."
            )


def make_gpam_attention_class(stock_attention: type, head_dim_attribute: str = "head_dim", module_name: str = __name__):
    """``Gpam<StockAttention>(GpamAttentionMixin, StockAttention)``; only parameters are added, no forward."""
    name = gpam_class_name(stock_attention.__name__)
    namespace = {
        "__module__": module_name,
        "__qualname__": name,
        "__doc__": f"``{stock_attention.__name__}`` with daGPAM parameters; its forward is the stock one.",
    }
    if head_dim_attribute != "head_dim":
        # GpamAttentionMixin reads head_dim; this family stores it under another name
        namespace["head_dim"] = property(lambda self: getattr(self, head_dim_attribute))
    return types.new_class(name, (GpamAttentionMixin, stock_attention), exec_body=lambda ns: ns.update(namespace))


def make_gpam_model_class(
    stock_model_class: type,
    config_class: type,
    attention_class: type,
    stock_attention: type,
    softcap_attribute: str | None = None,
    module_name: str = __name__,
) -> type:
    """``Gpam<StockModel>(GpamDecoderModelMixin, StockModel)`` whose daGPAM sites are the ``stock_attention`` modules."""
    name = gpam_class_name(stock_model_class.__name__)
    namespace = {
        "__module__": module_name,
        "__qualname__": name,
        "__doc__": (
            f"``{stock_model_class.__name__}`` with daGPAM attention: each selected ``{stock_attention.__name__}`` "
            f"becomes ``{attention_class.__name__}``; embeddings, MLPs, cache, generation and loss are the stock ones."
        ),
        "config_class": config_class,
        "gpam_attention_class": attention_class,
        "gpam_stock_attention_class": stock_attention,
        "gpam_softcap_attribute": softcap_attribute,
    }
    bases = (GpamDecoderModelMixin, stock_model_class)
    if issubclass(stock_model_class, GenerationMixin):
        # transformers 5 expects generative classes to list GenerationMixin among their own bases
        bases += (GenerationMixin,)
    return types.new_class(name, bases, exec_body=lambda ns: ns.update(namespace))


def stock_modeling_module(family: DecoderFamily):
    return importlib.import_module(f"transformers.models.{family.package}.modeling_{family.package}")


def register_stock_weight_conversions(stock_class: type, gpam_class: type) -> None:
    """Load checkpoints into ``gpam_class`` with the key renamings transformers has for ``stock_class``.

    transformers looks its checkpoint conversions up by class name (then model type), so a GPAM class would miss
    e.g. GPT-NeoX's ``embed_out`` -> ``lm_head`` and leave ``lm_head`` randomly initialised. Registering them also
    makes them apply to remote-code classes, which transformers otherwise loads without conversions.
    """
    conversions = get_checkpoint_conversion_mapping(stock_class.__name__)
    if conversions is not None:
        register_checkpoint_conversion_mapping(gpam_class.__name__, conversions, overwrite=True)


# stock model type -> {stock model class: GPAM model class}, in the row's order (base, causal LM, classifier), for the
# families built so far
GPAM_MODEL_CLASSES: dict[str, dict[type, type]] = {}


def gpam_model_classes(model_type: str) -> dict[type, type]:
    """``{stock model class: GPAM model class}`` of the family ``model_type`` ("llama"), built on first use."""
    classes = GPAM_MODEL_CLASSES.get(model_type)
    if classes is not None:
        return classes
    family = DECODER_FAMILIES[model_type]
    stock_module = stock_modeling_module(family)
    stock_attention = getattr(stock_module, family.attention_class)
    attention_class = make_gpam_attention_class(stock_attention, family.head_dim_attribute)
    globals()[attention_class.__name__] = attention_class
    classes = {}
    for stock_name in family.model_classes:
        stock_class = getattr(stock_module, stock_name)
        gpam_class = make_gpam_model_class(
            stock_class, gpam_config_class(model_type), attention_class, stock_attention, family.softcap_attribute,
        )
        gpam_class.register_for_auto_class(auto_class_name(stock_name))
        register_stock_weight_conversions(stock_class, gpam_class)
        globals()[gpam_class.__name__] = gpam_class
        classes[stock_class] = gpam_class
    GPAM_MODEL_CLASSES[model_type] = classes
    return classes


# "GpamLlamaForCausalLM" (or "GpamLlamaAttention") -> "llama": which family a module attribute builds
_FAMILY_OF_CLASS_NAME = {
    gpam_class_name(name): row.model_type
    for row in DECODER_FAMILIES.values()
    for name in (row.attention_class, *row.model_classes)
}


def __getattr__(name: str):
    # module attributes of not-yet-built families (PEP 562): remote code's getattr(module, "GpamLlamaForCausalLM")
    model_type = _FAMILY_OF_CLASS_NAME.get(name)
    if model_type is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    gpam_model_classes(model_type)
    return globals()[name]


__all__ = [
    "GPAM_MODEL_CLASSES",
    "GpamDecoderModelMixin",
    "gpam_model_classes",
    *(gpam_class_name(name) for row in DECODER_FAMILIES.values() for name in row.model_classes),
]
