"""The contract gaps transformers' own model tests and a review found in release 0.2 (issue 13): keywords stock
accepts, backend names written by transformers' own code, packed rows, Gemma3 on sdpa, signed maps on sdpa, sliding
windows that can fail, assisted decoding and continuing from ``past_key_values`` for every family."""

import copy
import json
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DataCollatorWithFlattening

import hf_gpam
from hf_gpam.modeling.gpam_interface import KEYWORD_POLICY
from hf_gpam.testing_utils import HIDE_HF_GPAM_PRELUDE

from .attention_keywords import declared_keywords, observed_keywords, recorded_keywords
from .test_decoders import EAGER_ONLY, backends, without_dropout
from .utils import (
    DECODER_TYPES, gpam_model, main_output, model_inputs, randomise_gpam, sharpen_attention, stock_model,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the causal-LM families: the ten decoder rows and GPT-2
CAUSAL_TYPES = [*DECODER_TYPES, "gpt2"]


def gpam_causal(model_type, implementation, **overrides):
    """A tiny daGPAM causal LM with sharpened q/k, random W⁻ and λ, no dropout."""
    model = gpam_model(model_type, attn_implementation=implementation, **overrides)
    without_dropout(model.config)
    return randomise_gpam(sharpen_attention(model))


# --- 1. every keyword transformers can pass has a policy, and every policy entry can arrive ----------------------


def test_every_keyword_transformers_declares_has_a_policy():
    names = declared_keywords()
    # the three, so this test cannot pass on an empty walk
    assert {"shift_labels", "seq_idx", "output_router_logits", "num_items_in_batch"} <= names
    missing = sorted(names - set(KEYWORD_POLICY))
    assert not missing, f"keywords transformers can pass to attention without a daGPAM policy: {missing}"


def test_the_keyword_record_covers_every_release_of_the_range():
    # one entry per release `make compat` verifies (scripts/compat.py refreshes them in each release's venv)
    compat = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "compat.py"))
    record = recorded_keywords()
    assert set(compat["DEFAULT_VERSIONS"]) <= set(record), sorted(set(compat["DEFAULT_VERSIONS"]) - set(record))
    # continuous batching hands its paged cache to the attention function up to 5.23 (issue 20)
    assert "cache" in record["5.23.0"]["observed"] and "cache" not in record["5.25.0"]["observed"]


@pytest.mark.parametrize("release", sorted(recorded_keywords()))
def test_every_keyword_any_release_passes_has_a_policy(release):
    entry = recorded_keywords()[release]
    # dropout and scaling are the attention functions' own parameters
    missing = sorted((set(entry["observed"]) | set(entry["declared"])) - set(KEYWORD_POLICY) - {"dropout", "scaling"})
    assert not missing, f"keywords transformers {release} passes to attention without a daGPAM policy: {missing}"


def test_every_policy_entry_reaches_the_attention_function_on_some_release():
    seen = observed_keywords()
    installed = recorded_keywords().get(transformers.__version__)
    if installed is not None:
        # the record of the installed release is what its walk observes (else: refresh it with scripts/compat.py)
        assert sorted(seen) == installed["observed"]
    seen |= {name for entry in recorded_keywords().values() for name in entry["observed"]}
    ours = {"gpam_position_embeddings"}
    unreachable = sorted(set(KEYWORD_POLICY) - seen - ours)
    assert not unreachable, f"policy entries no release's stock forward passes to attention (drop them): {unreachable}"


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_loss_keywords_stock_accepts_give_the_stock_loss_after_patching(model_type):
    implementation = backends(model_type)[-1]
    ids = torch.randint(3, 90, (2, 8))
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.2, -100)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    stock = stock_model(model_type, attn_implementation=implementation)
    keywords = dict(
        labels=labels, shift_labels=shifted, ignore_index=-100, num_items_in_batch=torch.tensor(11),
        output_router_logits=False,
    )
    with torch.no_grad():
        expected = stock(ids, **keywords).loss
        patched = hf_gpam.patch_model(stock, gpam_negative_init="normal")
        torch.testing.assert_close(patched(ids, **keywords).loss, expected)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3"])
def test_seq_idx_batches_train_after_patching_like_the_stock_model(model_type):
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    batch = collator([{"input_ids": list(range(3, 12))}, {"input_ids": list(range(20, 26))}])
    assert "seq_idx" in batch
    losses = []
    for patch in (False, True):
        torch.manual_seed(0)
        # eval mode: dropout off (the modules are built already), gradients still flow
        model = stock_model(model_type)
        if patch:
            model = hf_gpam.patch_model(model)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0])


# --- 2. backend names written by transformers' own code --------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bart"])
def test_output_attentions_on_the_config_of_an_eager_gpam_model(model_type):
    model = randomise_gpam(sharpen_attention(gpam_model(model_type, attn_implementation="eager")))
    model.config.output_attentions = True
    inputs = model_inputs(model_type)
    with torch.no_grad():
        outputs = model(**inputs)
    attentions = outputs.encoder_attentions if model_type == "bart" else outputs.attentions
    assert len(attentions) == 2 and (attentions[0] < 0).any(), "the signed maps P_G"
    # on sdpa, transformers' own refusal (the config holds the stock name)
    sdpa = gpam_model(model_type, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="output_attentions.*not supported.*sdpa"):
        sdpa.config.output_attentions = True


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral"])
def test_writing_a_stock_backend_name_into_the_config_keeps_dagpam(model_type):
    # what AttentionMaskVisualizer does: config._attn_implementation = "eager". Release 0.2 then ran stock softmax in
    # every layer; the daGPAM modules now follow the config's stock name to the daGPAM function for it
    model = gpam_causal(model_type, "sdpa")
    inputs = model_inputs(model_type, left_padding=True)
    valid = inputs["attention_mask"].bool()
    zero = copy.deepcopy(model)
    for module in zero.gpam_modules():
        module.gpam_lambda.weight.data.zero_()
    with torch.no_grad():
        dagpam = main_output(model(**inputs))
        softmax = main_output(zero(**inputs))
        for name in ("eager", "flex_attention", "sdpa"):
            model.config._attn_implementation = name
            assert {m.config._attn_implementation for m in model.gpam_modules()} == {f"gpam_{name}"}
            got = main_output(model(**inputs))
            torch.testing.assert_close(got[valid], dagpam[valid], atol=1e-5, rtol=1e-5, msg=name)
    assert not torch.allclose(dagpam[valid], softmax[valid], atol=1e-3)


def test_output_attentions_on_sdpa_warns_and_points_to_eager():
    model = gpam_model("llama", attn_implementation="sdpa")
    with pytest.warns(UserWarning, match="returns no attention maps.*attn_implementation='eager'"):
        with torch.no_grad():
            model(**model_inputs("llama"), output_attentions=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(**model_inputs("llama"))


# --- 6. packed rows: separate sequences' logits, or an error where no mask separates them -----------------------


SEQUENCE_LENGTHS = (5, 9, 7)


def packed_and_separate(model, model_type):
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(3, 90, (n,), generator=generator) for n in SEQUENCE_LENGTHS]
    packed = DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in sequences])
    with torch.no_grad():
        separate = [main_output(model(s[None], use_cache=False))[0] for s in sequences]
    return packed, torch.cat(separate)


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_packed_rows_give_the_separate_sequences_logits_or_refuse(model_type):
    for implementation in backends(model_type):
        model = gpam_causal(model_type, implementation)
        packed, separate = packed_and_separate(model, model_type)
        if model_type == "opt":
            # stock OPT's masks ignore position_ids: it attends across the packed sequences (error ~0.19); daGPAM
            # refuses instead of inheriting that
            with pytest.raises(ValueError, match="position_ids restart at 0 inside a row"):
                model(**packed, use_cache=False)
            continue
        with torch.no_grad():
            logits = main_output(model(**packed, use_cache=False))[0]
        torch.testing.assert_close(logits, separate, atol=1e-5, rtol=1e-5, msg=implementation)
        # with a cache, transformers builds no packed mask; stock would attend across sequences without a word
        with pytest.raises(ValueError, match="position_ids restart at 0 inside a row"):
            model(**packed, use_cache=True)


def test_stock_opt_attends_across_packed_rows_which_is_why_dagpam_refuses():
    model = sharpen_attention(stock_model("opt"))
    packed, separate = packed_and_separate(model, "opt")
    with torch.no_grad():
        logits = main_output(model(**packed, use_cache=False))[0]
    assert (logits - separate).abs().max() > 1e-3


# --- 8. Gemma3 follows stock: its attention never soft-caps, so sdpa is fine -----------------------------------


def test_gemma3_with_softcapping_in_its_config_runs_on_sdpa_like_stock():
    inputs = model_inputs("gemma3_text", left_padding=True)
    valid = inputs["attention_mask"].bool()
    stock = {impl: stock_model("gemma3_text", attn_implementation=impl, attn_logit_softcapping=50.0)
             for impl in ("eager", "sdpa")}
    stock["sdpa"].load_state_dict(stock["eager"].state_dict())
    with torch.no_grad():
        reference = main_output(stock["eager"](**inputs))
        torch.testing.assert_close(main_output(stock["sdpa"](**inputs))[valid], reference[valid], atol=1e-5, rtol=1e-5)
        patched = hf_gpam.patch_model(stock["sdpa"])
        assert patched.config._attn_implementation == "sdpa"
        torch.testing.assert_close(main_output(patched(**inputs))[valid], reference[valid], atol=1e-5, rtol=1e-5)
    model = gpam_causal("gemma3_text", "eager", attn_logit_softcapping=50.0)
    with torch.no_grad():
        eager = main_output(model(**inputs))
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(main_output(model(**inputs))[valid], eager[valid], atol=1e-5, rtol=1e-5)


# --- 10. a sliding window that can fail, assisted decoding and past_key_values for every family ----------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_sliding_window_hides_tokens_outside_the_window_from_the_last_position(implementation):
    # window 2, two layers: the last of 9 positions sees positions 6..8 at most; token 0 cannot reach it
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 7) % 87 + 3
    for window, reaches in ((2, False), (None, True)):
        model = gpam_causal("mistral", implementation, sliding_window=window)
        with torch.no_grad():
            last = model(ids).logits[0, -1]
            last_changed = model(changed).logits[0, -1]
        moved = (last - last_changed).abs().max().item()
        assert (moved > 1e-4) == reaches, (window, moved)


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_assisted_decoding_gives_the_greedy_tokens(model_type):
    implementation = backends(model_type)[-1]
    model = gpam_causal(model_type, implementation)
    torch.manual_seed(7)
    assistant = gpam_causal(model_type, implementation)
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(2))
    options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=model.config.pad_token_id)
    with torch.no_grad():
        greedy = model.generate(ids, **options)
        assisted = model.generate(ids, assistant_model=assistant, **options)
    torch.testing.assert_close(assisted, greedy, atol=0, rtol=0)
    assert model.config._attn_implementation == implementation


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_continuing_from_past_key_values_gives_the_full_forward(model_type):
    implementation = backends(model_type)[-1]
    model = gpam_causal(model_type, implementation)
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(4))
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=model.config.pad_token_id)
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :6], use_cache=True)
        continued = model(ids[:, 6:], past_key_values=prefix.past_key_values).logits
        torch.testing.assert_close(continued, full[:, 6:], atol=1e-5, rtol=1e-5)
        # generate() picking up a cache that holds the first 6 tokens
        expected = model.generate(ids, **options)
        cache = model(ids[:, :6], use_cache=True).past_key_values
        resumed = model.generate(ids, past_key_values=cache, **options)
    torch.testing.assert_close(resumed, expected, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", sorted(EAGER_ONLY))
def test_eager_only_families_are_listed_for_a_reason(model_type):
    # Gemma2's stock attention passes softcap; the set above must not grow silently
    with pytest.raises(ValueError, match="cannot use attn_implementation='sdpa'"):
        gpam_model(model_type, attn_implementation="eager").set_attn_implementation("sdpa")


# --- 4. one family per checkpoint; 5. the installed package owns the backend names -------------------------------


HIDE_ONE_FAMILY = HIDE_HF_GPAM_PRELUDE + """
class HideFamily:
    # as if the installed transformers had no OLMo2 (an older or trimmed release)
    def find_spec(self, name, path=None, target=None):
        if name.startswith("transformers.models.olmo2"):
            raise ImportError("olmo2 is hidden from this process")


sys.meta_path.insert(0, HideFamily())
import json

import torch
import transformers

folder, ids = sys.argv[1], json.loads(sys.argv[2])
try:
    transformers.Olmo2Config
    sys.exit("OLMo2 is importable, the test would prove nothing")
except (ImportError, AttributeError):
    pass
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    print(json.dumps(model(torch.tensor(ids)).logits.tolist()))
"""


def test_a_checkpoint_needs_only_its_own_family_in_transformers(tmp_path):
    model = gpam_causal("llama", "sdpa")
    model.save_pretrained(tmp_path / "llama")
    ids = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", HIDE_ONE_FAMILY, str(tmp_path / "llama"), json.dumps(ids.tolist())],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(torch.tensor(json.loads(result.stdout.splitlines()[-1])), expected, atol=1e-5, rtol=1e-5)


IMPORT_ORDER = """
import json
import sys

import transformers
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

folder, order = sys.argv[1:]
if order == "package first":
    import hf_gpam
# the checkpoint's shipped copy, imported explicitly: with hf_gpam imported first the Auto classes would pick the
# package's own class and never import the copy
from transformers.dynamic_module_utils import get_class_from_dynamic_module

remote_class = get_class_from_dynamic_module("modeling_gpam_gpt2.GpamGPT2LMHeadModel", folder)
remote = remote_class.from_pretrained(folder)
if order == "checkpoint first":
    import hf_gpam
from hf_gpam.modeling import gpam_interface

owners = {name: ALL_ATTENTION_FUNCTIONS[name].__module__ for name in ("gpam_eager", "gpam_sdpa")}
package = {"gpam_eager": gpam_interface.gpam_eager_attention_forward, "gpam_sdpa": gpam_interface.gpam_sdpa_attention_forward}
print(json.dumps({
    "remote_module": type(remote).__module__,
    "owners": owners,
    "package_owns": all(ALL_ATTENTION_FUNCTIONS[n] is f for n, f in package.items()),
    "masks_registered": all(n in ALL_MASK_ATTENTION_FUNCTIONS for n in package),
}))
"""


@pytest.mark.parametrize("order", ["checkpoint first", "package first"])
def test_the_installed_package_owns_the_backends_whatever_the_import_order(tmp_path, order):
    gpam_model("gpt2").save_pretrained(tmp_path / "checkpoint")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ORDER, str(tmp_path / "checkpoint"), order],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["remote_module"].startswith("transformers_modules."), report
    assert report["package_owns"], report
    assert set(report["owners"].values()) == {"hf_gpam.modeling.gpam_interface"}, report
    assert report["masks_registered"]


@pytest.mark.parametrize("model_type", ["bart", "marian"])
def test_encoder_decoders_assisted_decoding_and_past_key_values(model_type):
    # the two remaining families of the table: assisted decoding gives the greedy tokens, and a decoder continuing
    # from a cache (self- and cross-attention entries) gives the full forward's logits
    model = gpam_causal(model_type, "sdpa")
    torch.manual_seed(7)
    assistant = gpam_causal(model_type, "sdpa")
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 90, (1, 7), generator=generator)
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=model.config.pad_token_id)
    with torch.no_grad():
        greedy = model.generate(ids, **options)
        assisted = model.generate(ids, assistant_model=assistant, **options)
    torch.testing.assert_close(assisted, greedy, atol=0, rtol=0)
    decoder_ids = torch.randint(3, 90, (1, 8), generator=generator)
    with torch.no_grad():
        full = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
        prefix = model(input_ids=ids, decoder_input_ids=decoder_ids[:, :5], use_cache=True)
        continued = model(
            encoder_outputs=(prefix.encoder_last_hidden_state,), decoder_input_ids=decoder_ids[:, 5:],
            past_key_values=prefix.past_key_values,
        ).logits
    torch.testing.assert_close(continued, full[:, 5:], atol=1e-5, rtol=1e-5)
