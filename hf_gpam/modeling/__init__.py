"""The GPAM model code. This folder is what ``save_pretrained`` copies next to a checkpoint, so its modules import
only torch, transformers, the standard library and each other (``from .x import y``), never ``hf_gpam``.

The config classes are imported with the package (they need transformers' configuration code only); the model and
attention classes on first access (PEP 562 ``__getattr__``), because their modules import transformers' modeling
code, and through it the quantization libraries.
"""

import importlib

from .configuration_gpam_bart import GpamBartConfig
from .configuration_gpam_gpt2 import GpamGPT2Config
from .configuration_gpam_marian import GpamMarianConfig
# the decoder-only families' configs (GpamLlamaConfig, ...), generated from a table
from .configuration_gpam_decoders import *  # noqa: E402, F403
from .configuration_gpam_decoders import DECODER_FAMILIES, gpam_class_name


# name -> the module of this folder that defines it, for the classes imported on first access
_LAZY_MODULES = {
    "GpamAttentionMixin": "gpam_attention",
    "GpamLambda": "gpam_attention",
    **dict.fromkeys(("GpamBartAttention", "GpamBartForConditionalGeneration", "GpamBartModel"), "modeling_gpam_bart"),
    **dict.fromkeys(("GpamGPT2Attention", "GpamGPT2LMHeadModel", "GpamGPT2Model"), "modeling_gpam_gpt2"),
    **dict.fromkeys(("GpamMarianAttention", "GpamMarianModel", "GpamMarianMTModel"), "modeling_gpam_marian"),
    **dict.fromkeys(
        ("GpamDecoderModelMixin", "GPAM_MODEL_CLASSES", "gpam_model_classes",
         *(gpam_class_name(name) for row in DECODER_FAMILIES.values() for name in row.model_classes)),
        "modeling_gpam_decoders",
    ),
}


def __getattr__(name: str):
    module = _LAZY_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES))
