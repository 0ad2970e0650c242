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


def tiny_stock_config(model_type: str, **overrides):
    """A stock config of ``model_type`` ("gpt2", "bart", "marian") with 2 layers, width 32 and 4 heads."""
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
    raise ValueError(f"tiny_stock_config: model_type {model_type!r} is not one of 'gpt2', 'bart', 'marian'")


def tiny_gpam_config(model_type: str, **overrides):
    """The GPAM config matching ``tiny_stock_config(model_type)``; ``overrides`` may include ``gpam_*`` fields."""
    from .patching import gpam_config_from_stock

    gpam_fields = {k: v for k, v in overrides.items() if k.startswith("gpam_")}
    stock = tiny_stock_config(model_type, **{k: v for k, v in overrides.items() if not k.startswith("gpam_")})
    return gpam_config_from_stock(stock, **gpam_fields)
