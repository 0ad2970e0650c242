"""The supported-architecture table: one row per stock ``model_type``, the single place that says which GPAM
config and model classes stand for which stock ones. Registration, ``patch_model`` and the tests all read it.

GPT-2, BART and Marian have hand-written classes; the decoder-only families get one row each from the classes
``modeling_gpam_decoders`` generates out of its own table (``DECODER_FAMILIES``).

Rows name their model classes and import them on first use (``model_classes``, ``auto_classes``): importing this
table, and so ``hf_gpam``, imports the config classes only, not transformers' modeling code (``modeling_utils``, and
through its quantizers torchao). ``register_auto_classes`` registers the model classes with the Auto classes by
name, as ``LazyGpamModelClass`` stand-ins that import the real class the first time an Auto class uses one."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import transformers
from torch import nn

from .modeling import GpamBartConfig, GpamGPT2Config, GpamMarianConfig
from .modeling.configuration_gpam_decoders import DECODER_FAMILIES, auto_class_name, gpam_class_name, gpam_config_class


@dataclass(frozen=True)
class QueryKeyWeights:
    """Where one kind of attention module keeps W_Q and W_K (diagnostics read their gradients).

    Attributes:
        query, key: the module's projections holding W_Q and W_K; one name for both when they are fused.
        fused: the output blocks of a fused projection, in order (``("query", "key", "value")``). A role listed
            here is its block of that projection's outputs, a role not listed is the whole projection. Query blocks
            have ``num_attention_heads · d_head`` outputs, key and value blocks ``num_key_value_heads · d_head``.
        per_head: the fused blocks are interleaved per head (``[q_h, k_h, v_h]`` for each head h, GPT-NeoX)
            instead of stacked (``[Q, K, V]``, GPT-2 and Phi-3).
    """

    query: str = "q_proj"
    key: str = "k_proj"
    fused: tuple[str, ...] = ()
    per_head: bool = False


# the byte-level BPE of GPT-2 (one special token, <|endoftext|>, also end, start and padding) for causal LMs
_CAUSAL_LM_TOKEN_IDS = {"bos_token_id": "eos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}


@dataclass(frozen=True)
class GpamArchitecture:
    """One supported architecture.

    Attributes:
        model_type: the stock transformers ``model_type`` ("gpt2").
        config_class: the GPAM config class; its ``model_type`` is the GPAM one ("gpam_gpt2").
        model_class_names: stock model class name -> GPAM model class name, for every class ``patch_model``
            converts; the base model first.
        modeling_module: the module defining the GPAM model classes (as attributes of those names).
        task: ``"causal-lm"`` or ``"seq2seq-lm"``: the head the recipes train and ``hf-gpam diagnose`` loads.
        lora_targets: the recipes' default LoRA targets besides ``gpam_q_neg`` (PEFT module-name suffixes): the
            query / value projections of the decoder families, every projection of GPT-2, BART and Marian.
        scratch_tokenizer: the tokenizer a recipe trains for a model from scratch: ``"byte_level_bpe_gpt2"``,
            ``"byte_level_bpe_bart"`` or ``"sentencepiece_marian"``.
        scratch_token_ids: config field -> tokenizer attribute, the special-token ids a model from scratch takes
            from that tokenizer.
        block_stacks: stack name -> the attribute path of its list of blocks, from ``model.base_model``.
        attention_modules: attention kind ("self", "cross") -> the block attribute holding that module (a block
            without it has no attention of that kind, e.g. BART's encoder blocks have no cross-attention).
        query_key_weights: attention kind -> where its W_Q and W_K are (``QueryKeyWeights``).
        auto_class_names: Auto class name ("AutoModelForCausalLM") -> the GPAM model class registered with it when
            ``hf_gpam`` is imported; by default each class of ``model_class_names`` with the Auto class its stock
            name implies (``auto_class_name``).
        load_model_classes: returns ``model_classes``; by default the classes are looked up by name in
            ``modeling_module``.
    """

    model_type: str
    config_class: type
    model_class_names: dict[str, str]
    modeling_module: str = "hf_gpam.modeling.modeling_gpam_decoders"
    task: str = "causal-lm"
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    scratch_tokenizer: str = "byte_level_bpe_gpt2"
    scratch_token_ids: dict[str, str] = field(default_factory=lambda: dict(_CAUSAL_LM_TOKEN_IDS))
    block_stacks: dict[str, str] = field(default_factory=lambda: {"decoder": "layers"})
    attention_modules: dict[str, str] = field(default_factory=lambda: {"self": "self_attn"})
    query_key_weights: dict[str, QueryKeyWeights] = field(default_factory=lambda: {"self": QueryKeyWeights()})
    auto_class_names: dict[str, str] | None = None
    load_model_classes: Callable[[], dict[type, type]] | None = field(default=None, repr=False, compare=False)

    @property
    def gpam_model_type(self) -> str:
        return self.config_class.model_type

    @property
    def display_name(self) -> str:
        """The family's name as its stock config class spells it: "GPT2", "Llama", "GPTNeoX", "Gemma3Text"."""
        return self.config_class.__name__.removeprefix("Gpam").removesuffix("Config")

    @property
    def gpam_auto_class_names(self) -> dict[str, str]:
        """Auto class name -> GPAM model class name (``auto_class_names``, or what the stock names imply)."""
        if self.auto_class_names is not None:
            return dict(self.auto_class_names)
        return {auto_class_name(stock): gpam for stock, gpam in self.model_class_names.items()}

    @cached_property
    def model_classes(self) -> dict[type, type]:
        """Stock model class -> GPAM model class (imports transformers' modeling code on first use)."""
        if self.load_model_classes is not None:
            return dict(self.load_model_classes())
        module = importlib.import_module(self.modeling_module)
        classes = {}
        for stock_name, gpam_name in self.model_class_names.items():
            gpam_class = getattr(module, gpam_name)
            # the stock class is the GPAM class's parent of that name (no second lookup that could disagree)
            stock_class = next(base for base in gpam_class.__mro__ if base.__name__ == stock_name)
            classes[stock_class] = gpam_class
        if self.model_type in _REGISTERED_MODEL_TYPES:
            # the Auto classes get the real classes in place of their stand-ins (LazyGpamModelClass)
            for auto_class, model_class in self._auto_classes_of(classes).items():
                auto_class.register(self.config_class, model_class, exist_ok=True)
        return classes

    @cached_property
    def auto_classes(self) -> dict[type, type]:
        """Auto class -> GPAM model class, as registered when ``hf_gpam`` is imported."""
        return self._auto_classes_of(self.model_classes)

    def _auto_classes_of(self, model_classes: dict[type, type]) -> dict[type, type]:
        by_name = {gpam.__name__: gpam for gpam in model_classes.values()}
        return {getattr(transformers, auto): by_name[gpam] for auto, gpam in self.gpam_auto_class_names.items()}


# the rows register_auto_classes has registered (their model classes, once imported, replace the stand-ins)
_REGISTERED_MODEL_TYPES: set[str] = set()


class LazyGpamModelClass:
    """What the Auto classes hold for a GPAM model class until one of them uses it: the class's name, module and
    config class, and every other attribute looked up on the real class, imported on first use.

    transformers' Auto mappings return a registered value as it is (``AutoModelForCausalLM.from_config`` calls
    ``value._from_config(config)``), read its ``__module__`` to tell local classes from its own, and its
    ``config_class`` when registering; those three are answered without an import. Once imported, the real class
    replaces this stand-in in every Auto mapping of its row.
    """

    def __init__(self, architecture: GpamArchitecture, name: str):
        self.__dict__.update(
            gpam_architecture=architecture, __name__=name, __qualname__=name,
            __module__=architecture.modeling_module, config_class=architecture.config_class,
        )

    def resolve(self) -> type:
        # importing the row's classes also puts them in the Auto mappings in place of the stand-ins
        classes = self.gpam_architecture.model_classes.values()
        return next(cls for cls in classes if cls.__name__ == self.__name__)

    def __getattr__(self, name: str):
        # dunder probes (copy, pickle) and a half-built stand-in must not import anything
        if name.startswith("__") or name == "gpam_architecture":
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __eq__(self, other) -> bool:
        return other is self or (isinstance(other, type) and other is self.resolve())

    def __hash__(self) -> int:
        return hash((self.__module__, self.__name__))

    def __repr__(self) -> str:
        return f"<class '{self.__module__}.{self.__name__}' (not imported yet)>"


def register_auto_classes() -> None:
    """Register every row's config with ``AutoConfig`` and its model classes with their Auto classes.

    The model classes are registered as ``LazyGpamModelClass`` stand-ins, unless already imported, so that
    ``import hf_gpam`` does not import transformers' modeling code.
    """
    for architecture in ARCHITECTURES.values():
        transformers.AutoConfig.register(architecture.gpam_model_type, architecture.config_class, exist_ok=True)
        _REGISTERED_MODEL_TYPES.add(architecture.model_type)
        loaded = "model_classes" in vars(architecture)
        for auto_name, gpam_name in architecture.gpam_auto_class_names.items():
            auto_class = getattr(transformers, auto_name)
            value = (
                architecture.auto_classes[auto_class] if loaded else LazyGpamModelClass(architecture, gpam_name)
            )
            auto_class.register(architecture.config_class, value, exist_ok=True)


# BART and Marian: what seq2seq-lm rows share (the tokenizer and start tokens differ)
_SEQ2SEQ_LAYOUT = dict(
    task="seq2seq-lm",
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    block_stacks={"encoder": "encoder.layers", "decoder": "decoder.layers"},
    attention_modules={"self": "self_attn", "cross": "encoder_attn"},
    query_key_weights={"self": QueryKeyWeights(), "cross": QueryKeyWeights()},
)
_SEQ2SEQ_TOKEN_IDS = {"pad_token_id": "pad_token_id", "eos_token_id": "eos_token_id",
                      "forced_eos_token_id": "eos_token_id"}


ARCHITECTURES: dict[str, GpamArchitecture] = {
    "gpt2": GpamArchitecture(
        model_type="gpt2",
        config_class=GpamGPT2Config,
        model_class_names={"GPT2Model": "GpamGPT2Model", "GPT2LMHeadModel": "GpamGPT2LMHeadModel"},
        modeling_module="hf_gpam.modeling.modeling_gpam_gpt2",
        auto_class_names={"AutoModel": "GpamGPT2Model", "AutoModelForCausalLM": "GpamGPT2LMHeadModel"},
        lora_targets=("c_attn", "c_proj", "c_fc"),
        block_stacks={"decoder": "h"},
        attention_modules={"self": "attn", "cross": "crossattention"},
        # c_attn is a Conv1D: [W_Q | W_K | W_V] along its output columns; cross-attention keeps W_Q in q_attn
        query_key_weights={
            "self": QueryKeyWeights("c_attn", "c_attn", fused=("query", "key", "value")),
            "cross": QueryKeyWeights("q_attn", "c_attn", fused=("key", "value")),
        },
    ),
    "bart": GpamArchitecture(
        model_type="bart",
        config_class=GpamBartConfig,
        model_class_names={
            "BartModel": "GpamBartModel", "BartForConditionalGeneration": "GpamBartForConditionalGeneration"
        },
        modeling_module="hf_gpam.modeling.modeling_gpam_bart",
        auto_class_names={"AutoModel": "GpamBartModel", "AutoModelForSeq2SeqLM": "GpamBartForConditionalGeneration"},
        scratch_tokenizer="byte_level_bpe_bart",
        # BART starts decoding from </s>
        scratch_token_ids={**_SEQ2SEQ_TOKEN_IDS, "bos_token_id": "bos_token_id", "decoder_start_token_id": "eos_token_id"},
        **_SEQ2SEQ_LAYOUT,
    ),
    "marian": GpamArchitecture(
        model_type="marian",
        config_class=GpamMarianConfig,
        model_class_names={"MarianModel": "GpamMarianModel", "MarianMTModel": "GpamMarianMTModel"},
        modeling_module="hf_gpam.modeling.modeling_gpam_marian",
        auto_class_names={"AutoModel": "GpamMarianModel", "AutoModelForSeq2SeqLM": "GpamMarianMTModel"},
        scratch_tokenizer="sentencepiece_marian",
        # Marian starts decoding from the pad token
        scratch_token_ids={**_SEQ2SEQ_TOKEN_IDS, "bos_token_id": "pad_token_id", "decoder_start_token_id": "pad_token_id"},
        **_SEQ2SEQ_LAYOUT,
    ),
}

# where a decoder family differs from the Llama layout (blocks in base_model.layers, self_attn with q_proj / k_proj /
# v_proj): fused query-key-value projections and other attribute names
_DECODER_LAYOUTS = {
    # [Q; K; V] stacked along the output rows of one Linear
    "phi3": dict(
        lora_targets=("qkv_proj",),
        query_key_weights={"self": QueryKeyWeights("qkv_proj", "qkv_proj", fused=("query", "key", "value"))},
    ),
    # [q_h; k_h; v_h] per head along the output rows of one Linear
    "gpt_neox": dict(
        lora_targets=("query_key_value",),
        attention_modules={"self": "attention"},
        query_key_weights={
            "self": QueryKeyWeights("query_key_value", "query_key_value", fused=("query", "key", "value"), per_head=True)
        },
    ),
    "opt": dict(block_stacks={"decoder": "decoder.layers"}),
}


def _decoder_architecture(model_type: str) -> GpamArchitecture:
    # the classes modeling_gpam_decoders builds for the family on first access (a checkpoint's shipped code builds
    # its own family only)
    family = DECODER_FAMILIES[model_type]
    return GpamArchitecture(
        model_type=model_type,
        config_class=gpam_config_class(model_type),
        model_class_names={stock: gpam_class_name(stock) for stock in family.model_classes},
        **_DECODER_LAYOUTS.get(model_type, {}),
    )


# decoder-only families, in DECODER_FAMILIES order (Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3, Phi-3, GPT-NeoX,
# OPT, OLMo2); each row's model_classes are base model, causal LM and, where transformers has one, classifier
ARCHITECTURES.update({model_type: _decoder_architecture(model_type) for model_type in DECODER_FAMILIES})

GPAM_MODEL_TYPES = {arch.gpam_model_type: arch for arch in ARCHITECTURES.values()}


def supported_model_types(task: str | None = None) -> str:
    """The supported stock model types, comma-separated; only those of ``task`` ("causal-lm", "seq2seq-lm")."""
    return ", ".join(model_types_for_task(task) if task else ARCHITECTURES)


def model_types_for_task(task: str) -> tuple[str, ...]:
    """The stock model types whose rows have ``task``: ``model_types_for_task("seq2seq-lm") == ("bart", "marian")``."""
    return tuple(model_type for model_type, architecture in ARCHITECTURES.items() if architecture.task == task)


def architecture_of(model_or_config) -> GpamArchitecture:
    """The table row of a model or config, stock or GPAM (hf_gpam's classes or a checkpoint's remote code).

    Raises ``ValueError`` naming the supported model types for anything else.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    architecture = ARCHITECTURES.get(model_type) or GPAM_MODEL_TYPES.get(model_type)
    if architecture is None:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {supported_model_types()})")
    return architecture


# --- families outside the table: patch_model(model, allow_untested=True) --------------------------------------

# attribute names of the query projection (alone or fused with keys and values) across transformers' families
QUERY_PROJECTION_NAMES = ("q_proj", "qkv_proj", "query", "query_key_value", "c_attn", "Wqkv", "W_pack", "q_attn")
# attribute names of the head dimension on attention modules
HEAD_DIM_NAMES = ("head_dim", "head_size", "attention_head_size")
_INTERFACE_CALL = "ALL_ATTENTION_FUNCTIONS.get_interface("
_UNTESTED_ARCHITECTURES: dict[type, GpamArchitecture] = {}


def _routes_through_attention_interface(cls: type) -> bool:
    module = sys.modules.get(cls.__module__)
    try:
        return module is not None and _INTERFACE_CALL in inspect.getsource(module)
    except (OSError, TypeError):
        return False


def _is_interface_attention_module(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "layer_idx", None), int)
        and any(isinstance(getattr(module, name, None), nn.Linear) for name in QUERY_PROJECTION_NAMES)
        and _routes_through_attention_interface(type(module))
    )


def untested_architecture(model: nn.Module) -> GpamArchitecture:
    """A table row built on the fly for a model whose family is not in ``ARCHITECTURES``.

    The attention modules are found generically: modules with an integer ``layer_idx`` and a query projection
    (``q_proj``, ``qkv_proj``, ``query_key_value``, ...) whose modeling file calls
    ``ALL_ATTENTION_FUNCTIONS.get_interface(``, i.e. whose attention daGPAM's registered backends can take over.
    All of them must share one class and expose the head dimension (``head_dim``, ``head_size`` or
    ``attention_head_size``). Raises ``ValueError`` saying what is missing otherwise.

    The classes are generated with the same factories as the table's (cached per stock model class) but are not
    registered with the Auto classes and ship no remote code. ``patch_model`` checks the λ = 0 identity right after
    using them.
    """
    model_class = type(model)
    cached = _UNTESTED_ARCHITECTURES.get(model_class)
    if cached is not None:
        return cached
    config = model.config
    model_type = config.model_type
    attention_classes = {type(m) for m in model.modules() if _is_interface_attention_module(m)}
    if not attention_classes:
        raise ValueError(
            f"patch_model(allow_untested=True): {model_class.__name__} (model_type {model_type!r}) has no attention "
            "module that routes through transformers' attention interface (a module with an integer layer_idx, a "
            f"query projection named one of {', '.join(QUERY_PROJECTION_NAMES)}, in a modeling file that calls "
            f"{_INTERFACE_CALL}...)). daGPAM cannot take over its attention; supported families: "
            f"{supported_model_types()}."
        )
    if len(attention_classes) > 1:
        names = ", ".join(sorted(cls.__name__ for cls in attention_classes))
        raise ValueError(
            f"patch_model(allow_untested=True): {model_class.__name__} has several attention classes ({names}); "
            "the untested path converts models with one attention class only."
        )
    (stock_attention,) = attention_classes
    sample = next(m for m in model.modules() if type(m) is stock_attention)
    head_dim_attribute = next((n for n in HEAD_DIM_NAMES if isinstance(getattr(sample, n, None), int)), None)
    if head_dim_attribute is None:
        raise ValueError(
            f"patch_model(allow_untested=True): {stock_attention.__name__} stores its head dimension under none of "
            f"{', '.join(HEAD_DIM_NAMES)}; daGPAM needs it to size W⁻."
        )
    from .modeling.configuration_gpam_decoders import make_gpam_config_class
    from .modeling.modeling_gpam_decoders import make_gpam_attention_class, make_gpam_model_class

    # module_name: these classes live in this cache only; they are never saved as remote code
    config_class = make_gpam_config_class(type(config), model_type, module_name=__name__)
    attention_class = make_gpam_attention_class(stock_attention, head_dim_attribute, module_name=__name__)
    softcap_attribute = "attn_logit_softcapping" if hasattr(config, "attn_logit_softcapping") else None
    gpam_class = make_gpam_model_class(
        model_class, config_class, attention_class, stock_attention, softcap_attribute, module_name=__name__
    )
    architecture = GpamArchitecture(
        model_type=model_type,
        config_class=config_class,
        model_class_names={model_class.__name__: gpam_class.__name__},
        modeling_module=__name__,
        auto_class_names={},
        load_model_classes=lambda: {model_class: gpam_class},
    )
    _UNTESTED_ARCHITECTURES[model_class] = architecture
    return architecture
