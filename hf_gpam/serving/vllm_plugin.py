"""hf_gpam's vLLM plugin: serves daGPAM checkpoints with vLLM's own models (``hf_gpam.serving.vllm_models``).

vLLM calls ``register`` in every process it starts, through the ``vllm.general_plugins`` entry point that installing
hf_gpam declares (``pip install "hf_gpam[vllm]"``). It registers the GPAM configs with ``AutoConfig`` (so vLLM reads a
GPAM config.json without ``trust_remote_code``) and the GPAM architectures with vLLM's ``ModelRegistry``:

    vllm serve path/to/gpam-llama            # or vllm.LLM("path/to/gpam-llama")

A GPAM checkpoint must not reach vLLM's Transformers modeling backend (``model_impl="transformers"``, or the
fallback vLLM takes for an architecture it does not know): that backend replaces the attention function with its
own, which would compute plain softmax attention. The GPAM model classes refuse it themselves
(``GpamModelMixin.is_backend_compatible``), in the remote code of every checkpoint too. Set ``VLLM_PLUGINS`` (vLLM's
own switch) to a list without ``hf_gpam`` to turn this plugin off.

Importing this module imports neither vLLM nor hf_gpam's models; ``register`` does.
"""

from __future__ import annotations

# the vLLM releases the plugin is tested on (make test-vllm). Older ones are refused; newer ones load with a warning,
# as newer transformers releases do (hf_gpam/modeling/gpam_version.py): the plugin uses vLLM's model classes and
# attention layer, which can change between minor releases, and make test-vllm on the new release is what verifies it
VLLM_MIN = "0.32.0"
VLLM_VERIFIED_BELOW = "0.33.0"

# the GPAM architectures served natively, each a class of hf_gpam.serving.vllm_models converting vLLM's model of that name
# without the "Gpam" prefix
VLLM_ARCHITECTURES = ("GpamLlamaForCausalLM", "GpamMistralForCausalLM", "GpamQwen2ForCausalLM", "GpamQwen3ForCausalLM")


def check_vllm_version(version: str) -> None:
    """One line for a vLLM release outside the tested range: an error below it, a warning above it."""
    import warnings

    from packaging.version import Version

    if Version(version) < Version(VLLM_MIN):
        raise RuntimeError(
            f"hf_gpam's vLLM plugin needs vllm>={VLLM_MIN} (tested below {VLLM_VERIFIED_BELOW}); vllm {version} is "
            "installed. Upgrade vLLM, or turn the plugin off with VLLM_PLUGINS set to the plugins you want."
        )
    if Version(version) >= Version(VLLM_VERIFIED_BELOW):
        warnings.warn(
            f"hf_gpam's vLLM plugin is tested on vllm>={VLLM_MIN},<{VLLM_VERIFIED_BELOW}, not on vllm {version}; "
            "run `make test-vllm` with this release before trusting its outputs.",
            UserWarning,
            stacklevel=2,
        )


def register() -> None:
    """Register the GPAM configs with transformers and the GPAM architectures with vLLM (idempotent)."""
    import vllm
    from vllm import ModelRegistry

    check_vllm_version(vllm.__version__)
    # importing hf_gpam registers the GPAM configs and models with the Auto classes
    from .transformers_binding import bind_gpam_classes_to_transformers

    supported = set(ModelRegistry.get_supported_archs())
    for architecture in VLLM_ARCHITECTURES:
        if architecture not in supported:
            ModelRegistry.register_model(architecture, f"hf_gpam.serving.vllm_models:{architecture}")
    # vLLM's Transformers backend looks a model class up as getattr(transformers, architecture) before it reads the
    # checkpoint's remote code (which needs trust_remote_code): with the GPAM classes bound there, in vLLM's
    # processes only (as hf-gpam serve binds them in its own), model_impl="transformers" reaches
    # GpamModelMixin.is_backend_compatible and its one-line reason rather than "Cannot find model module"
    bind_gpam_classes_to_transformers()
