"""The GPAM model classes as attributes of the ``transformers`` package, for servers that look a model class up there.

``transformers serve`` (5.24, 5.25) and vLLM's Transformers modeling backend resolve ``config.architectures[0]`` with
``getattr(transformers, name)``; a class that reaches transformers through remote code never is such an attribute.
``hf-gpam serve`` and hf_gpam's vLLM plugin bind the GPAM classes there, in their own processes only: importing
hf_gpam never does it.
"""

from __future__ import annotations

import transformers

from ..architectures import ARCHITECTURES


# set by `hf-gpam serve`, inherited by the processes it starts (see hf_gpam.cli)
SERVE_BINDING_ENV = "HF_GPAM_SERVE_BINDING"


def bind_gpam_classes_to_transformers() -> list[str]:
    """Make ``getattr(transformers, "GpamLlamaForCausalLM")`` (and every other GPAM model class) resolve, in this
    process; return the names bound. Used by ``hf-gpam serve`` only: importing hf_gpam never does it."""
    names = []
    for architecture in ARCHITECTURES.values():
        for gpam_class in architecture.model_classes.values():
            setattr(transformers, gpam_class.__name__, gpam_class)
            names.append(gpam_class.__name__)
    return names
