"""The GPAM model classes as attributes of the ``transformers`` package, for servers that look a model class up there.

``transformers serve`` (5.24, 5.25) and vLLM's Transformers modeling backend resolve ``config.architectures[0]`` with
``getattr(transformers, name)``; a class that reaches transformers through remote code never is such an attribute.
``hf-gpam serve`` and hf_gpam's vLLM plugin bind the GPAM classes there, in their own processes only: importing
hf_gpam never does it.
"""

from __future__ import annotations

import importlib

from ..architectures import ARCHITECTURES


# set by `hf-gpam serve`, inherited by the processes it starts (see hf_gpam.cli)
SERVE_BINDING_ENV = "HF_GPAM_SERVE_BINDING"


def bind_gpam_classes_to_transformers() -> list[str]:
    """Make ``getattr(transformers, "GpamLlamaForCausalLM")`` (and every other GPAM model class) resolve, in this
    process; return the names bound. Used by ``hf-gpam serve`` and the vLLM plugin only: importing hf_gpam never does
    it."""
    # the first import of transformers' model code replaces sys.modules["transformers"] with a new module object
    # (5.19-5.25), and code imported before that (transformers serve's model manager) keeps the old one: both get
    # the names
    modules = [importlib.import_module("transformers")]
    classes = [gpam_class for architecture in ARCHITECTURES.values() for gpam_class in architecture.model_classes.values()]
    modules.append(importlib.import_module("transformers"))
    for module in modules:
        for gpam_class in classes:
            setattr(module, gpam_class.__name__, gpam_class)
    return [gpam_class.__name__ for gpam_class in classes]
