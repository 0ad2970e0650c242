"""Configuration of GPT2 with daGPAM attention (model type ``gpam_gpt2``)."""

from transformers import GPT2Config

from .gpam_config_fields import GpamConfigFields


class GpamGPT2Config(GpamConfigFields, GPT2Config):
    r"""
    A [`GPT2Config`] plus the ``gpam_*`` fields of [`GpamConfigFields`]; every stock field keeps its meaning.

    Example:

    ```python
    >>> from hf_gpam import GpamGPT2Config
    >>> config = GpamGPT2Config(gpam_lambda_init=0.5, gpam_layers=[0, 1])
    >>> config.model_type
    'gpam_gpt2'
    ```
    """

    model_type = "gpam_gpt2"


__all__ = ["GpamGPT2Config"]
