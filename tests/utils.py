"""Builders shared by the tests: tiny stock models, inputs with padding, the architecture list, and a causal-LM
reload in a fresh interpreter where hf_gpam cannot be imported."""

import json
import os
import subprocess
import sys

import torch

from hf_gpam import ARCHITECTURES
from hf_gpam.modeling.configuration_gpam_decoders import DECODER_FAMILIES
from hf_gpam.testing_utils import HIDE_HF_GPAM_PRELUDE, TINY_VOCAB_SIZE, tiny_gpam_config, tiny_stock_config


# the decoder families generated from one table run their contract in tests/test_decoders.py, in fewer, combined
# tests; the per-feature test files cover the three architectures with hand-written classes
DECODER_TYPES = list(DECODER_FAMILIES)
MODEL_TYPES = [mt for mt in ARCHITECTURES if mt not in DECODER_FAMILIES]
ENCODER_DECODER_TYPES = {"bart", "marian"}
# (model_type, stock class) for every class patch_model converts
STOCK_CLASSES = [(mt, cls) for mt in MODEL_TYPES for cls in ARCHITECTURES[mt].model_classes]
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
    if model_type in ENCODER_DECODER_TYPES:
        inputs["decoder_input_ids"] = torch.randint(3, TINY_VOCAB_SIZE, (batch, length - 2), generator=generator)
    return inputs


def main_output(outputs):
    """Logits for head models, the last hidden state for base models."""
    return outputs.logits if hasattr(outputs, "logits") else outputs.last_hidden_state


def valid_positions(model_type, inputs):
    """Boolean (B, T_out) mask of output positions that are not padding (padding rows are unspecified)."""
    if model_type not in ENCODER_DECODER_TYPES:
        return inputs["attention_mask"].bool()
    return torch.ones(inputs["decoder_input_ids"].shape, dtype=torch.bool)


# the query / key projection weights of every architecture (fused q|k|v ones included)
SHARPENED_WEIGHTS = (
    "q_proj.weight", "k_proj.weight", "c_attn.weight", "q_attn.weight", "qkv_proj.weight", "query_key_value.weight",
)


def sharpen_attention(model, std=0.4):
    """Re-draw query/key projections with a large std.

    Tiny freshly initialised models attend almost uniformly, where P⁺ ≈ P⁻ and λ hardly changes anything; tests
    that need daGPAM to make a visible difference sharpen the scores first.
    """
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(key in name for key in SHARPENED_WEIGHTS):
                parameter.normal_(std=std)
    return model


def randomise_gpam(model, lambda_range=(0.2, 1.5)):
    """Random W⁻ and λ per head, so that daGPAM changes the outputs a lot (with sharpened q/k)."""
    with torch.no_grad():
        for module in model.gpam_modules():
            torch.nn.init.normal_(module.gpam_q_neg.weight, std=0.5)
            module.gpam_lambda.weight.uniform_(*lambda_range)
    return model


REMOTE_CAUSAL_LOGITS_SCRIPT = HIDE_HF_GPAM_PRELUDE + """
import json
import torch
import transformers

folder, inputs_path, output_path, positions = sys.argv[1:]
try:
    import hf_gpam  # noqa: F401
    sys.exit("hf_gpam is importable, the test would prove nothing")
except ImportError:
    pass
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
inputs = {k: torch.tensor(v) for k, v in json.load(open(inputs_path)).items()}
with torch.no_grad():
    logits = model(**inputs).logits
logits = logits if positions == "all" else logits[:, -int(positions):]
json.dump({"class": type(model).__name__, "logits": logits.tolist()}, open(output_path, "w"))
"""


def remote_causal_logits(folder, inputs, tmp_path, positions=None, timeout=300) -> tuple[str, torch.Tensor]:
    """Load ``folder`` with ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` in a subprocess
    where hf_gpam cannot be imported, run ``inputs`` through it, and return (class name, logits). ``positions``
    keeps only the logits of the last that many positions (a real vocabulary makes the full tensor large)."""
    inputs_path, output_path = tmp_path / "inputs.json", tmp_path / "outputs.json"
    inputs_path.write_text(json.dumps({k: v.tolist() for k, v in inputs.items()}))
    # HF_MODULES_CACHE inside tmp_path: remote code is copied there, not into the user's cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CAUSAL_LOGITS_SCRIPT, str(folder), str(inputs_path), str(output_path),
         "all" if positions is None else str(positions)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(output_path.read_text())
    return loaded["class"], torch.tensor(loaded["logits"])
