"""GGUF bases: stock models that transformers loads from a ``.gguf`` file and dequantizes to plain float tensors.

transformers' GGUF loader (``from_pretrained(folder, gguf_file=...)``, needs the ``gguf`` package) unpacks the file's
quantized blocks into an ordinary float model but leaves a ``GgufConfig`` tag behind: ``config.quantization_config``
and ``model.hf_quantizer``. The tag claims a quantization that no weight has any more, and it is what makes
transformers refuse to train (the GGUF quantizer is not trainable) or save (not serializable) the model. daGPAM drops
it once the weights are checked to be plain floats: the daGPAM checkpoint is then ordinary safetensors.

The loader also looks its tensor-name mapping up by ``config.model_type``, which for a GPAM class is ``gpam_<family>``
and unknown to it; ``load_gguf_into_gpam_class`` therefore loads the stock class from the file and converts it.
"""

from __future__ import annotations

import os


GGUF_METHOD = "gguf"
# stock config keys that describe the old class, not the model
CONFIG_KEYS_NOT_CARRIED = ("model_type", "transformers_version", "architectures", "auto_map")


def quantization_method(config) -> str | None:
    """The ``quant_method`` of ``config.quantization_config`` ("bitsandbytes", "torchao", "gguf", ...), or None."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    return getattr(method, "value", method)


def is_gguf_tagged(model) -> bool:
    """True when ``model``'s config still carries transformers' GGUF quantization tag."""
    return quantization_method(getattr(model, "config", None)) == GGUF_METHOD


def drop_gguf_tag(model) -> None:
    """Remove the stale GGUF quantization tag from a model transformers dequantized from a GGUF file.

    Raises ``ValueError`` if any weight is not a float tensor (a GGUF layer kept packed in its blocks, which daGPAM
    cannot convert): such a model is refused instead of being relabelled as unquantized.
    """
    packed = [name for name, parameter in model.named_parameters() if not parameter.is_floating_point()]
    if packed:
        raise ValueError(
            f"{type(model).__name__}: {len(packed)} weights of this GGUF model are still packed GGUF blocks (e.g. "
            f"{packed[0]!r}); daGPAM needs the dequantized model: load it with "
            "from_pretrained(folder, gguf_file=..., quantization_config=GgufConfig(dequantize=True))"
        )
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and is_gguf_tagged(module):
            del config.quantization_config
        if config is not None and getattr(config, "_is_quantized", False):
            config._is_quantized = False
    # what transformers' own HfQuantizer.remove_quantization_config clears, except the weight conversions, which
    # describe the model's safetensors layout and are still needed to save it
    for attribute in ("hf_quantizer", "quantization_method"):
        if attribute in vars(model):
            delattr(model, attribute)
    if "is_quantized" in vars(model):
        model.is_quantized = False


def check_gguf_file(pretrained_model_name_or_path, gguf_file: str) -> None:
    """One clear line for a GGUF file that is not there (local folders only: a Hub id is resolved by transformers)."""
    if os.path.isfile(gguf_file):
        return
    if pretrained_model_name_or_path is None or os.path.isdir(pretrained_model_name_or_path):
        path = gguf_file if pretrained_model_name_or_path is None else os.path.join(pretrained_model_name_or_path, gguf_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"gguf_file {gguf_file!r}: no such file {path!r}")


def check_gguf_architecture(path: str, model_type: str | None = None) -> str:
    """The stock ``model_type`` transformers makes of the GGUF file at ``path``; ``ValueError`` in one line when
    transformers cannot read the file's architecture, or when it is not ``model_type``."""
    from transformers import AutoConfig

    folder, name = os.path.split(path)
    try:
        config = AutoConfig.from_pretrained(folder or ".", gguf_file=name)
    except ValueError as error:
        # transformers: "GGUF model with architecture X is not supported yet."
        raise ValueError(f"{name}: {str(error).strip()} (transformers' GGUF loader cannot read it)") from None
    if model_type is not None and config.model_type != model_type:
        raise ValueError(
            f"{name}: a {config.model_type!r} model, not a {model_type!r} one; load it with the GPAM class of its "
            f"family (hf_gpam.ARCHITECTURES[{config.model_type!r}]), or patch_model the stock model"
        )
    return config.model_type


def gpam_config_of_stock(config_class, stock_config, **gpam_options):
    """``config_class`` (a GPAM config) carrying every stock field of ``stock_config`` plus ``gpam_options``."""
    stock_fields = {k: v for k, v in stock_config.to_dict().items() if k not in CONFIG_KEYS_NOT_CARRIED}
    return config_class(**{**stock_fields, **gpam_options})


def stock_class_of(gpam_class) -> type:
    """The stock transformers class a GPAM model class extends (``GpamLlamaForCausalLM`` -> ``LlamaForCausalLM``)."""
    for base in gpam_class.__mro__[1:]:
        if base.__module__.startswith("transformers.") and hasattr(base, "from_pretrained"):
            return base
    raise TypeError(f"{gpam_class.__name__} extends no transformers model class")


def load_gguf_into_gpam_class(gpam_class, pretrained_model_name_or_path, *args, gguf_file: str, **kwargs):
    """``GpamXxx.from_pretrained(folder, gguf_file=...)``: the stock class of ``gpam_class`` loads and dequantizes
    the GGUF file with transformers' own tensor-name mapping (keyed by the stock model_type), then the model becomes
    ``gpam_class`` in place, with the ``gpam_*`` keyword arguments as its daGPAM settings (the config's defaults
    otherwise, as for any stock checkpoint loaded into a GPAM class) and no GGUF tag.

    ``output_loading_info=True`` reports the ``gpam_*`` weights as the missing keys: the file has none of them.
    """
    # imported here: gpam_modeling_utils imports this module
    from .gpam_modeling_utils import become_gpam_model

    check_gguf_file(pretrained_model_name_or_path, gguf_file)
    stock_class = stock_class_of(gpam_class)
    stock_type = stock_class.config_class.model_type
    local = os.path.join(pretrained_model_name_or_path or "", gguf_file)
    if os.path.isfile(gguf_file) or os.path.isfile(local):
        check_gguf_architecture(gguf_file if os.path.isfile(gguf_file) else local, stock_type)
    gpam_options = {name: kwargs.pop(name) for name in list(kwargs) if name.startswith("gpam_")}
    wants_info = kwargs.pop("output_loading_info", False)
    model, info = stock_class.from_pretrained(
        pretrained_model_name_or_path, *args, gguf_file=gguf_file, output_loading_info=True, **kwargs
    )
    drop_gguf_tag(model)
    become_gpam_model(model, gpam_class, gpam_config_of_stock(gpam_class.config_class, model.config, **gpam_options),
                      model.config)
    model.eval()
    if not wants_info:
        return model
    gpam_keys = [name for name, _ in model.named_parameters() if ".gpam_" in name]
    info = {**info, "missing_keys": type(info["missing_keys"])([*info["missing_keys"], *gpam_keys])}
    return model, info
