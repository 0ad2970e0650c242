"""The decoder-only families generated from one table (Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3, Phi-3,
GPT-NeoX, OPT, OLMo2): the contract GPT-2, BART and Marian meet in the per-feature files, in a few combined tests
per family, on tiny random models (hf_gpam.testing_utils), offline. Plus the refusals: Gemma2's soft-capping off
eager, families outside the table, and what ``patch_model(allow_untested=True)`` does with them.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AttentionInterface, AutoModel, AutoModelForCausalLM

import hf_gpam
from hf_gpam.testing_utils import HIDE_HF_GPAM_PRELUDE, tiny_gpam_config, tiny_stock_config

from .utils import (
    DECODER_TYPES, gpam_head_class, gpam_model, main_output, model_inputs, randomise_gpam, sharpen_attention,
    stock_model,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# stock Gemma2 refuses sdpa (its soft-capping, attn_logit_softcapping=50.0, has no SDPA kernel); daGPAM follows it
EAGER_ONLY = {"gemma2"}


def backends(model_type):
    return ["eager"] if model_type in EAGER_ONLY else ["eager", "sdpa"]


def assert_close_on_valid(inputs, got, want, atol=1e-5):
    if want.dim() == 3:
        valid = inputs["attention_mask"].bool()
        got, want = got[valid], want[valid]
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)


def without_dropout(config):
    for name, value in config.to_dict().items():
        if (name.endswith("dropout") or name.endswith("pdrop")) and isinstance(value, float):
            setattr(config, name, 0.0)
    return config


# --- the contract, per family ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_patched_with_zero_lambda_gives_stock_outputs_on_both_backends_and_after_reload(tmp_path, model_type):
    architecture = hf_gpam.ARCHITECTURES[model_type]
    # left padding: what generation with these models uses, and where a wrong mask shows first
    inputs = model_inputs(model_type, left_padding=True)
    for implementation in backends(model_type):
        for stock_class, gpam_class in architecture.model_classes.items():
            stock = stock_model(model_type, stock_class, attn_implementation=implementation)
            with torch.no_grad():
                expected = main_output(stock(**inputs))
                # a random W⁻: the identity must not depend on it
                patched = hf_gpam.patch_model(stock, gpam_negative_init="normal")
                assert type(patched) is gpam_class
                assert patched.config._attn_implementation == implementation
                assert {m.config._attn_implementation for m in patched.gpam_modules()} == {f"gpam_{implementation}"}
                assert len(patched.gpam_modules()) == 2
                assert_close_on_valid(inputs, main_output(patched(**inputs)), expected)
        # the head model (the last converted) through save_pretrained / from_pretrained
        patched.save_pretrained(tmp_path / implementation)
        reloaded = type(patched).from_pretrained(tmp_path / implementation, attn_implementation=implementation)
        with torch.no_grad():
            assert_close_on_valid(inputs, main_output(reloaded.eval()(**inputs)), expected)


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_eager_and_sdpa_agree_with_nonzero_lambda_and_random_negative_weights(model_type):
    model = gpam_model(model_type, attn_implementation="eager", gpam_negative_init="normal")
    randomise_gpam(sharpen_attention(model))
    inputs = model_inputs(model_type, left_padding=True)
    with torch.no_grad():
        eager = main_output(model(**inputs))
    if model_type in EAGER_ONLY:
        with pytest.raises(ValueError, match="cannot use attn_implementation='sdpa'"):
            model.set_attn_implementation("sdpa")
        return
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = main_output(model(**inputs))
    assert model.config._attn_implementation == "sdpa"
    assert_close_on_valid(inputs, sdpa, eager)
    # and λ ≠ 0 really changes the model
    stock_like = copy.deepcopy(model)
    for module in stock_like.gpam_modules():
        module.gpam_lambda.weight.data.zero_()
    with torch.no_grad():
        assert not torch.allclose(main_output(stock_like(**inputs)), sdpa, atol=1e-3)


STRATEGIES = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "beam": {"do_sample": False, "num_beams": 3},
    "sample": {"do_sample": True, "top_k": 20, "temperature": 0.9},
}


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_cache_and_no_cache_generate_the_same_tokens(model_type):
    # the fused backend where the family has it (the eager one is checked against it above)
    implementation = backends(model_type)[-1]
    model = randomise_gpam(sharpen_attention(gpam_model(model_type, attn_implementation=implementation)))
    inputs = model_inputs(model_type, left_padding=True)
    for strategy, options in STRATEGIES.items():
        tokens = {}
        for use_cache in (True, False):
            torch.manual_seed(123)
            with torch.no_grad():
                tokens[use_cache] = model.generate(
                    **inputs, max_new_tokens=6, min_new_tokens=6, use_cache=use_cache,
                    pad_token_id=model.config.pad_token_id, **options,
                )
        assert tokens[True].shape[1] == inputs["input_ids"].shape[1] + 6, strategy
        torch.testing.assert_close(tokens[True], tokens[False], atol=0, rtol=0, msg=strategy)


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_lora_on_the_negative_projection_takes_part_in_the_forward(model_type):
    model = randomise_gpam(sharpen_attention(gpam_model(model_type, attn_implementation=backends(model_type)[-1])))
    inputs = model_inputs(model_type)
    with torch.no_grad():
        base = main_output(model(**inputs)).clone()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["gpam_q_neg"], init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    assert sum("gpam_q_neg.lora_A" in n for n, _ in peft_model.named_parameters()) == 2
    with torch.no_grad():
        adapted = main_output(peft_model(**inputs))
        with peft_model.disable_adapter():
            disabled = main_output(peft_model(**inputs))
    torch.testing.assert_close(disabled, base, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(adapted, base, atol=1e-4)


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model_type):
    config = without_dropout(tiny_gpam_config(model_type, gpam_lambda_init=0.5))
    model = gpam_head_class(model_type)(config).train()
    inputs = model_inputs(model_type)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def loss_and_grads():
        model.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    torch.testing.assert_close(checkpointed_loss, loss)
    assert checkpointed_grads.keys() == grads.keys()
    assert any("gpam_lambda" in n for n in grads) and any("gpam_q_neg" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_new_model_from_config_and_stock_checkpoint_loading(tmp_path, model_type):
    architecture = hf_gpam.ARCHITECTURES[model_type]
    config = tiny_gpam_config(model_type)
    assert type(config) is architecture.config_class and config.model_type == f"gpam_{model_type}"
    # new model: every class of the row, through the Auto classes too; λ = 0.5 and W⁻ = −I by default
    for auto_class, gpam_class in architecture.auto_classes.items():
        model = auto_class.from_config(config)
        assert type(model) is gpam_class and len(model.gpam_modules()) == 2
        for module in model.gpam_modules():
            torch.testing.assert_close(module.gpam_q_neg.weight, -torch.eye(module.head_dim))
            heads = config.num_attention_heads
            torch.testing.assert_close(module.gpam_lambda.weight, torch.full((heads,), 0.5))
            # grouped-query heads: one W⁻ for all query heads, λ per query head
            assert module.gpam_q_neg.weight.shape == (8, 8)
    with torch.no_grad():
        assert torch.isfinite(main_output(model.eval()(**model_inputs(model_type)))).all()

    # a stock checkpoint loaded into the GPAM class: exactly the gpam_* keys are new, the rest loads unchanged
    stock = stock_model(model_type, attn_implementation=backends(model_type)[-1])
    stock.save_pretrained(tmp_path)
    model, info = gpam_head_class(model_type).from_pretrained(tmp_path, output_loading_info=True, gpam_lambda_init=0.25)
    gpam_keys = {name for name in model.state_dict() if ".gpam_" in name}
    assert gpam_keys and set(info["missing_keys"]) == gpam_keys
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    for module in model.gpam_modules():
        torch.testing.assert_close(module.gpam_lambda.weight, torch.full((config.num_attention_heads,), 0.25))
    stock_state = stock.state_dict()
    for name, tensor in model.state_dict().items():
        if name in stock_state:
            torch.testing.assert_close(tensor, stock_state[name], atol=0, rtol=0, msg=name)


# the tests above run for every family; tests/test_architectures.py checks that they do
FAMILY_CONTRACT_TESTS = [
    test_patched_with_zero_lambda_gives_stock_outputs_on_both_backends_and_after_reload,
    test_eager_and_sdpa_agree_with_nonzero_lambda_and_random_negative_weights,
    test_cache_and_no_cache_generate_the_same_tokens,
    test_lora_on_the_negative_projection_takes_part_in_the_forward,
    test_gradient_checkpointing_gives_the_same_loss_and_gradients,
    test_new_model_from_config_and_stock_checkpoint_loading,
]


def test_new_llama_from_its_config_class():
    config = hf_gpam.GpamLlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=96, gpam_lambda_init=0.3, gpam_layers=[1],
    )
    model = hf_gpam.GpamLlamaForCausalLM(config)
    assert config.model_type == "gpam_llama" and model.config._attn_implementation == "sdpa"
    (module,) = model.gpam_modules()
    assert module.layer_idx == 1
    ids = torch.randint(0, 96, (2, 7))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert module.gpam_lambda.weight.grad.abs().sum() > 0


# --- shipped remote code: one subprocess loads every family ---------------------------------------------------

REMOTE_LOAD_SCRIPT = HIDE_HF_GPAM_PRELUDE + """
import json
import os

import torch
import transformers

root, output_path = sys.argv[1:]
try:
    import hf_gpam  # noqa: F401
    sys.exit("hf_gpam is importable, the test would prove nothing")
except ImportError:
    pass
results = {}
for model_type in sorted(os.listdir(root)):
    folder = os.path.join(root, model_type)
    inputs = {k: torch.tensor(v) for k, v in json.load(open(os.path.join(folder, "inputs.json"))).items()}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=model.config.pad_token_id)
    results[model_type] = {
        "module": type(model).__module__, "class": type(model).__name__, "base_class": type(base).__name__,
        "logits": logits.tolist(), "generated": generated.tolist(),
    }
json.dump(results, open(output_path, "w"))
"""


def test_checkpoints_of_every_family_load_with_trust_remote_code_without_hf_gpam(tmp_path):
    root = tmp_path / "checkpoints"
    expected = {}
    for model_type in DECODER_TYPES:
        model = randomise_gpam(sharpen_attention(gpam_model(model_type, attn_implementation=backends(model_type)[-1])))
        folder = root / model_type
        model.save_pretrained(folder)
        # the shipped code: the one generated modeling file and its siblings, and an auto_map into it
        shipped = {p.name for p in folder.glob("*.py")}
        assert {"modeling_gpam_decoders.py", "configuration_gpam_decoders.py"} <= shipped
        config = json.loads((folder / "config.json").read_text())
        architecture = hf_gpam.ARCHITECTURES[model_type]
        assert config["auto_map"] == {
            "AutoConfig": f"configuration_gpam_decoders.{type(model.config).__name__}",
            **{
                auto.__name__: f"modeling_gpam_decoders.{cls.__name__}"
                for auto, cls in architecture.auto_classes.items()
            },
        }
        inputs = model_inputs(model_type, left_padding=True)
        (folder / "inputs.json").write_text(json.dumps({k: v.tolist() for k, v in inputs.items()}))
        with torch.no_grad():
            logits = main_output(model(**inputs))
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=model.config.pad_token_id)
        expected[model_type] = (model, logits, generated)

    output_path = tmp_path / "outputs.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD_SCRIPT, str(root), str(output_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(output_path.read_text())
    assert set(loaded) == set(DECODER_TYPES)
    for model_type, (model, logits, generated) in expected.items():
        got = loaded[model_type]
        assert got["module"].startswith("transformers_modules.") and got["class"] == type(model).__name__
        assert got["base_class"] == list(hf_gpam.ARCHITECTURES[model_type].model_classes.values())[0].__name__
        torch.testing.assert_close(torch.tensor(got["logits"]), logits, atol=1e-5, rtol=1e-5, msg=model_type)
        assert got["generated"] == generated.tolist(), model_type


# --- torch.compile ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_traced_training_step_has_no_graph_break(model_type):
    # aot_eager traces forward and backward with fullgraph=True (any graph break raises) without code generation
    torch._dynamo.reset()
    config = without_dropout(tiny_gpam_config(model_type, gpam_lambda_init=0.3))
    ids = torch.randint(3, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    losses, grads = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = gpam_head_class(model_type)(config).train()

        def loss_of(input_ids):
            return model(input_ids=input_ids, labels=input_ids).loss

        step = torch.compile(loss_of, fullgraph=True, backend="aot_eager") if compiled else loss_of
        loss = step(ids)
        loss.backward()
        losses[compiled] = loss.detach()
        grads[compiled] = {n: p.grad for n, p in model.named_parameters() if "gpam_" in n}
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-5)
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --- family features: sliding windows, soft-capping -------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "sliding_layers"), [("mistral", [0, 1]), ("gemma3_text", [0])])
def test_sliding_window_masks_both_maps(model_type, sliding_layers):
    model = sharpen_attention(gpam_model(model_type, attn_implementation="eager", gpam_lambda_init=0.8))
    inputs = model_inputs(model_type)
    with torch.no_grad():
        maps = model(**inputs, output_attentions=True).attentions
    length = inputs["input_ids"].shape[1]
    query, key = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    outside = key <= query - model.config.sliding_window
    assert outside.any()
    for layer, p_gpam in enumerate(maps):
        # P_G = (1+λ)P⁺ − λP⁻ is exactly 0 outside the window only if both maps are masked alike
        assert (p_gpam[..., outside] == 0).all() == (layer in sliding_layers), layer
        assert (p_gpam < 0).any()


def test_gemma2_soft_capping_runs_on_eager_only_and_sdpa_is_refused(tmp_path):
    config = tiny_gpam_config("gemma2", gpam_lambda_init=0.5)
    assert config.attn_logit_softcapping == 50.0
    model = hf_gpam.GpamGemma2ForCausalLM(config)
    # the default backend of a soft-capped model is eager, as in stock transformers
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="cannot use attn_implementation='sdpa'.*soft-capping"):
        model.set_attn_implementation("sdpa")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        hf_gpam.GpamGemma2ForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert hf_gpam.GpamGemma2ForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "eager"
    # soft-capping changes the eager daGPAM outputs (it is applied, not ignored)
    sharpen_attention(model.eval(), std=2.0)
    inputs = model_inputs("gemma2")
    uncapped = copy.deepcopy(model)
    for module in uncapped.gpam_modules():
        module.attn_logit_softcapping = None
    with torch.no_grad():
        assert not torch.allclose(main_output(model(**inputs)), main_output(uncapped(**inputs)), atol=1e-4)


# --- families outside the table ---------------------------------------------------------------------------------


def tiny_starcoder2():
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    config = Starcoder2Config(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=96, sliding_window=4, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    return Starcoder2ForCausalLM(config).eval()


def test_a_family_outside_the_table_is_refused_without_opt_in():
    model = tiny_starcoder2()
    supported = ", ".join(hf_gpam.ARCHITECTURES)
    with pytest.raises(ValueError, match=f"'starcoder2' is not supported \\(supported: {supported}\\).*allow_untested"):
        hf_gpam.patch_model(model)
    assert type(model).__name__ == "Starcoder2ForCausalLM" and not any("gpam" in n for n in model.state_dict())


def test_allow_untested_patches_a_family_whose_attention_uses_the_interface():
    model = tiny_starcoder2()
    inputs = model_inputs("llama", left_padding=True)
    with torch.no_grad():
        expected = model(**inputs).logits
    patched = hf_gpam.patch_model(model, allow_untested=True, gpam_negative_init="normal")
    assert type(patched).__name__ == "GpamStarcoder2ForCausalLM" and patched.config.model_type == "gpam_starcoder2"
    assert hf_gpam.is_gpam_model(patched) and hf_gpam.patch_model(patched) is patched
    modules = patched.gpam_modules()
    assert len(modules) == 2 and all(m.gpam_lambda.weight.shape == (4,) for m in modules)
    # the relative RoPE reading assumes the rotate-half layout of the table's families: not assumed here
    assert patched.config.gpam_rope_variant == "literal"
    with torch.no_grad():
        assert_close_on_valid(inputs, patched(**inputs).logits, expected)
        # λ ≠ 0 takes effect through the interface
        for module in modules:
            module.gpam_lambda.weight.fill_(0.8)
        sharpen_attention(patched)
        assert not torch.allclose(patched(**inputs).logits, expected, atol=1e-3)


def test_allow_untested_refuses_and_restores_a_model_that_fails_the_identity_check(monkeypatch):
    # a backend that does not reproduce stock attention with λ = 0, standing for a family where the interface
    # path is wrong
    model = tiny_starcoder2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stock_sdpa = AttentionInterface._global_mapping["gpam_sdpa"]

    def wrong(module, query, key, value, attention_mask, **kwargs):
        output, weights = stock_sdpa(module, query, key, value, attention_mask, **kwargs)
        return output * 1.1, weights

    monkeypatch.setitem(AttentionInterface._global_mapping, "gpam_sdpa", wrong)
    with pytest.raises(ValueError, match="does not reproduce the stock outputs.*restored"):
        hf_gpam.patch_model(model, allow_untested=True, gpam_rope_variant="relative")
    assert type(model).__name__ == "Starcoder2ForCausalLM" and model.config.model_type == "starcoder2"
    # no daGPAM hook is left on the restored modules
    assert not any(
        hook.__name__ == "hand_on_rotary_embeddings" for m in model.modules() for hook in m._forward_pre_hooks.values()
    )
    assert not any(
        hook.__name__ == "attach_rotation_coefficients" for m in model.modules() for hook in m._forward_hooks.values()
    )
    assert not any(hasattr(m, "gpam_rotation_hooked") for m in model.modules())
    assert all(type(m).__name__ != "GpamStarcoder2Attention" for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(m.config is model.config for m in model.modules() if hasattr(m, "config"))


def test_allow_untested_refuses_attention_sinks_and_models_without_interface_attention():
    from transformers import GptOssConfig, GptOssForCausalLM, MambaConfig, MambaForCausalLM

    # GPT-OSS routes through the interface but adds attention sinks, which daGPAM has no definition for
    config = GptOssConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=32, num_local_experts=2, num_experts_per_tok=1, vocab_size=96, sliding_window=4,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    model = GptOssForCausalLM(config).eval()
    with pytest.raises(ValueError, match="fails on a probe input.*attention sinks.*restored"):
        hf_gpam.patch_model(model, allow_untested=True)
    assert type(model) is GptOssForCausalLM and not any("gpam" in n for n in model.state_dict())
    # Mamba has no attention at all
    mamba = MambaForCausalLM(MambaConfig(num_hidden_layers=1, hidden_size=16, vocab_size=96, state_size=4))
    with pytest.raises(ValueError, match="no attention module that routes through transformers' attention interface"):
        hf_gpam.patch_model(mamba, allow_untested=True)


def test_tiny_configs_exercise_the_family_features():
    # partial rotary embeddings (GPT-NeoX, Phi-3), grouped-query heads, and a window shorter than the test inputs
    assert tiny_stock_config("gpt_neox").rope_parameters["partial_rotary_factor"] == 0.5
    assert tiny_stock_config("phi3").rope_parameters["partial_rotary_factor"] == 0.5
    for model_type in DECODER_TYPES:
        config = tiny_stock_config(model_type)
        assert config.num_hidden_layers == 2 and config.hidden_size == 32 and config.num_attention_heads == 4
    assert tiny_stock_config("llama").num_key_value_heads == 2
    assert tiny_stock_config("mistral").sliding_window < model_inputs("mistral")["input_ids"].shape[1]
    assert tiny_stock_config("gemma3_text").layer_types == ["sliding_attention", "full_attention"]
