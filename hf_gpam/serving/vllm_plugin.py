"""hf_gpam's vLLM plugin: serves daGPAM causal LMs of every family in hf_gpam's table with vLLM.

vLLM calls ``register`` in every process it starts, through the ``vllm.general_plugins`` entry point that installing
hf_gpam declares (``pip install "hf_gpam[vllm]"``). It registers the GPAM configs with ``AutoConfig`` (so vLLM reads a
GPAM config.json without ``trust_remote_code``) and every GPAM causal-LM architecture (``GpamGPT2LMHeadModel``,
``GpamLlamaForCausalLM``, ..., one per causal row of ``hf_gpam.ARCHITECTURES``) with vLLM's ``ModelRegistry``, all
served by one class, ``hf_gpam.serving.vllm_models.GpamTransformersForCausalLM``:

    vllm serve path/to/gpam-model            # or vllm.LLM("path/to/gpam-model")

vLLM's *stock* Transformers modeling backend (``model_impl="transformers"``, or the fallback vLLM takes for an
architecture it does not know, e.g. with this plugin off) would give daGPAM modules an attention layer of H heads: the
GPAM model classes refuse it themselves (``GpamModelMixin.is_backend_compatible``), in the remote code of every
checkpoint too, in the calling process. So do the encoder-decoder GPAM classes (BART, Marian), which vLLM cannot serve.
``tensor_parallel_size > 1`` is refused in the calling process too (``GpamTensorParallelCheck``). Set ``VLLM_PLUGINS``
(vLLM's own switch) to a list without ``hf_gpam`` to turn this plugin off.

Importing this module imports neither vLLM nor hf_gpam's models; ``register`` does.
"""

from __future__ import annotations

# the vLLM releases the plugin is tested on (make test-vllm). Older ones are refused; newer ones load with a warning,
# as newer transformers releases do (hf_gpam/modeling/gpam_version.py): the plugin uses vLLM's model classes and
# attention layer, which can change between minor releases, and make test-vllm on the new release is what verifies it
VLLM_MIN = "0.32.0"
VLLM_VERIFIED_BELOW = "0.33.0"

# vLLM's Transformers-backend class that serves every GPAM causal LM
VLLM_MODEL_CLASS = "hf_gpam.serving.vllm_models:GpamTransformersForCausalLM"


def served_architectures() -> list[str]:
    """The GPAM causal-LM class names the plugin registers with vLLM: one per causal-LM row of hf_gpam's table."""
    from transformers import AutoModelForCausalLM

    from ..architectures import model_types_for_task
    from .. import ARCHITECTURES

    return [
        ARCHITECTURES[model_type].auto_classes[AutoModelForCausalLM].__name__
        for model_type in model_types_for_task("causal-lm")
    ]


def tensor_parallel_refusal(tensor_parallel_size: int) -> ValueError:
    return ValueError(
        f"hf_gpam's vLLM plugin runs daGPAM models with tensor_parallel_size=1 only (got {tensor_parallel_size}): λ "
        "is one value per query head and is not split across ranks yet. Use data parallelism "
        "(--data-parallel-size) or pipeline parallelism (--pipeline-parallel-size) instead."
    )


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
    """Register the GPAM configs with transformers and the GPAM causal-LM architectures with vLLM (idempotent)."""
    import vllm
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    check_vllm_version(vllm.__version__)
    # importing hf_gpam registers the GPAM configs and models with the Auto classes
    from .transformers_binding import bind_gpam_classes_to_transformers

    class GpamTensorParallelCheck(VerifyAndUpdateConfig):
        """vLLM's per-architecture hook, run while the engine configuration is built in the calling process."""

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            size = vllm_config.parallel_config.tensor_parallel_size
            if size > 1:
                raise tensor_parallel_refusal(size)

    supported = set(ModelRegistry.get_supported_archs())
    for architecture in served_architectures():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, VLLM_MODEL_CLASS)
        MODELS_CONFIG_MAP.setdefault(architecture, GpamTensorParallelCheck)
    # vLLM's Transformers backend looks a model class up as getattr(transformers, architecture) before it reads the
    # checkpoint's remote code (which needs trust_remote_code): with the GPAM classes bound there, in vLLM's
    # processes only (as hf-gpam serve binds them in its own), model_impl="transformers" and the encoder-decoder
    # GPAM classes reach GpamModelMixin.is_backend_compatible and its one-line reason rather than "Cannot find model
    # module"
    bind_gpam_classes_to_transformers()
