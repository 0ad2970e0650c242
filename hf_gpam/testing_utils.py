"""Tiny model configurations for tests, examples and smoke runs (seconds on a CPU, nothing downloaded)."""

from __future__ import annotations

from transformers import BartConfig, GPT2Config, MarianConfig


TINY_VOCAB_SIZE = 96

# Python source to run first in a fresh interpreter so that ``import hf_gpam`` fails there even where hf_gpam is
# installed: what a checkpoint loaded with trust_remote_code must survive on a machine without the package
HIDE_HF_GPAM_PRELUDE = """
import sys


class HideHfGpam:
    def find_spec(self, name, path=None, target=None):
        if name == "hf_gpam" or name.startswith("hf_gpam."):
            raise ImportError("hf_gpam is hidden from this process")


sys.meta_path.insert(0, HideHfGpam())
"""


# The decoder families' tiny configs: 2 layers, width 32, 4 query heads of dim 8 sharing 2 K/V heads where the
# family has grouped-query attention, and each family's distinctive feature switched on at a size that matters for
# ~9-token inputs: sliding windows of 4 tokens, partial rotary embeddings, alternating sliding / global layers.
_DECODER_COMMON = dict(
    num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=TINY_VOCAB_SIZE,
    max_position_embeddings=64, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
_GQA = dict(num_key_value_heads=2, head_dim=8)
TINY_DECODER_CONFIGS = {
    "llama": dict(_GQA),
    "mistral": dict(_GQA, sliding_window=4),
    "qwen2": dict(_GQA),
    "qwen3": dict(_GQA),
    # Gemma's query scale comes from query_pre_attn_scalar; layer 0 sliding (window 4), layer 1 global
    "gemma2": dict(
        _GQA, query_pre_attn_scalar=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
    ),
    "gemma3_text": dict(
        _GQA, query_pre_attn_scalar=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
    ),
    "phi3": dict(num_key_value_heads=2, partial_rotary_factor=0.5),
    # Pythia-style: a quarter of the head rotated would be 2 dims; half keeps the partial rotation visible
    "gpt_neox": dict(rotary_pct=0.5, use_parallel_residual=True),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64),
    "olmo2": dict(_GQA),
}


def tiny_stock_config(model_type: str, **overrides):
    """A stock config of ``model_type`` with 2 layers, width 32 and 4 heads (head dim 8).

    ``model_type`` is "gpt2", "bart", "marian" or a decoder family of ``TINY_DECODER_CONFIGS`` ("llama",
    "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox", "opt", "olmo2").
    """
    if model_type in TINY_DECODER_CONFIGS:
        from transformers import CONFIG_MAPPING

        base = {**_DECODER_COMMON, **TINY_DECODER_CONFIGS[model_type]}
        if model_type == "opt":
            # OPT names its widths differently
            base.pop("intermediate_size")
        return CONFIG_MAPPING[model_type](**{**base, **overrides})
    if model_type == "gpt2":
        base = dict(
            n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=TINY_VOCAB_SIZE,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        return GPT2Config(**{**base, **overrides})
    if model_type in ("bart", "marian"):
        base = dict(
            encoder_layers=2, decoder_layers=2, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, vocab_size=TINY_VOCAB_SIZE,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2 if model_type == "bart" else 1,
        )
        config_class = BartConfig if model_type == "bart" else MarianConfig
        return config_class(**{**base, **overrides})
    supported = ", ".join(repr(t) for t in ("gpt2", "bart", "marian", *TINY_DECODER_CONFIGS))
    raise ValueError(f"tiny_stock_config: model_type {model_type!r} is not one of {supported}")


def tiny_config_overrides(model_type: str) -> str:
    """The sizes of ``tiny_stock_config(model_type)`` as a recipe ``--config_overrides`` string.

    Only the scalar size and feature fields (layers, widths, heads, windows, rotary fractions) that the family's
    default config has (``--config_overrides`` accepts no others; Qwen2 derives ``head_dim`` instead); the
    vocabulary and special tokens come from the tokenizer a recipe trains, and list fields (Gemma's
    ``layer_types``) follow from the layer count. Decoder families only.

    Example:

    ```python
    >>> from hf_gpam.testing_utils import tiny_config_overrides
    >>> tiny_config_overrides("llama").split(",")[:3]
    ['num_hidden_layers=2', 'hidden_size=32', 'num_attention_heads=4']
    ```
    """
    if model_type not in TINY_DECODER_CONFIGS:
        raise ValueError(f"tiny_config_overrides: {model_type!r} is not a decoder family of TINY_DECODER_CONFIGS")
    from transformers import CONFIG_MAPPING

    defaults = CONFIG_MAPPING[model_type]()
    fields = {**_DECODER_COMMON, **TINY_DECODER_CONFIGS[model_type]}
    skipped = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
    return ",".join(
        f"{name}={value}"
        for name, value in fields.items()
        if name not in skipped and not isinstance(value, list) and hasattr(defaults, name)
    )


def tiny_gpam_config(model_type: str, **overrides):
    """The GPAM config matching ``tiny_stock_config(model_type)``; ``overrides`` may include ``gpam_*`` fields."""
    from .patching import gpam_config_from_stock

    gpam_fields = {k: v for k, v in overrides.items() if k.startswith("gpam_")}
    stock = tiny_stock_config(model_type, **{k: v for k, v in overrides.items() if not k.startswith("gpam_")})
    return gpam_config_from_stock(stock, **gpam_fields)
