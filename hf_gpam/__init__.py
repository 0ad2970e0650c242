"""hf_gpam: daGPAM attention (Heo & Choi, 2024) for HuggingFace Transformers, on the families of
``hf_gpam.ARCHITECTURES`` (``hf-gpam`` lists them; README, "Supported models").

Importing the package registers the GPAM configs with ``AutoConfig`` and the GPAM models with ``AutoModel``,
``AutoModelForCausalLM``, ``AutoModelForSeq2SeqLM`` and ``AutoModelForSequenceClassification``; nothing else global
happens. It imports transformers' configuration code only: the model classes (``GpamLlamaForCausalLM``, ...),
``patch_model`` and ``is_gpam_model`` are imported on first access, and so is transformers' modeling code, which
pulls in the quantization libraries. The daGPAM attention functions (``gpam_eager``, ``gpam_sdpa``,
``gpam_<backend>``) are registered with transformers' ``AttentionInterface`` when a model class is first imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from transformers import AutoConfig


__version__ = "0.4.0"

# Modules of releases 0.1-0.3 that now live in a sub-package (cli/, serving/, analysis/), by their old names. The
# package's folder listing shows its architecture; code written against the old names keeps importing.
MOVED_MODULES = {
    "hf_gpam.convert": "hf_gpam.cli.convert",
    "hf_gpam.demo": "hf_gpam.cli.demo",
    "hf_gpam.diagnose_cli": "hf_gpam.cli.diagnose",
    "hf_gpam.compare_curves_cli": "hf_gpam.cli.compare_curves",
    "hf_gpam.serve_cli": "hf_gpam.cli.serve",
    "hf_gpam.diagnostics": "hf_gpam.analysis.diagnostics",
    "hf_gpam.plotting": "hf_gpam.analysis.plotting",
    "hf_gpam.vllm_plugin": "hf_gpam.serving.vllm_plugin",
    "hf_gpam.vllm_models": "hf_gpam.serving.vllm_models",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import hf_gpam.diagnostics`` gives the module ``hf_gpam.analysis.diagnostics`` itself (one module object
    under both names); only the names of ``MOVED_MODULES`` are looked at."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module):
        pass


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())

# the verified transformers range is checked when the modeling code is imported (hf_gpam.modeling.gpam_version),
# here and in the copy that ships next to every checkpoint alike
from .modeling.gpam_version import (  # noqa: E402
    TRANSFORMERS_MIN,
    TRANSFORMERS_VERIFIED_BELOW,
    transformers_requirement,
)

# the name release 0.2 exported for the upper bound of the verified range (no longer a hard limit: newer releases
# import with a warning)
TRANSFORMERS_MAX_EXCLUSIVE = TRANSFORMERS_VERIFIED_BELOW

from .architectures import ARCHITECTURES, GPAM_MODEL_TYPES, GpamArchitecture, register_auto_classes  # noqa: E402
from .modeling import GpamBartConfig, GpamGPT2Config, GpamMarianConfig  # noqa: E402
from .modeling import configuration_gpam_decoders  # noqa: E402
from .modeling.configuration_gpam_decoders import DECODER_FAMILIES, gpam_class_name  # noqa: E402

# the generated decoder configs (GpamLlamaConfig, ...), one per family
from .modeling.configuration_gpam_decoders import *  # noqa: E402, F403
from .training import gpam_decay_parameter_names, gpam_optimizer_groups  # noqa: E402


register_auto_classes()

# public name -> the module that defines it, imported on first access (PEP 562): these modules import transformers'
# modeling code, which costs seconds and imports the quantization libraries
_LAZY_NAMES = {
    "patch_model": "hf_gpam.patching",
    "is_gpam_model": "hf_gpam.patching",
    **dict.fromkeys(
        ("GpamBartForConditionalGeneration", "GpamBartModel", "GpamGPT2LMHeadModel", "GpamGPT2Model",
         "GpamMarianModel", "GpamMarianMTModel"),
        "hf_gpam.modeling",
    ),
    # the generated decoder classes (GpamLlamaModel, GpamLlamaForCausalLM, ...), one set per family
    **dict.fromkeys(
        (gpam_class_name(name) for row in DECODER_FAMILIES.values() for name in row.model_classes), "hf_gpam.modeling"
    ),
}


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    for architecture in ARCHITECTURES.values():
        if name in architecture.model_class_names.values():
            # the row imports its classes and hands them to the Auto classes in place of their stand-ins
            architecture.model_classes  # noqa: B018
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY_NAMES))


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
    "gpam_decay_parameter_names",
    "gpam_optimizer_groups",
    "is_gpam_model",
    "patch_model",
    "transformers_requirement",
    "TRANSFORMERS_MIN",
    "TRANSFORMERS_MAX_EXCLUSIVE",
    "TRANSFORMERS_VERIFIED_BELOW",
    *(name for name in configuration_gpam_decoders.__all__ if name.startswith("Gpam")),
    *(gpam_class_name(name) for row in DECODER_FAMILIES.values() for name in row.model_classes),
]
