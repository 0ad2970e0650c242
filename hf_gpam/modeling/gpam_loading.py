"""Checks on what a user asks to load, made before anything is loaded or downloaded.

Part of the modeling folder, so the GPAM classes shipped next to a checkpoint (remote code) make the same checks as
the installed package and its command line.
"""

from __future__ import annotations

import os
import re


def looks_like_local_path(name: str) -> bool:
    """True when ``name`` can only mean a local path, not a Hub id: ``./x``, ``/x``, ``~/x``, ``a/b/c``, and
    ``a/b`` when ``a`` is a local folder (``outputs/x`` next to an ``outputs/`` folder).

    A Hub id is ``name`` or ``namespace/name``; transformers answers a missing local folder that looks like one by
    asking the Hub (five retries offline) or with a confusing "Repo id must be in the form..." message, so the
    GPAM classes' ``from_pretrained`` and the sub-commands check such paths first.
    """
    name = os.fspath(name)
    if name.startswith((".", "/", "~")) or (os.altsep is not None and os.altsep in name):
        return True
    if os.sep not in name:
        return False
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return True
    # namespace/name: a Hub id, unless the namespace is a folder here (a Hub namespace would rarely be one)
    return os.path.isdir(name.split(os.sep, 1)[0])


def check_model_source(name) -> None:
    """Raise ``FileNotFoundError`` ("no such folder") when ``name`` is meant as a local folder (by its form) and
    there is none, before anything asks the Hub."""
    if name is None or not isinstance(name, (str, os.PathLike)):
        return
    name = os.fspath(name)
    if not os.path.isdir(name) and (looks_like_local_path(name) or os.path.exists(name)):
        what = "is a file, not a folder" if os.path.isfile(name) else "does not exist: no such folder"
        raise FileNotFoundError(
            f"model folder {name!r} {what} (pass a local folder holding config.json, or a Hub id such as 'org/name')"
        )


# from_pretrained keywords that say where config.json is (forwarded to transformers' config reader)
_HUB_KEYWORDS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def stock_model_type(config_class: type) -> str | None:
    """The stock ``model_type`` a GPAM config class extends: "llama" for ``GpamLlamaConfig`` (model type
    ``gpam_llama``); read from its first parent with another ``model_type``, so remote-code classes work too."""
    own = getattr(config_class, "model_type", None)
    for base in config_class.__mro__[1:]:
        model_type = getattr(base, "model_type", "")
        if model_type and model_type != own:
            return model_type
    return None


def checkpoint_model_type(name, kwargs: dict) -> str | None:
    """The ``model_type`` in the checkpoint's config.json (local folder or Hub), or None if it cannot be read here
    (transformers' own loader then reports what is wrong)."""
    from transformers import PreTrainedConfig

    hub_kwargs = {key: kwargs[key] for key in _HUB_KEYWORDS if kwargs.get(key) is not None}
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(name, **hub_kwargs)
    except (OSError, ValueError):
        return None
    return config_dict.get("model_type")


def check_checkpoint_family(cls, name, kwargs: dict) -> str | None:
    """Refuse, before anything is built, a checkpoint of another family than GPAM class ``cls``; return its
    ``model_type`` (None when unread).

    ``cls`` takes checkpoints of its stock type ("llama") and of its GPAM type ("gpam_llama"). Anything else would
    build the class from a config it ignores (a GPT-2 checkpoint into a Llama class builds a default-size Llama)
    or "load" with every weight missing.
    """
    model_type = checkpoint_model_type(name, kwargs)
    gpam_type = getattr(cls.config_class, "model_type", None)
    stock_type = stock_model_type(cls.config_class)
    if model_type is None or model_type in (gpam_type, stock_type):
        return model_type
    raise ValueError(
        f"{cls.__name__}.from_pretrained: {name!r} is a {model_type!r} checkpoint; this class loads {stock_type!r} "
        f"and {gpam_type!r} checkpoints only (use the GPAM class of that family, or AutoModel*.from_pretrained)"
    )


def stock_checkpoint_lambda_warning(cls, name, model_type: str | None, kwargs: dict) -> str | None:
    """The warning for a stock checkpoint loaded into a GPAM class with λ ≠ 0, or None.

    λ = 0 keeps the stock outputs exactly (the identity property); any other λ changes them from the first
    forward, which is right for training from there but surprising for "load this model with daGPAM".
    """
    if model_type is None or model_type == getattr(cls.config_class, "model_type", None):
        return None
    config = kwargs.get("config")
    if not hasattr(config, "gpam_lambda_init"):
        config = None

    def option(field: str):
        if field in kwargs:
            return kwargs[field]
        if config is not None:
            return getattr(config, field)
        return getattr(cls.config_class, field, None)

    if option("gpam_mode") == "softmax":
        return None
    lambda_pos = option("gpam_lambda_init")
    lambda_neg = option("gpam_lambda_neg_init")
    lambdas = [value for value in (lambda_pos, lambda_neg) if value is not None]
    if all(value == 0 for value in lambdas):
        return None
    return (
        f"{cls.__name__}.from_pretrained: {name!r} is a stock {model_type!r} checkpoint and gpam_lambda_init="
        f"{lambda_pos}, so the model's outputs are no longer the stock model's (λ = 0 keeps them exactly). Pass "
        "gpam_lambda_init=0.0 to keep them and learn λ in fine-tuning (what hf_gpam.patch_model does)."
    )
