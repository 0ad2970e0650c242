"""Configuration of Bart with daGPAM attention (model type ``gpam_bart``)."""

from transformers import BartConfig

from .gpam_config_fields import GpamConfigFields


class GpamBartConfig(GpamConfigFields, BartConfig):
    r"""
    A [`BartConfig`] plus the ``gpam_*`` fields of [`GpamConfigFields`]; every stock field keeps its meaning.

    Example:

    ```python
    >>> from hf_gpam import GpamBartConfig
    >>> config = GpamBartConfig(gpam_lambda_init=0.5, gpam_layers=[0, 1])
    >>> config.model_type
    'gpam_bart'
    ```
    """

    model_type = "gpam_bart"


__all__ = ["GpamBartConfig"]
