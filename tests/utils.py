"""Builders shared by the tests: tiny stock models, inputs with padding, and the architecture list."""

import torch

from hf_gpam import ARCHITECTURES
from hf_gpam.testing_utils import TINY_VOCAB_SIZE, tiny_gpam_config, tiny_stock_config


MODEL_TYPES = list(ARCHITECTURES)
# (model_type, stock class) for every class patch_model converts
STOCK_CLASSES = [(mt, cls) for mt, arch in ARCHITECTURES.items() for cls in arch.model_classes]
STOCK_CLASS_IDS = [cls.__name__ for _, cls in STOCK_CLASSES]
IMPLEMENTATIONS = ["eager", "sdpa"]


def stock_model(model_type, model_class=None, attn_implementation="sdpa", **overrides):
    """A tiny stock model in eval mode; the head class of the architecture unless ``model_class`` is given."""
    model_class = model_class or head_class(model_type)
    config = tiny_stock_config(model_type, **overrides)
    config._attn_implementation = attn_implementation
    return model_class(config).eval()


def gpam_model(model_type, attn_implementation="sdpa", **overrides):
    """A tiny GPAM head model (λ and W⁻ per ``overrides``) in eval mode."""
    config = tiny_gpam_config(model_type, **overrides)
    config._attn_implementation = attn_implementation
    return gpam_head_class(model_type)(config).eval()


def head_class(model_type):
    return list(ARCHITECTURES[model_type].model_classes)[1]


def gpam_head_class(model_type):
    return list(ARCHITECTURES[model_type].model_classes.values())[1]


def model_inputs(model_type, batch=2, length=9, left_padding=False, seed=0):
    """Input ids with one padded row (right padding by default), plus decoder inputs for encoder-decoders."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, TINY_VOCAB_SIZE, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    padded = slice(0, 3) if left_padding else slice(length - 3, length)
    attention_mask[1, padded] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if model_type != "gpt2":
        inputs["decoder_input_ids"] = torch.randint(3, TINY_VOCAB_SIZE, (batch, length - 2), generator=generator)
    return inputs


def main_output(outputs):
    """Logits for head models, the last hidden state for base models."""
    return outputs.logits if hasattr(outputs, "logits") else outputs.last_hidden_state


def valid_positions(model_type, inputs):
    """Boolean (B, T_out) mask of output positions that are not padding (padding rows are unspecified)."""
    if model_type == "gpt2":
        return inputs["attention_mask"].bool()
    return torch.ones(inputs["decoder_input_ids"].shape, dtype=torch.bool)


def sharpen_attention(model, std=0.4):
    """Re-draw query/key projections with a large std.

    Tiny freshly initialised models attend almost uniformly, where P⁺ ≈ P⁻ and λ hardly changes anything; tests
    that need daGPAM to make a visible difference sharpen the scores first.
    """
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(key in name for key in ("q_proj.weight", "k_proj.weight", "c_attn.weight", "q_attn.weight")):
                parameter.normal_(std=std)
    return model
