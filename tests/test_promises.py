"""Promises a careful reviewer checked (issue 10): λ stays float32 on every dtype route, generative heads list
GenerationMixin, an encoder / decoder saved alone cannot silently drop daGPAM weights, and patch_model refuses
weights it cannot place parameters next to."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, GenerationMixin
from transformers.models.bart.modeling_bart import BartEncoder

import hf_gpam
from hf_gpam.testing_utils import HIDE_HF_GPAM_PRELUDE

from .utils import MODEL_TYPES, gpam_head_class, gpam_model, main_output, model_inputs, stock_model


def lambda_dtypes(model):
    return {m.gpam_lambda.weight.dtype for m in model.gpam_modules()}


ROUTES = {
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "to(float16)": lambda m: m.to(torch.float16),
    "half()": lambda m: m.half(),
    "bfloat16()": lambda m: m.bfloat16(),
    "to(dtype=, device=)": lambda m: m.to(dtype=torch.bfloat16, device="cpu"),
}


@pytest.mark.parametrize("trainable", [True, False], ids=["trainable", "fixed"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_lambda_stays_float32_through_module_casts(route, trainable):
    model = gpam_model("gpt2", gpam_lambda_init=0.3, gpam_lambda_trainable=trainable)
    model = ROUTES[route](model)
    assert lambda_dtypes(model) == {torch.float32}
    # the rest of the model was cast, W⁻ included
    module = model.gpam_modules()[0]
    assert module.gpam_q_neg.weight.dtype in (torch.bfloat16, torch.float16)
    torch.testing.assert_close(module.gpam_lambda.weight, torch.full((4,), 0.3))
    # λ is not rounded through half precision: a value half precision cannot hold survives
    with torch.no_grad():
        module.gpam_lambda.weight.fill_(0.3000001)
    model.half()
    assert module.gpam_lambda.weight[0].item() == torch.tensor(0.3000001).item()
    with torch.no_grad():
        assert torch.isfinite(main_output(model(**model_inputs("gpt2")))).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_lambda_stays_float32_when_loaded_in_half_precision(tmp_path, model_type, dtype):
    gpam_model(model_type, gpam_lambda_init=0.3000001).save_pretrained(tmp_path)
    model = gpam_head_class(model_type).from_pretrained(tmp_path, dtype=dtype)
    assert lambda_dtypes(model) == {torch.float32}
    assert {m.gpam_q_neg.weight.dtype for m in model.gpam_modules()} == {dtype}
    assert model.gpam_modules()[0].gpam_lambda.weight[0].item() == torch.tensor(0.3000001).item()


def test_generative_heads_list_generation_mixin_among_their_own_bases():
    for architecture in hf_gpam.ARCHITECTURES.values():
        for stock_class, gpam_class in architecture.model_classes.items():
            if issubclass(stock_class, GenerationMixin):
                assert GenerationMixin in gpam_class.__bases__, gpam_class


@pytest.mark.parametrize("model_type", ["bart", "marian"])
def test_encoder_or_decoder_saved_alone_refuses_instead_of_dropping_gpam_weights(tmp_path, model_type):
    for model in (gpam_model(model_type), hf_gpam.patch_model(stock_model(model_type))):
        for part in (model.get_encoder(), model.get_decoder()):
            with pytest.raises(ValueError, match="Save the whole model"):
                part.save_pretrained(tmp_path / "part")
            assert not (tmp_path / "part").exists()
        # the encoder of a softmax-mode model has no daGPAM weights to lose: it saves as usual
    softmax = gpam_model(model_type, gpam_mode="softmax")
    softmax.get_encoder().save_pretrained(tmp_path / "softmax_encoder")
    # what the message recommends works: the whole model reloads, and its encoder is the daGPAM one
    model = gpam_model(model_type, gpam_lambda_init=0.4)
    model.save_pretrained(tmp_path / "whole")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "whole")
    assert any(hasattr(m, "gpam_lambda") for m in reloaded.get_encoder().modules())


def test_encoder_guard_keeps_output_capture():
    model = hf_gpam.patch_model(stock_model("bart", attn_implementation="eager"))
    assert type(model.get_encoder()) is not BartEncoder and isinstance(model.get_encoder(), BartEncoder)
    with torch.no_grad():
        outputs = model(**model_inputs("bart"), output_attentions=True, output_hidden_states=True)
    assert len(outputs.encoder_attentions) == 2 and len(outputs.encoder_hidden_states) == 3


def test_patch_refuses_integer_weights_no_supported_quantizer_produced():
    # quantized bases of bitsandbytes and torchao are accepted (tests/test_quantization.py); integer weights the config
    # names no quantization method for are not
    model = stock_model("gpt2")
    attention = model.transformer.h[0].attn
    attention.c_attn.weight = torch.nn.Parameter(torch.zeros(32, 96, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="integers.*c_attn.weight.*torch.int8.*names no quantization method"):
        hf_gpam.patch_model(model)
    assert type(model).__name__ == "GPT2LMHeadModel" and not hasattr(attention, "gpam_q_neg")


def test_patch_refuses_weights_on_the_meta_device():
    with torch.device("meta"):
        model = stock_model("gpt2")
    with pytest.raises(ValueError, match="meta device"):
        hf_gpam.patch_model(model)
    assert type(model).__name__ == "GPT2LMHeadModel"


@pytest.mark.parametrize(
    ("version", "outcome"),
    [
        ("5.18.2", "refused"), ("5.19.0", "silent"), ("5.24.0", "silent"), ("5.25.0", "silent"),
        ("5.26.0.dev0", "warned"), ("5.31.0", "warned"), ("6.0.0", "warned"),
    ],
)
def test_version_gate_refuses_below_the_range_and_warns_above_it(monkeypatch, version, outcome):
    from hf_gpam.modeling.gpam_version import SKIP_VERSION_CHECK_ENV, check_transformers_version, transformers_requirement

    monkeypatch.delenv(SKIP_VERSION_CHECK_ENV, raising=False)
    if outcome == "silent":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_transformers_version(version)
        return
    if outcome == "warned":
        # a checkpoint frozen on the Hub must keep loading on the next release: warn, never refuse
        with pytest.warns(UserWarning, match=f"{transformers_requirement()}.*{version} is newer and not verified"):
            check_transformers_version(version)
        return
    with pytest.raises(ImportError, match=f"{transformers_requirement()}.*{version}.*pip install"):
        check_transformers_version(version)
    monkeypatch.setenv(SKIP_VERSION_CHECK_ENV, "1")
    with pytest.warns(UserWarning, match="continuing"):
        check_transformers_version(version)


def test_version_gate_refuses_a_release_known_to_be_bad(monkeypatch):
    from hf_gpam.modeling import gpam_version

    monkeypatch.setitem(gpam_version.KNOWN_BAD_RELEASES, "5.27.1", "renames the attention keywords")
    with pytest.raises(ImportError, match="does not work with transformers 5.27.1: renames the attention keywords"):
        gpam_version.check_transformers_version("5.27.1")
    with pytest.warns(UserWarning, match="not verified"):
        gpam_version.check_transformers_version("5.27.2")


# a checkpoint's shipped code imported with a faked transformers version, in a process that cannot import hf_gpam
FAKED_VERSION_LOAD = HIDE_HF_GPAM_PRELUDE + """
import warnings

import transformers

folder, version = sys.argv[1:]
transformers.__version__ = version
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    except ImportError as error:
        print("REFUSED", error)
        sys.exit(0)
print("LOADED", " | ".join(str(w.message) for w in caught if "hf_gpam" in str(w.message)))
"""


@pytest.mark.parametrize(
    ("version", "expected"),
    [("5.18.0", "REFUSED daGPAM (hf_gpam) needs"), ("5.26.0.dev0", "LOADED daGPAM"), ("5.33.1", "LOADED daGPAM")],
)
def test_shipped_modeling_code_runs_the_gate_on_import(tmp_path, version, expected):
    # the copy save_pretrained writes next to a checkpoint runs the same check, with the same outcomes
    gpam_model("llama").save_pretrained(tmp_path / "checkpoint")
    assert (tmp_path / "checkpoint" / "gpam_version.py").is_file()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("HF_GPAM_SKIP_VERSION_CHECK", None)
    result = subprocess.run(
        [sys.executable, "-c", FAKED_VERSION_LOAD, str(tmp_path / "checkpoint"), version],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(expected), result.stdout
    assert version in result.stdout
