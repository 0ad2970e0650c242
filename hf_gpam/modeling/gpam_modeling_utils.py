"""What every GPAM model class adds to its stock parent: conversion of the attention modules, weight
initialisation of the daGPAM parameters (also on load), and a few accessors."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

from .gpam_attention import GpamAttentionMixin, convert_attention_module
from .gpam_rope import register_rotation_coefficients
from .gpam_gguf import load_gguf_into_gpam_class, quantization_method
from .gpam_loading import check_checkpoint_family, check_model_source, stock_checkpoint_lambda_warning
from .gpam_interface import (
    FOREIGN_ATTENTION_BACKENDS,
    foreign_backend_error,
    gpam_attn_implementation,
    stock_attn_implementation,
)


# quantization method -> the field of its config listing modules the quantizer must leave alone
QUANTIZATION_SKIP_FIELDS = {"bitsandbytes": "llm_int8_skip_modules", "torchao": "modules_to_not_convert"}
# daGPAM's own weights, never quantized: W⁻ stays in the compute dtype and trains, λ stays float32
GPAM_UNQUANTIZED_MODULES = ("gpam_q_neg", "gpam_lambda")


def check_quantization_method(config) -> str | None:
    """The quantization method of ``config`` (None if unquantized); ``ValueError`` for one daGPAM does not support."""
    method = quantization_method(config)
    if method is not None and method not in QUANTIZATION_SKIP_FIELDS:
        raise ValueError(
            f"daGPAM supports bases quantized with {' or '.join(QUANTIZATION_SKIP_FIELDS)}; this model's "
            f"quantization method is {method!r}, whose quantizer would have to leave gpam_q_neg / gpam_lambda "
            "unquantized and has no tested way to. Quantize with BitsAndBytesConfig (4-bit nf4 / 8-bit) or TorchAoConfig."
        )
    return method


def keep_gpam_weights_unquantized(model) -> None:
    """Add daGPAM's modules to the skip list of the model's quantization config, or refuse the method.

    A quantizer (bitsandbytes 4/8-bit, torchao) replaces every ``nn.Linear`` it is not told to skip, W⁻
    (``gpam_q_neg``) included, which would then be a frozen integer weight. Called when a GPAM model is built (before
    ``from_pretrained``'s quantizer converts its modules) and by ``patch_model``, so the skip list is also saved in
    ``config.json`` and a reload leaves W⁻ alone. An empty skip list means the quantizer's defaults (the output
    embeddings and tied weights), which are kept.
    """
    method = check_quantization_method(model.config)
    if method is None:
        return
    field = QUANTIZATION_SKIP_FIELDS[method]
    # from_pretrained(..., quantization_config=...): the quantizer about to convert this model's nn.Linear modules
    # cannot be told through its own skip list. It holds the caller's config object, while the model is built from a
    # deep copy of the config; its list cannot be filled before the model exists either, since a list that is set
    # replaces the quantizer's defaults (get_keys_to_not_convert(model): the output embeddings, tied weights). The one
    # model-side input of its skip list is model._keep_in_fp32_modules (get_modules_to_not_convert(model,
    # <config's skip list>, model._keep_in_fp32_modules), bitsandbytes and torchao alike), so W⁻ is named there. Its
    # other effect is wanted too: under dtype=float16 transformers loads W⁻ in float32 next to the quantized base.
    model._keep_in_fp32_modules = set(model._keep_in_fp32_modules or ()) | {"gpam_q_neg"}
    # imported here: transformers' quantizer module imports the quantization libraries it finds
    from transformers.quantizers.base import get_keys_to_not_convert

    # the config's copy, and the quantizer's own when the model was loaded quantized (save_pretrained writes that one)
    configs = [model.config.quantization_config]
    quantizer_config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if quantizer_config is not None and quantizer_config is not configs[0]:
        configs.append(quantizer_config)
    for quantization in configs:
        current = quantization.get(field) if isinstance(quantization, dict) else getattr(quantization, field, None)
        skipped = list(current) if current else get_keys_to_not_convert(model)
        skipped += [name for name in GPAM_UNQUANTIZED_MODULES if name not in skipped]
        if isinstance(quantization, dict):
            quantization[field] = skipped
        else:
            setattr(quantization, field, skipped)


def register_output_capture(model_class: type) -> None:
    """Register ``model_class._can_record_outputs`` for ``output_attentions`` / ``output_hidden_states`` capture.

    transformers fills this registry in ``PreTrainedModel.__init__``, keyed by ``str(class)``; an instance whose class
    is swapped in place (``patch_model``, the sub-model guard below) never runs that ``__init__``. The key is written
    directly because the registry's own ``__setitem__`` changed across releases (up to 5.22: the key, 5.23+: the model).
    """
    dict.__setitem__(_CAN_RECORD_REGISTRY, str(model_class), model_class._can_record_outputs)


def become_gpam_model(model: nn.Module, gpam_class: type, gpam_config, stock_config) -> None:
    """Turn a loaded stock ``model`` into ``gpam_class`` in place, with ``gpam_config`` (the stock fields plus the
    ``gpam_*`` ones): what ``hf_gpam.patch_model`` and ``GpamXxx.from_pretrained(gguf_file=...)`` share.

    Every sub-module that shares ``stock_config`` (encoder, decoder, attention modules) sees the GPAM config, the model
    keeps its stock backend name, output capture is registered for the class (the registry is filled in
    ``PreTrainedModel.__init__``, which a class swap skips), and the selected attention modules are converted.
    """
    gpam_config._attn_implementation = stock_config._attn_implementation
    gpam_config.name_or_path = stock_config.name_or_path
    gpam_config.architectures = [gpam_class.__name__]
    for module in model.modules():
        if getattr(module, "config", None) is stock_config:
            module.config = gpam_config
    model.__class__ = gpam_class
    register_output_capture(gpam_class)
    model.convert_to_gpam()


class GpamModelMixin:
    """Placed first in the bases of every GPAM model class (``class GpamBartModel(GpamModelMixin, BartModel)``).

    Subclasses set ``config_class``, ``gpam_attention_class`` (the daGPAM subclass of the architecture's attention
    module) and implement ``gpam_attention_sites`` listing ``(layer_idx, kind, module)`` for each attention module.
    """

    gpam_attention_class: type = None
    # encoder-decoder families (GpamSeq2SeqModelMixin), which serving engines for causal LMs cannot run
    gpam_encoder_decoder: bool = False
    # set where the stock class leaves ``loss_type`` unresolved
    gpam_loss_type: str | None = None
    # every backend the stock class supports runs daGPAM (gpam_interface): eager and sdpa through their own daGPAM
    # functions, the others (flex, flash, paged, Hub kernels) through the dual-attention wrapper; the stock
    # _supports_* flags stand, _supports_attention_backend included. Serving engines that bring their own attention
    # layer are refused in is_backend_compatible, unless their integration provides the 2H-head layers (vLLM plugin).
    # λ is a handful of numbers per layer whose updates would be rounded away in half precision: float32 whatever
    # dtype the model is loaded in (fp16 and bf16: the strict list), and through .to() / .half() (GpamLambda._apply)
    _keep_in_fp32_modules_strict = ["gpam_lambda"]

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.convert_to_gpam()

    def gpam_attention_sites(self) -> Iterator[tuple[int, str, nn.Module]]:
        raise NotImplementedError

    @classmethod
    def is_backend_compatible(cls) -> bool:
        # What vLLM asks before it runs a transformers class on its *stock* Transformers modeling backend, whose
        # attention layers have H query heads and would compute plain softmax (hf_gpam's vLLM plugin serves GPAM
        # causal LMs through a class of its own, which never asks). Answering False is not enough: vLLM also takes any
        # class whose attention goes through ALL_ATTENTION_FUNCTIONS. So the question gets the reason, in the process
        # that loads the model, before any engine starts.
        raise foreign_backend_error("vllm", cls.__name__, encoder_decoder=cls.gpam_encoder_decoder)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        # The public hook through which transformers resolves every requested backend (construction,
        # from_pretrained, set_attn_implementation). The model config holds the stock name; the daGPAM names release
        # 0.2 used ("gpam_sdpa", "gpam_eager") are accepted for the stock ones.
        if requested_attention in FOREIGN_ATTENTION_BACKENDS:
            # refused unless an engine integration registered its daGPAM function (hf_gpam's vLLM plugin)
            try:
                gpam_attn_implementation(requested_attention)
            except ValueError:
                raise foreign_backend_error(requested_attention, type(self).__name__) from None
        return super().get_correct_attn_implementation(stock_attn_implementation(requested_attention), is_init_check)

    def convert_to_gpam(self) -> None:
        """Convert, in place, every stock attention module that the config selects for daGPAM.

        Used by ``__init__`` and by ``hf_gpam.patch_model``, so a new model and a patched one are built alike.
        """
        self.config.check_gpam_fields()
        self.config._attn_implementation = stock_attn_implementation(self.config._attn_implementation)
        for layer_idx, kind, module in self.gpam_attention_sites():
            if self.config.gpam_layer_enabled(layer_idx, kind) and not isinstance(module, GpamAttentionMixin):
                convert_attention_module(module, self.gpam_attention_class, self.config)
        # the relative RoPE reading's rotation coefficients, derived once per forward where cos/sin are made
        register_rotation_coefficients(self)
        keep_gpam_weights_unquantized(self)
        if self.gpam_loss_type is not None:
            self.loss_type = self.gpam_loss_type

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # before anything is built or downloaded: a missing local folder, a checkpoint of another family, a stock
        # checkpoint whose outputs λ ≠ 0 would change (gpam_loading)
        name = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        check_model_source(name)
        if name is not None and kwargs.get("gguf_file") is None:
            model_type = check_checkpoint_family(cls, name, kwargs)
            lambda_warning = stock_checkpoint_lambda_warning(cls, name, model_type, kwargs)
            if lambda_warning is not None:
                warnings.warn(lambda_warning, UserWarning, stacklevel=2)
        # a GGUF file: transformers keys its tensor names by the stock model_type, so the stock class loads it
        if kwargs.get("gguf_file") is not None:
            return load_gguf_into_gpam_class(cls, *args, **kwargs)
        # a stock checkpoint loaded with a device_map that offloads layers to disk (or to the CPU next to GPUs): the
        # gpam_* weights are missing from it, and transformers initialises missing weights of offloaded layers on the
        # meta device only, so accelerate's hooks would fail at the first forward (KeyError). Say so at load time,
        # with the route that works.
        wants_info = kwargs.get("output_loading_info", False)
        model, info = super().from_pretrained(*args, **{**kwargs, "output_loading_info": True})
        parameters = dict(model.named_parameters())
        lost = [key for key in info["missing_keys"] if key in parameters and parameters[key].device.type == "meta"]
        if lost:
            raise ValueError(
                f"{cls.__name__}.from_pretrained: {len(lost)} daGPAM weights missing from the checkpoint (e.g. "
                f"{lost[0]!r}) sit in offloaded layers, where transformers does not initialise missing weights. Load "
                "the stock model on the CPU, hf_gpam.patch_model it, then accelerate.dispatch_model(model, "
                "device_map=..., offload_dir=...); or save the GPAM model once (save_pretrained) and load that "
                "checkpoint with the device_map, since it holds the gpam_* weights."
            )
        return (model, info) if wants_info else model

    @torch.no_grad()
    def initialize_weights(self):
        # The stock sub-models' _init_weights (BartEncoder, ...) know nothing of the daGPAM parameters and give
        # gpam_q_neg a plain normal init; reset them here. Tensors loaded from a checkpoint are flagged by
        # transformers and left alone by the guarded init functions reset_gpam_parameters uses.
        super().initialize_weights()
        for module in self.gpam_modules():
            module.reset_gpam_parameters()

    def save_pretrained(self, save_directory, *args, **kwargs):
        # auto_map gets the saved class only; add every Auto class of this architecture's modeling file, so that
        # e.g. AutoModel.from_pretrained(lm_checkpoint, trust_remote_code=True) gives the base model
        module = sys.modules[type(self).__module__]
        file_name = type(self).__module__.rsplit(".", 1)[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        for name, value in vars(module).items():
            auto_class = getattr(value, "_auto_class", None)
            # one modeling file may define several families (modeling_gpam_decoders): only this config's classes
            if (
                isinstance(value, type)
                and issubclass(value, GpamModelMixin)
                and auto_class is not None
                and value.config_class is type(self).config_class
            ):
                auto_map.setdefault(auto_class, f"{file_name}.{name}")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def gpam_modules(self) -> list[nn.Module]:
        """The attention modules that run daGPAM, in layer order."""
        return [module for module in self.modules() if isinstance(module, GpamAttentionMixin)]

    def gpam_lambdas(self) -> dict[str, torch.Tensor]:
        """λ of every daGPAM module, keyed by the module's name: (H,) tied, or (2, H) as [λ⁺; λ⁻] untied."""
        return {
            name: module.gpam_lambda.weight.detach().clone()
            for name, module in self.named_modules()
            if isinstance(module, GpamAttentionMixin)
        }


class GpamSubModelMixin:
    """The encoder or decoder of a GPAM encoder-decoder (``model.get_encoder()``), which holds daGPAM modules.

    Saving one alone would write daGPAM weights that the stock class (``BartEncoder.from_pretrained``) drops as
    unexpected keys, silently changing the outputs; ``save_pretrained`` refuses instead and says what to do.
    """

    def save_pretrained(self, *args, **kwargs):
        raise ValueError(
            f"{type(self).__name__} is the {self.__class__.__bases__[-1].__name__} of a daGPAM model: saved alone, "
            "its gpam_q_neg / gpam_lambda weights would be dropped by the stock class that loads it, and the outputs "
            "would change. Save the whole model instead (model.save_pretrained(...); it reloads anywhere with "
            "AutoModel*.from_pretrained(..., trust_remote_code=True)), and take get_encoder() / get_decoder() of "
            "the reloaded model."
        )


class GpamSeq2SeqModelMixin(GpamModelMixin):
    """The attention sites of BART-style encoder-decoders (BART, Marian): encoder self-attention, decoder
    self-attention and decoder cross-attention of every layer.

    Subclasses set ``gpam_submodel_classes`` (stock encoder / decoder class -> its ``GpamSubModelMixin`` subclass).
    """

    gpam_submodel_classes: dict[type, type] = {}
    gpam_encoder_decoder = True

    def convert_to_gpam(self) -> None:
        super().convert_to_gpam()
        # the encoder and decoder that hold daGPAM modules refuse to be saved alone (see GpamSubModelMixin)
        body = self.base_model
        for part in (body.encoder, body.decoder):
            guarded = self.gpam_submodel_classes.get(type(part))
            if guarded is not None and any(isinstance(m, GpamAttentionMixin) for m in part.modules()):
                part.__class__ = guarded
                register_output_capture(guarded)

    def gpam_attention_sites(self) -> Iterator[tuple[int, str, nn.Module]]:
        body = self.base_model
        for layer_idx, layer in enumerate(body.encoder.layers):
            yield layer_idx, "self", layer.self_attn
        for layer_idx, layer in enumerate(body.decoder.layers):
            yield layer_idx, "self", layer.self_attn
            yield layer_idx, "cross", layer.encoder_attn
