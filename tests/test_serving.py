"""Serving a daGPAM checkpoint over the OpenAI-compatible API (issue 14, point 3), queried with the official ``openai``
client: completions and chat, streaming and not, with and without continuous batching; the greedy text must be
``generate``'s. Opt-in (``make test-serving``: FastAPI, Uvicorn and openai come with ``hf_gpam[serving]``); every
server is started on 127.0.0.1 by the test, polled a bounded number of times, and stopped by it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_gpam
from hf_gpam.data import stdlib_docstring_corpus, train_byte_level_bpe
from hf_gpam.testing_utils import tiny_gpam_config

from .servers import complete_text, free_port, start_server, stop_server
from .utils import randomise_gpam, sharpen_attention


pytestmark = pytest.mark.serving

PROMPT = "Return the sum of"
MESSAGES = [{"role": "user", "content": "Split the string."}]
MAX_TOKENS = 8
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny daGPAM Llama (λ ≠ 0, random W⁻) with a byte-level BPE tokenizer and a chat template, and the texts
    ``generate`` gives for the prompt and the chat."""
    folder = tmp_path_factory.mktemp("served") / "gpam-llama"
    tokenizer = train_byte_level_bpe(stdlib_docstring_corpus(max_chars=200_000), vocab_size=400)
    tokenizer.chat_template = CHAT_TEMPLATE
    eos = tokenizer.eos_token_id
    config = tiny_gpam_config(
        "llama", vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, hidden_size=64,
        head_dim=16,
    )
    torch.manual_seed(0)
    model = randomise_gpam(sharpen_attention(hf_gpam.GpamLlamaForCausalLM(config).eval()))
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    def greedy(ids):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=eos)
        return complete_text(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))

    completion = greedy(tokenizer(PROMPT, return_tensors="pt")["input_ids"])
    chat_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    chat = greedy(chat_ids["input_ids"])
    # daGPAM is visible in the served text: the same model with λ = 0 writes something else
    for module in model.gpam_modules():
        module.gpam_lambda.weight.data.zero_()
    assert greedy(tokenizer(PROMPT, return_tensors="pt")["input_ids"]) != completion
    return {"folder": str(folder), "completion": completion, "chat": chat}


SERVE_OPTIONS = {
    "plain": [],
    "continuous-batching": ["--continuous-batching", "--cb-num-blocks", "32", "--cb-block-size", "16"],
}


@pytest.mark.parametrize("mode", list(SERVE_OPTIONS))
def test_served_text_is_the_greedy_text_of_generate(checkpoint, tmp_path, mode):
    port = free_port()
    command = [
        sys.executable, "-m", "hf_gpam.cli", "serve", checkpoint["folder"], "--device", "cpu",
        "--host", "127.0.0.1", "--port", str(port), *SERVE_OPTIONS[mode],
    ]
    # imported here: the default test run deselects this module's tests and need not have the serving extra
    import openai

    server = start_server(command, port, tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0)
        model = checkpoint["folder"]
        completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        assert complete_text(completion.choices[0].text) == checkpoint["completion"]
        streamed = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert complete_text("".join(chunk.choices[0].text for chunk in streamed)) == checkpoint["completion"]
        chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
        assert complete_text(chat.choices[0].message.content) == checkpoint["chat"]
        streamed_chat = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed_chat if chunk.choices)
        assert complete_text(text) == checkpoint["chat"]
    finally:
        stop_server(server)
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def test_stock_transformers_serve_cannot_load_remote_code_classes(checkpoint, tmp_path):
    # why hf-gpam serve exists: transformers serve resolves config.architectures[0] on the transformers package, which
    # no remote-code class is part of. When this test fails, transformers serve loads remote code: say so in the README
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "transformers"), "serve", checkpoint["folder"], "--trust-remote-code",
        "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "has no attribute GpamLlamaForCausalLM" in result.stderr + result.stdout
    config = json.loads((Path(checkpoint["folder"]) / "config.json").read_text())
    assert config["architectures"] == ["GpamLlamaForCausalLM"]
