"""``patch_model``: turn a loaded stock GPT-2 / BART / Marian model into its daGPAM twin, in place."""

from __future__ import annotations

from dataclasses import fields

from torch import nn
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

from .architectures import ARCHITECTURES, GPAM_MODEL_TYPES, supported_model_types
from .modeling.gpam_attention import SUPPORTED_ATTN_IMPLEMENTATIONS
from .modeling.gpam_config_fields import GpamConfigFields


GPAM_OPTION_NAMES = tuple(f.name for f in fields(GpamConfigFields))
# stock config keys that describe the old class, not the model
_CONFIG_KEYS_NOT_CARRIED = ("model_type", "transformers_version", "architectures", "auto_map")


def gpam_config_from_stock(config, **gpam_options):
    """The GPAM config of ``config``'s architecture carrying every stock field of ``config`` plus ``gpam_options``.

    Unset ``gpam_*`` fields take the GPAM config's defaults (λ = 0.5, the new-model default; ``patch_model``
    passes λ = 0 itself).

    Example:

    ```python
    >>> from transformers import GPT2Config
    >>> from hf_gpam.patching import gpam_config_from_stock
    >>> gpam_config_from_stock(GPT2Config(n_layer=2), gpam_layers=[1]).model_type
    'gpam_gpt2'
    ```
    """
    architecture = ARCHITECTURES.get(getattr(config, "model_type", None))
    if architecture is None:
        raise ValueError(
            f"model_type {getattr(config, 'model_type', None)!r} is not supported (supported: {supported_model_types()})"
        )
    stock_fields = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_KEYS_NOT_CARRIED}
    return architecture.config_class(**{**stock_fields, **gpam_options})


def is_gpam_model(model: nn.Module) -> bool:
    """True for a GPAM model, whether its classes come from hf_gpam or from a checkpoint's remote code."""
    return getattr(getattr(model, "config", None), "model_type", None) in GPAM_MODEL_TYPES


def patch_model(model: nn.Module, **gpam_options) -> nn.Module:
    """Convert a stock GPT-2, BART or Marian model into the matching GPAM model, in place, and return it.

    The model's class becomes the GPAM class (``GPT2LMHeadModel`` -> ``GpamGPT2LMHeadModel``), its config the GPAM
    config carrying every stock field plus the ``gpam_*`` options, and each selected attention module gains
    ``gpam_q_neg`` and ``gpam_lambda``, created on the model's device (W⁻ in the model's dtype, λ in float32).
    Existing weights are not touched. λ defaults to 0 here, so the patched model computes what the stock model
    computed (up to float rounding) until fine-tuning moves λ.

    Patching a model that is already GPAM (hf_gpam's classes or remote-code ones) without options returns it
    unchanged; with options it raises, as converting twice would stack a second set of parameters.

    Args:
        model: a ``GPT2Model``, ``GPT2LMHeadModel``, ``BartModel``, ``BartForConditionalGeneration``,
            ``MarianModel`` or ``MarianMTModel`` using the ``eager`` or ``sdpa`` attention implementation.
        **gpam_options: any ``gpam_*`` config field (``gpam_lambda_init``, ``gpam_layers``, ...).

    Example:

    ```python
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> import hf_gpam
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128))
    >>> model = hf_gpam.patch_model(model, gpam_lambda_trainable=True)
    >>> type(model).__name__, model.config.model_type
    ('GpamGPT2LMHeadModel', 'gpam_gpt2')
    ```
    """
    unknown = sorted(set(gpam_options) - set(GPAM_OPTION_NAMES))
    if unknown:
        raise ValueError(f"patch_model: unknown option(s) {unknown}; allowed: {', '.join(GPAM_OPTION_NAMES)}")
    if is_gpam_model(model):
        if gpam_options:
            raise ValueError(
                f"patch_model: {type(model).__name__} is already a daGPAM model (model_type "
                f"{model.config.model_type!r}); patching it again would add a second set of daGPAM parameters. "
                "Build a new model from a config with the gpam_* values you want instead."
            )
        return model

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    architecture = ARCHITECTURES.get(model_type)
    if architecture is None:
        raise ValueError(
            f"patch_model: model_type {model_type!r} is not supported (supported: {supported_model_types()})"
        )
    gpam_class = architecture.model_classes.get(type(model))
    if gpam_class is None:
        supported = ", ".join(cls.__name__ for cls in architecture.model_classes)
        raise ValueError(
            f"patch_model: {type(model).__name__} is not supported for model_type {model_type!r} "
            f"(supported classes: {supported})"
        )
    implementation = config._attn_implementation
    if implementation not in (None, *SUPPORTED_ATTN_IMPLEMENTATIONS):
        raise ValueError(
            f"patch_model: the model uses attn_implementation={implementation!r}; daGPAM supports "
            f"{', '.join(SUPPORTED_ATTN_IMPLEMENTATIONS)}. Call model.set_attn_implementation('sdpa') first."
        )

    # λ = 0 keeps the pretrained model's outputs at conversion
    gpam_config = gpam_config_from_stock(config, **{"gpam_lambda_init": 0.0, **gpam_options})
    gpam_config._attn_implementation = implementation
    gpam_config.name_or_path = config.name_or_path
    gpam_config.architectures = [gpam_class.__name__]

    # every sub-module that shares the stock config (encoder, decoder, attention) sees the new one
    for module in model.modules():
        if getattr(module, "config", None) is config:
            module.config = gpam_config
    model.__class__ = gpam_class
    # output_attentions / output_hidden_states capture is looked up by class in this registry, filled in
    # PreTrainedModel.__init__, which a class swap skips
    _CAN_RECORD_REGISTRY[model] = gpam_class._can_record_outputs
    model.convert_to_gpam()
    return model
