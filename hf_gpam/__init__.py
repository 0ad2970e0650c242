"""hf_gpam: daGPAM attention (Heo & Choi, 2024) for GPT-2, BART, Marian and the Llama, Mistral, Qwen2/3, Gemma2/3,
Phi-3, GPT-NeoX, OPT and OLMo2 decoders in HuggingFace Transformers.

Importing the package registers the GPAM configs and models with ``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM``, ``AutoModelForSeq2SeqLM`` and ``AutoModelForSequenceClassification``, and the daGPAM
attention functions (``gpam_eager``, ``gpam_sdpa``, ``gpam_<backend>`` for the other backends) with transformers'
``AttentionInterface``; nothing else global happens.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from transformers import AutoConfig


__version__ = "0.1.0"

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
from .modeling import configuration_gpam_decoders, modeling_gpam_decoders  # noqa: E402

# the generated decoder classes (GpamLlamaConfig, GpamLlamaModel, GpamLlamaForCausalLM, ...), one set per family
from .modeling.configuration_gpam_decoders import *  # noqa: E402, F403
from .modeling.modeling_gpam_decoders import *  # noqa: E402, F403
from .patching import is_gpam_model, patch_model  # noqa: E402
from .training import gpam_decay_parameter_names, gpam_optimizer_groups  # noqa: E402


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
    "gpam_decay_parameter_names",
    "gpam_optimizer_groups",
    "is_gpam_model",
    "patch_model",
    "transformers_requirement",
    "TRANSFORMERS_MIN",
    "TRANSFORMERS_MAX_EXCLUSIVE",
    "TRANSFORMERS_VERIFIED_BELOW",
    *(name for name in configuration_gpam_decoders.__all__ if name.startswith("Gpam")),
    *(name for name in modeling_gpam_decoders.__all__ if name.startswith("Gpam") and name != "GpamDecoderModelMixin"),
]
