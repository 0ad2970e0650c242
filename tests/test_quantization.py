"""Quantized bases, offloading, sharded checkpoints and bf16 (issue 15), on tiny models, offline, on the CPU.

bitsandbytes 0.50 (4-bit nf4 with double quantization, 8-bit) and torchao 0.18 (int8 weight-only) all run on this
CPU. For each: the λ = 0 identity against the quantized stock model (patched, and loaded into the GPAM class), W⁻ and
λ created unquantized in the compute dtype (λ float32), a LoRA + λ training step that changes them and leaves the
quantized base alone, and a save / reload with ``trust_remote_code`` in a process that cannot import hf_gpam.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM, TorchAoConfig

import hf_gpam
from hf_gpam.testing_utils import HIDE_HF_GPAM_PRELUDE, tiny_stock_config

from .utils import gpam_model, main_output, model_inputs, stock_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quantization_configs():
    from torchao.quantization import Int8WeightOnlyConfig

    return {
        "bnb-4bit-nf4-double": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
        "bnb-8bit": BitsAndBytesConfig(load_in_8bit=True),
        "torchao-int8-weight-only": TorchAoConfig(Int8WeightOnlyConfig()),
    }


METHODS = ["bnb-4bit-nf4-double", "bnb-8bit", "torchao-int8-weight-only"]
# the quantized layer class of each method (torchao keeps nn.Linear with a quantized tensor subclass as weight)
QUANTIZED_LAYER = {"bnb-4bit-nf4-double": "Linear4bit", "bnb-8bit": "Linear8bitLt"}


@pytest.fixture(scope="module")
def stock_checkpoint(tmp_path_factory):
    """A tiny stock Llama (head dim 16, GQA 4/2) saved as a checkpoint, and inputs."""
    folder = tmp_path_factory.mktemp("stock_llama")
    config = tiny_stock_config("llama", hidden_size=64, head_dim=16)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def quantized_stock(folder, method):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization_configs()[method],
                                                device_map="cpu").eval()


def assert_base_is_quantized(model, method):
    q_proj = model.model.layers[0].self_attn.q_proj
    if method in QUANTIZED_LAYER:
        assert type(q_proj).__name__ == QUANTIZED_LAYER[method]
    else:
        # torchao keeps nn.Linear and swaps its weight for a quantized tensor subclass
        assert type(q_proj.weight).__module__.startswith("torchao"), type(q_proj.weight)


def weight_snapshot(weight):
    """A comparable copy of a (possibly quantized) weight."""
    weight = weight.detach()
    return weight.dequantize().clone() if type(weight).__module__.startswith("torchao") else weight.clone()


def assert_gpam_weights_unquantized(model):
    for module in model.gpam_modules():
        assert type(module.gpam_q_neg) is torch.nn.Linear, type(module.gpam_q_neg)
        assert type(module.gpam_q_neg.weight) is torch.nn.Parameter and module.gpam_q_neg.weight.dtype == torch.float32
        assert module.gpam_lambda.weight.dtype == torch.float32


@pytest.mark.parametrize("method", METHODS)
def test_patched_quantized_base_with_zero_lambda_gives_the_quantized_stock_outputs(stock_checkpoint, method):
    model = quantized_stock(stock_checkpoint, method)
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected = main_output(model(**inputs))
        patched = hf_gpam.patch_model(model, gpam_negative_init="normal")
        got = main_output(patched(**inputs))
    assert_base_is_quantized(patched, method)
    assert_gpam_weights_unquantized(patched)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)
    # and λ ≠ 0 changes the quantized model's outputs
    with torch.no_grad():
        for module in patched.gpam_modules():
            module.gpam_lambda.weight.fill_(0.8)
        assert not torch.allclose(main_output(patched(**inputs))[valid], expected[valid], atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_stock_checkpoint_loads_quantized_into_the_gpam_class_with_unquantized_gpam_weights(stock_checkpoint, method):
    stock = quantized_stock(stock_checkpoint, method)
    model = hf_gpam.GpamLlamaForCausalLM.from_pretrained(
        stock_checkpoint, quantization_config=quantization_configs()[method], device_map="cpu", gpam_lambda_init=0.0,
    ).eval()
    assert_base_is_quantized(model, method)
    assert_gpam_weights_unquantized(model)
    inputs = model_inputs("llama")
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs))[valid], main_output(stock(**inputs))[valid],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_lora_and_lambda_train_on_a_quantized_base(stock_checkpoint, method):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = hf_gpam.patch_model(quantized_stock(stock_checkpoint, method), gpam_lambda_init=0.3)
    if method.startswith("bnb"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gpam_q_neg"],
                        modules_to_save=["gpam_lambda"], init_lora_weights=False)
    peft_model = get_peft_model(model, config).train()
    trainable = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any("gpam_q_neg.lora_A" in name for name in trainable)
    assert any("gpam_lambda" in name for name in trainable)
    frozen_q = weight_snapshot(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    moved = {name for name, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[name])}
    assert any("gpam_lambda" in name for name in moved), "λ did not move"
    assert any("gpam_q_neg.lora" in name for name in moved), "W⁻'s adapter did not move"
    after_q = weight_snapshot(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight)
    assert torch.equal(after_q, frozen_q), "the quantized base changed"


RELOAD_WITHOUT_HF_GPAM = HIDE_HF_GPAM_PRELUDE + """
import json

import torch
import transformers

folder, ids = sys.argv[1], json.loads(sys.argv[2])
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, device_map="cpu").eval()
q_proj = type(model.model.layers[0].self_attn.q_proj).__name__
q_neg = type(model.model.layers[0].self_attn.gpam_q_neg).__name__
with torch.no_grad():
    logits = model(torch.tensor(ids)).logits
print(json.dumps({"class": type(model).__name__, "q_proj": q_proj, "q_neg": q_neg, "logits": logits.tolist()}))
"""


@pytest.mark.parametrize("method", METHODS)
def test_quantized_gpam_checkpoint_reloads_with_trust_remote_code_without_hf_gpam(stock_checkpoint, tmp_path, method):
    model = hf_gpam.patch_model(quantized_stock(stock_checkpoint, method), gpam_lambda_init=0.6)
    model.save_pretrained(tmp_path / "quantized")
    saved = json.loads((tmp_path / "quantized" / "config.json").read_text())["quantization_config"]
    skipped = saved.get("llm_int8_skip_modules") or saved.get("modules_to_not_convert")
    assert {"gpam_q_neg", "gpam_lambda"} <= set(skipped), saved
    ids = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_WITHOUT_HF_GPAM, str(tmp_path / "quantized"), json.dumps(ids.tolist())],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["class"] == "GpamLlamaForCausalLM" and report["q_neg"] == "Linear"
    if method in QUANTIZED_LAYER:
        assert report["q_proj"] == QUANTIZED_LAYER[method]
    torch.testing.assert_close(torch.tensor(report["logits"]), expected, atol=1e-4, rtol=1e-4)


def test_an_unsupported_quantization_method_is_refused_in_one_line():
    model = stock_model("llama")
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match="quantized with 'gptq'; daGPAM supports bases quantized with bitsandbytes or torchao"):
        hf_gpam.patch_model(model)
    assert type(model).__name__ == "LlamaForCausalLM"
    config = hf_gpam.GpamLlamaConfig(**tiny_stock_config("llama").to_dict())
    config.quantization_config = {"quant_method": "awq"}
    with pytest.raises(ValueError, match="quantization method is 'awq'"):
        hf_gpam.GpamLlamaForCausalLM(config)


# --- offloading and sharded checkpoints -----------------------------------------------------------------------


OFFLOAD_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
               "model.rotary_emb": "cpu", "lm_head": "cpu"}


def test_disk_offloading_works_patched_then_dispatched_and_is_refused_clearly_otherwise(stock_checkpoint, tmp_path):
    from accelerate import dispatch_model

    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(stock_checkpoint)(ids).logits
    # the route patch_model's error names: patch on the CPU, then let accelerate dispatch
    model = hf_gpam.patch_model(LlamaForCausalLM.from_pretrained(stock_checkpoint))
    model = dispatch_model(model, device_map=OFFLOAD_MAP, offload_dir=str(tmp_path / "offload"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    # a stock checkpoint straight into the GPAM class with a layer on disk: refused at load, with the remedy
    with pytest.raises(ValueError, match="sit in offloaded layers.*patch_model.*dispatch_model"):
        hf_gpam.GpamLlamaForCausalLM.from_pretrained(
            stock_checkpoint, device_map=OFFLOAD_MAP, offload_folder=str(tmp_path / "offload2"), gpam_lambda_init=0.0,
        )
    # and a saved GPAM checkpoint (it holds the gpam_* weights) loads with the same offloading
    hf_gpam.patch_model(LlamaForCausalLM.from_pretrained(stock_checkpoint)).save_pretrained(tmp_path / "gpam")
    offloaded = hf_gpam.GpamLlamaForCausalLM.from_pretrained(
        tmp_path / "gpam", device_map=OFFLOAD_MAP, offload_folder=str(tmp_path / "offload3")
    )
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_sharded_stock_checkpoint_loads_into_the_gpam_class_with_only_gpam_keys_missing(tmp_path):
    torch.manual_seed(3)
    stock = LlamaForCausalLM(tiny_stock_config("llama", hidden_size=64, head_dim=16)).eval()
    stock.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "model.safetensors.index.json").is_file(), shards
    model, info = hf_gpam.GpamLlamaForCausalLM.from_pretrained(
        tmp_path, low_cpu_mem_usage=True, gpam_lambda_init=0.0, output_loading_info=True
    )
    assert info["missing_keys"] and all(".gpam_q_neg." in k or ".gpam_lambda." in k for k in info["missing_keys"])
    assert len(info["missing_keys"]) == 2 * stock.config.num_hidden_layers
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    inputs = model_inputs("llama")
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(main_output(model.eval()(**inputs))[valid], main_output(stock(**inputs))[valid],
                                   atol=1e-5, rtol=1e-5)


# --- bf16 end to end ---------------------------------------------------------------------------------------------


class Float32SquareScores(TorchDispatchMode):
    """Records every float32 tensor an op produces whose last two dims are (T, T): a float32 copy of a score map."""

    def __init__(self, length):
        super().__init__()
        self.length, self.found = length, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.dim() >= 2
                and tuple(tensor.shape[-2:]) == (self.length, self.length)
            ):
                self.found.append(str(func))
        return out


BF16_FAMILIES = {"gpt2": "gpt2", "llama": "llama", "marian": "marian"}


@pytest.mark.parametrize("model_type", list(BF16_FAMILIES))
def test_bf16_training_step_keeps_lambda_float32_and_the_fp32_loss(model_type):
    # T = 37 tokens: no other dimension of these tiny models is 37, so a (37, 37) tensor is a score map
    length = 37
    model = gpam_model(model_type, gpam_lambda_init=0.4).train()
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 90, (2, length), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    if model_type == "marian":
        batch = {"input_ids": ids, "decoder_input_ids": ids, "labels": ids}
    for name, value in model.config.to_dict().items():
        if (name.endswith("dropout") or name.endswith("pdrop")) and isinstance(value, float):
            setattr(model.config, name, 0.0)
    model.eval()
    fp32_loss = model(**batch).loss.item()
    model.to(torch.bfloat16)
    assert all(m.gpam_lambda.weight.dtype == torch.float32 for m in model.gpam_modules())
    assert all(m.gpam_q_neg.weight.dtype == torch.bfloat16 for m in model.gpam_modules())
    recorder = Float32SquareScores(length)
    with recorder:
        loss = model(**batch).loss
        loss.backward()
    # bf16 keeps 8 bits of mantissa (relative rounding 2⁻⁸ ≈ 0.4 % per op); through two layers and a cross-entropy
    # over 96 classes the loss moves by well under 2 %
    assert abs(loss.item() - fp32_loss) <= 0.02 * abs(fp32_loss), (loss.item(), fp32_loss)
    assert not recorder.found, f"float32 (T, T) tensors on the sdpa path: {sorted(set(recorder.found))}"
    for module in model.gpam_modules():
        assert module.gpam_lambda.weight.grad is not None and module.gpam_lambda.weight.grad.dtype == torch.float32
        assert torch.isfinite(module.gpam_q_neg.weight.grad).all()
