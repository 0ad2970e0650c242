"""``patch_model``: turn a loaded stock model of a supported family into its daGPAM twin, in place."""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from .architectures import ARCHITECTURES, GPAM_MODEL_TYPES, supported_model_types, untested_architecture
from .modeling.gpam_attention import GpamAttentionMixin, hand_on_rotary_embeddings, model_config_of
from .modeling.gpam_rope import attach_rotation_coefficients
from .modeling.gpam_config_fields import GpamConfigFields
from .modeling.gpam_gguf import drop_gguf_tag, gpam_config_of_stock, is_gguf_tagged
from .modeling.gpam_modeling_utils import (
    QUANTIZATION_SKIP_FIELDS,
    GpamModelMixin,
    quantization_method,
    become_gpam_model,
)


GPAM_OPTION_NAMES = tuple(f.name for f in fields(GpamConfigFields))


def gpam_config_from_stock(config, config_class: type | None = None, **gpam_options):
    """The GPAM config of ``config``'s architecture carrying every stock field of ``config`` plus ``gpam_options``.

    Unset ``gpam_*`` fields take the GPAM config's defaults (λ = 0.5, the new-model default; ``patch_model``
    passes λ = 0 itself). ``config_class`` overrides the table's GPAM config class (families outside the table).

    Example:

    ```python
    >>> from transformers import GPT2Config
    >>> from hf_gpam.patching import gpam_config_from_stock
    >>> gpam_config_from_stock(GPT2Config(n_layer=2), gpam_layers=[1]).model_type
    'gpam_gpt2'
    ```
    """
    if config_class is None:
        architecture = ARCHITECTURES.get(getattr(config, "model_type", None))
        if architecture is None:
            raise ValueError(
                f"model_type {getattr(config, 'model_type', None)!r} is not supported (supported: {supported_model_types()})"
            )
        config_class = architecture.config_class
    return gpam_config_of_stock(config_class, config, **gpam_options)


def is_gpam_model(model: nn.Module) -> bool:
    """True for a GPAM model, whether its classes come from hf_gpam or from a checkpoint's remote code."""
    # GpamModelMixin: also a model patched with allow_untested=True, whose model type is in no table
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type in GPAM_MODEL_TYPES or isinstance(model, GpamModelMixin)


def check_weights_are_materialised(model: nn.Module) -> None:
    """Raise ``ValueError`` where daGPAM's new parameters could not be placed correctly next to the model's own.

    Each attention module gets W⁻ on its own device in its compute dtype; that needs real tensors. Refused: weights on
    the meta device (an empty-weights model, or one whose weights accelerate offloads to CPU or disk and loads in
    hooks: the new parameters would never be loaded), and integer weights that no supported quantizer produced.
    Bases quantized with bitsandbytes (4-bit, 8-bit) or torchao are accepted: daGPAM reads activations only, and its
    own weights stay unquantized. A model transformers dequantized from a GGUF file is a plain float model: its stale
    GGUF tag is dropped here (``modeling.gpam_gguf.drop_gguf_tag``), so nothing claims it is quantized.
    """
    # accelerate's CPU / disk offloading also leaves the parameters on the meta device, loading them in hooks
    meta = [name for name, parameter in model.named_parameters() if parameter.device.type == "meta"]
    if meta:
        raise ValueError(
            f"patch_model: {len(meta)} weights are on the meta device (e.g. {meta[0]!r}): an empty-weights or "
            "offloaded model, whose weights are loaded in hooks; daGPAM's new parameters would never be loaded. "
            "Patch the model before it is dispatched (load it on the CPU, patch_model, then "
            "accelerate.dispatch_model(model, device_map=...)), or load the checkpoint straight into the GPAM class "
            "with the device_map: GpamXxx.from_pretrained(checkpoint, device_map=..., gpam_lambda_init=0.0)."
        )
    if is_gguf_tagged(model):
        drop_gguf_tag(model)
    method = quantization_method(model.config)
    if method is not None and method not in QUANTIZATION_SKIP_FIELDS:
        raise ValueError(
            f"patch_model: the model is quantized with {method!r}; daGPAM supports bases quantized with "
            f"{' or '.join(QUANTIZATION_SKIP_FIELDS)} (BitsAndBytesConfig 4-bit / 8-bit, TorchAoConfig)."
        )
    quantized = [
        name for name, parameter in model.named_parameters() if not parameter.is_floating_point()
    ]
    if quantized and method is None:
        raise ValueError(
            f"patch_model: {len(quantized)} weights are integers (e.g. {quantized[0]!r}: "
            f"{dict(model.named_parameters())[quantized[0]].dtype}) but the config names no quantization method; "
            "daGPAM supports bases quantized through transformers with bitsandbytes or torchao "
            "(from_pretrained(..., quantization_config=BitsAndBytesConfig(...) or TorchAoConfig(...)))."
        )


def patch_model(model: nn.Module, *, allow_untested: bool = False, **gpam_options) -> nn.Module:
    """Convert a stock model of a supported family into the matching GPAM model, in place, and return it.

    The model's class becomes the GPAM class (``GPT2LMHeadModel`` -> ``GpamGPT2LMHeadModel``), its config the GPAM
    config carrying every stock field plus the ``gpam_*`` options, and each selected attention module gains
    ``gpam_q_neg`` and ``gpam_lambda``, created on the model's device (W⁻ in the model's dtype, λ in float32).
    Existing weights are not touched. λ defaults to 0 here, so the patched model computes what the stock model
    computed (up to float rounding) until fine-tuning moves λ.

    Patching a model that is already GPAM (hf_gpam's classes or remote-code ones) without options returns it
    unchanged; with options it raises, as converting twice would stack a second set of parameters.

    Args:
        model: a model class of a row of ``hf_gpam.ARCHITECTURES`` (``GPT2LMHeadModel``, ``BartModel``,
            ``LlamaForCausalLM``, ``Qwen3ForSequenceClassification``, ...), on any attention backend its stock
            class supports (the config keeps the backend's stock name).
        allow_untested: for a family outside the table, try daGPAM anyway on a model whose attention routes
            through transformers' attention interface (see ``architectures.untested_architecture``). Right after
            patching, the λ = 0 identity is checked on a probe input (random token ids, the logits before and
            after); if it fails, the model is restored to its stock classes, config and parameters and
            ``ValueError`` is raised. Such a model trains and saves its weights, but its checkpoint ships no remote
            code: reload it by patching the stock model again and loading the weights.
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
    untested = architecture is None and allow_untested and config is not None
    if untested:
        architecture = untested_architecture(model)
    if architecture is None:
        raise ValueError(
            f"patch_model: model_type {model_type!r} is not supported (supported: {supported_model_types()}). "
            "A model whose attention routes through transformers' attention interface can be tried with "
            "patch_model(model, allow_untested=True), which checks the λ = 0 identity right after patching."
        )
    gpam_class = architecture.model_classes.get(type(model))
    if gpam_class is None:
        supported = ", ".join(cls.__name__ for cls in architecture.model_classes)
        raise ValueError(
            f"patch_model: {type(model).__name__} is not supported for model_type {model_type!r} "
            f"(supported classes: {supported})"
        )
    check_weights_are_materialised(model)
    if untested:
        stock_class = type(model)
        probe = probe_inputs(model)
        reference = probe_output(model, probe)

    if untested:
        # "relative" undoes and redoes RoPE in the rotate-half layout every family of the table uses; a family outside
        # it may rotate interleaved pairs, which the λ = 0 check cannot see (Q⁻ does not matter at λ = 0), so it gets
        # the literal reading unless asked otherwise
        gpam_options = {"gpam_rope_variant": "literal", **gpam_options}
    # λ = 0 keeps the pretrained model's outputs at conversion
    gpam_config = gpam_config_from_stock(config, architecture.config_class, **{"gpam_lambda_init": 0.0, **gpam_options})
    become_gpam_model(model, gpam_class, gpam_config, config)
    if untested:
        try:
            check_zero_lambda_identity(model, probe, reference)
        except Exception:
            unpatch(model, stock_class, config)
            raise
    return model


# --- the λ = 0 check of patch_model(allow_untested=True) ------------------------------------------------------


def probe_inputs(model: nn.Module, batch: int = 2, length: int = 8) -> dict:
    """Random token ids (and a full attention mask) on the model's device, for the λ = 0 identity check."""
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@torch.no_grad()
def probe_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The main output (logits, else the last hidden state) of ``model`` on ``inputs``, in eval mode."""
    training = model.training
    model.eval()
    try:
        outputs = model(**inputs)
    finally:
        model.train(training)
    output = getattr(outputs, "logits", None)
    return (outputs.last_hidden_state if output is None else output).float()


def check_zero_lambda_identity(model: nn.Module, inputs: dict, reference: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the patched ``model`` with λ = 0 reproduces ``reference`` on ``inputs``.

    λ is set to 0 for the check and restored afterwards, so the check does not depend on ``gpam_lambda_init``.
    """
    modules = model.gpam_modules()
    saved = [module.gpam_lambda.weight.detach().clone() for module in modules]
    try:
        with torch.no_grad():
            for module in modules:
                module.gpam_lambda.weight.zero_()
        try:
            output = probe_output(model, inputs)
        except Exception as error:
            raise ValueError(
                f"patch_model(allow_untested=True): the patched {type(model).__name__} fails on a probe input: "
                f"{type(error).__name__}: {str(error).rstrip('.')}. The model was restored to its stock classes."
            ) from error
    finally:
        with torch.no_grad():
            for module, weight in zip(modules, saved):
                module.gpam_lambda.weight.copy_(weight)
    # float32 rounding of a different kernel order, or half precision
    tolerance = 1e-4 if reference.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32 else 2e-2
    error = (output - reference).abs().max().item()
    scale = 1.0 + reference.abs().max().item()
    if not error <= tolerance * scale:
        raise ValueError(
            f"patch_model(allow_untested=True): with λ = 0 the patched {type(model).__name__} does not reproduce "
            f"the stock outputs (max |Δ| = {error:.3g} on a probe input, allowed {tolerance * scale:.3g}); its "
            "attention does not reach daGPAM the way the supported families do. The model was restored to its "
            "stock classes."
        )


def unpatch(model: nn.Module, stock_class: type, stock_config) -> None:
    """Undo ``patch_model`` on ``model``: stock classes, the stock config, no daGPAM parameters."""
    gpam_config = model.config
    for module in model.modules():
        if isinstance(module, GpamAttentionMixin):
            # the stock attention class is the first base after the mixin: Gpam<X>Attention(GpamAttentionMixin, X)
            module.__class__ = type(module).__mro__[2]
        for hook_id, hook in list(module._forward_pre_hooks.items()):
            if hook is hand_on_rotary_embeddings:
                del module._forward_pre_hooks[hook_id]
                module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        # the rotary embedding's hook that hands the per-forward RoPE coefficients on (its flag goes with the gpam_*
        # attributes below)
        for hook_id, hook in list(module._forward_hooks.items()):
            if hook is attach_rotation_coefficients:
                del module._forward_hooks[hook_id]
        for name in [n for n in (*module._parameters, *module._buffers, *module._modules) if n.startswith("gpam_")]:
            delattr(module, name)
        for name in [n for n in vars(module) if n.startswith("gpam_")]:
            delattr(module, name)
        if model_config_of(getattr(module, "config", None)) is gpam_config:
            module.config = stock_config
    model.__class__ = stock_class
