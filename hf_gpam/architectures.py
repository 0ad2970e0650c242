"""The supported-architecture table: one row per stock ``model_type``, the single place that says which GPAM
config and model classes stand for which stock ones. Registration, ``patch_model`` and the tests all read it.

GPT-2, BART and Marian have hand-written classes; the decoder-only families get one row each from the classes
``modeling_gpam_decoders`` generates out of its own table (``DECODER_FAMILIES``)."""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field

from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartForConditionalGeneration,
    BartModel,
    GPT2LMHeadModel,
    GPT2Model,
    MarianModel,
    MarianMTModel,
)

from .modeling.configuration_gpam_decoders import DECODER_FAMILIES, gpam_config_class, make_gpam_config_class
from .modeling.modeling_gpam_decoders import (
    auto_class_name,
    gpam_model_classes,
    make_gpam_attention_class,
    make_gpam_model_class,
)
from .modeling import (
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
        model_classes: stock model class -> GPAM model class, for every class ``patch_model`` converts.
        auto_classes: Auto class -> GPAM model class, registered when ``hf_gpam`` is imported.
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
    """

    model_type: str
    config_class: type
    model_classes: dict[type, type]
    auto_classes: dict[type, type]
    task: str = "causal-lm"
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    scratch_tokenizer: str = "byte_level_bpe_gpt2"
    scratch_token_ids: dict[str, str] = field(default_factory=lambda: dict(_CAUSAL_LM_TOKEN_IDS))
    block_stacks: dict[str, str] = field(default_factory=lambda: {"decoder": "layers"})
    attention_modules: dict[str, str] = field(default_factory=lambda: {"self": "self_attn"})
    query_key_weights: dict[str, QueryKeyWeights] = field(default_factory=lambda: {"self": QueryKeyWeights()})

    @property
    def gpam_model_type(self) -> str:
        return self.config_class.model_type

    @property
    def display_name(self) -> str:
        """The family's name as its stock config class spells it: "GPT2", "Llama", "GPTNeoX", "Gemma3Text"."""
        return self.config_class.__name__.removeprefix("Gpam").removesuffix("Config")


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
        model_classes={GPT2Model: GpamGPT2Model, GPT2LMHeadModel: GpamGPT2LMHeadModel},
        auto_classes={AutoModel: GpamGPT2Model, AutoModelForCausalLM: GpamGPT2LMHeadModel},
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
        model_classes={BartModel: GpamBartModel, BartForConditionalGeneration: GpamBartForConditionalGeneration},
        auto_classes={AutoModel: GpamBartModel, AutoModelForSeq2SeqLM: GpamBartForConditionalGeneration},
        scratch_tokenizer="byte_level_bpe_bart",
        # BART starts decoding from </s>
        scratch_token_ids={**_SEQ2SEQ_TOKEN_IDS, "bos_token_id": "bos_token_id", "decoder_start_token_id": "eos_token_id"},
        **_SEQ2SEQ_LAYOUT,
    ),
    "marian": GpamArchitecture(
        model_type="marian",
        config_class=GpamMarianConfig,
        model_classes={MarianModel: GpamMarianModel, MarianMTModel: GpamMarianMTModel},
        auto_classes={AutoModel: GpamMarianModel, AutoModelForSeq2SeqLM: GpamMarianMTModel},
        scratch_tokenizer="sentencepiece_marian",
        # Marian starts decoding from the pad token
        scratch_token_ids={**_SEQ2SEQ_TOKEN_IDS, "bos_token_id": "pad_token_id", "decoder_start_token_id": "pad_token_id"},
        **_SEQ2SEQ_LAYOUT,
    ),
}

_AUTO_CLASSES = {
    "AutoModel": AutoModel,
    "AutoModelForCausalLM": AutoModelForCausalLM,
    "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
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
    # the package builds every family (a checkpoint's shipped code builds its own only)
    model_classes = gpam_model_classes(model_type)
    return GpamArchitecture(
        model_type=model_type,
        config_class=gpam_config_class(model_type),
        model_classes=dict(model_classes),
        auto_classes={_AUTO_CLASSES[auto_class_name(stock.__name__)]: gpam for stock, gpam in model_classes.items()},
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
    # module_name: these classes live in this cache only; they are never saved as remote code
    config_class = make_gpam_config_class(type(config), model_type, module_name=__name__)
    attention_class = make_gpam_attention_class(stock_attention, head_dim_attribute, module_name=__name__)
    softcap_attribute = "attn_logit_softcapping" if hasattr(config, "attn_logit_softcapping") else None
    gpam_class = make_gpam_model_class(
        model_class, config_class, attention_class, stock_attention, softcap_attribute, module_name=__name__
    )
    architecture = GpamArchitecture(
        model_type=model_type, config_class=config_class, model_classes={model_class: gpam_class}, auto_classes={}
    )
    _UNTESTED_ARCHITECTURES[model_class] = architecture
    return architecture
