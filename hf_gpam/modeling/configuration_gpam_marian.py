"""Configuration of Marian with daGPAM attention (model type ``gpam_marian``)."""

from transformers import MarianConfig

from .gpam_config_fields import GpamConfigFields


class GpamMarianConfig(GpamConfigFields, MarianConfig):
    r"""
    A [`MarianConfig`] plus the ``gpam_*`` fields of [`GpamConfigFields`]; every stock field keeps its meaning.

    Example:

    ```python
    >>> from hf_gpam import GpamMarianConfig
    >>> config = GpamMarianConfig(gpam_lambda_init=0.5, gpam_layers=[0, 1])
    >>> config.model_type
    'gpam_marian'
    ```
    """

    model_type = "gpam_marian"


__all__ = ["GpamMarianConfig"]
