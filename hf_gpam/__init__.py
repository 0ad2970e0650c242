"""hf_gpam: daGPAM attention (Heo & Choi, 2024) for GPT-2, BART and Marian in HuggingFace Transformers.

Importing the package registers the GPAM configs and models with ``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM`` and ``AutoModelForSeq2SeqLM``; nothing else global happens.
"""

from __future__ import annotations

import os

import transformers
from packaging.version import Version


__version__ = "0.1.0"

# the attention forwards re-implement transformers' own per-architecture forwards: a tested range only
TRANSFORMERS_MIN, TRANSFORMERS_MAX = "5.23.0", "5.24.0"
if not Version(TRANSFORMERS_MIN) <= Version(transformers.__version__) < Version(TRANSFORMERS_MAX):
    if os.environ.get("HF_GPAM_SKIP_VERSION_CHECK") != "1":
        raise ImportError(
            f"hf_gpam {__version__} is tested with transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_MAX} but "
            f"transformers {transformers.__version__} is installed. Run `pip install "
            f"'transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_MAX}'`, or set HF_GPAM_SKIP_VERSION_CHECK=1 to try "
            "anyway."
        )

from transformers import AutoConfig  # noqa: E402

from .architectures import ARCHITECTURES, GPAM_MODEL_TYPES, GpamArchitecture  # noqa: E402
from .modeling import (  # noqa: E402
    GpamBartConfig,
    GpamBartForConditionalGeneration,
    GpamBartModel,
    GpamGPT2Config,
    GpamGPT2LMHeadModel,
    GpamGPT2Model,
    GpamMarianConfig,
    GpamMarianModel,
    GpamMarianMTModel,
)
from .patching import is_gpam_model, patch_model  # noqa: E402


def _register_auto_classes() -> None:
    for architecture in ARCHITECTURES.values():
        AutoConfig.register(architecture.gpam_model_type, architecture.config_class, exist_ok=True)
        for auto_class, model_class in architecture.auto_classes.items():
            auto_class.register(architecture.config_class, model_class, exist_ok=True)


_register_auto_classes()

__all__ = [
    "ARCHITECTURES",
    "GPAM_MODEL_TYPES",
    "GpamArchitecture",
    "GpamBartConfig",
    "GpamBartForConditionalGeneration",
    "GpamBartModel",
    "GpamGPT2Config",
    "GpamGPT2LMHeadModel",
    "GpamGPT2Model",
    "GpamMarianConfig",
    "GpamMarianModel",
    "GpamMarianMTModel",
    "is_gpam_model",
    "patch_model",
]
