"""vLLM offline throughput and time to first token of a daGPAM checkpoint against the same stock checkpoint.

Needs the vLLM environment (``make test-vllm`` builds ``.venv-vllm``):

    .venv-vllm/bin/python benchmarks/vllm_throughput.py                       # SmolLM2-135M-shaped random Llama
    .venv-vllm/bin/python benchmarks/vllm_throughput.py --model DIR           # a stock checkpoint folder (converted here)
    .venv-vllm/bin/python benchmarks/vllm_throughput.py --repeats 3 --output benchmarks/results/vllm_cpu.json

What is timed, per arm, each in an engine of its own (a fresh subprocess), the arms alternated over ``--repeats``
rounds (stock first in even rounds, daGPAM first in odd ones):

- ``tokens/s``: a batch of ``--prompts`` chat prompts (32), ``--max-tokens`` new tokens each (128, ``ignore_eos`` so every
  request writes them all), generated tokens over wall time of one ``LLM.generate`` call after a warm-up call;
- ``TTFT``: wall time of the same batch with one new token (the prefill of the whole batch), after the warm-up.

The arms: ``stock`` (the stock checkpoint on vLLM's own model class for its architecture), ``gpam`` (the daGPAM
checkpoint through hf_gpam's plugin: vLLM's Transformers backend with 2H-head attention layers) and ``stock-tf`` (the
stock checkpoint on vLLM's Transformers backend, ``model_impl="transformers"``), which separates what the backend costs
from what daGPAM costs. The ratio daGPAM / stock in tokens/s is the row's figure; its target is ≥ 0.93.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time


ENGINE_SCRIPT = """
import json, sys, time

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    folder, prompts, engine_args, max_tokens, out = (
        sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    llm = LLM(folder, **engine_args)
    decode = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts[:4], decode, use_tqdm=False)
    start = time.perf_counter()
    first_outputs = llm.generate(prompts, first, use_tqdm=False)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    outputs = llm.generate(prompts, decode, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    with open(out, "w") as f:
        json.dump({"tokens": tokens, "seconds": seconds, "ttft": ttft}, f)
"""

QUESTIONS = [
    "What is the capital of France?", "Explain what a hash table is.", "Write a haiku about autumn.",
    "How do I reverse a list in Python?", "What causes rain?", "Name three prime numbers.",
    "Summarise the plot of Hamlet.", "What is a transformer in machine learning?",
]


def smollm2_shaped_checkpoints(folder: str, lambda_init: float) -> tuple[str, str]:
    """A random Llama of SmolLM2-135M's shape (30 layers, d=576, GQA 9/3 heads of 64), saved stock and converted."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import hf_gpam
    from hf_gpam.data import stdlib_docstring_corpus, train_byte_level_bpe

    tokenizer = train_byte_level_bpe(stdlib_docstring_corpus(max_chars=200_000), vocab_size=2000)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    stock_dir, gpam_dir = os.path.join(folder, "stock"), os.path.join(folder, "gpam")
    model.save_pretrained(stock_dir)
    tokenizer.save_pretrained(stock_dir)
    hf_gpam.patch_model(model, gpam_lambda_init=lambda_init).save_pretrained(gpam_dir)
    tokenizer.save_pretrained(gpam_dir)
    return stock_dir, gpam_dir


def convert(stock_dir: str, folder: str, lambda_init: float) -> str:
    from hf_gpam.cli.convert import convert_checkpoint

    gpam_dir = os.path.join(folder, "gpam")
    convert_checkpoint(stock_dir, gpam_dir, gpam_lambda_init=lambda_init)
    return gpam_dir


def chat_prompts(folder: str, count: int) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    questions = [QUESTIONS[i % len(QUESTIONS)] + (f" ({i})" if i >= len(QUESTIONS) else "") for i in range(count)]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]


def run_arm(folder: str, prompts: list[str], engine_args: dict, max_tokens: int, workdir: str) -> dict:
    script = os.path.join(workdir, "engine.py")
    with open(script, "w") as handle:
        handle.write(textwrap.dedent(ENGINE_SCRIPT))
    out = os.path.join(workdir, "result.json")
    command = [sys.executable, script, folder, json.dumps(prompts), json.dumps(engine_args), str(max_tokens), out]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"engine for {folder} failed:\n{result.stderr[-4000:]}")
    with open(out) as handle:
        measured = json.load(handle)
    measured["tokens_per_s"] = measured["tokens"] / measured["seconds"]
    return measured


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a stock checkpoint folder (default: a SmolLM2-135M-shaped Llama)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lambda-init", type=float, default=0.1, help="λ of the daGPAM checkpoint (its speed does "
                        "not depend on the value)")
    parser.add_argument("--arms", nargs="+", default=["stock", "gpam", "stock-tf"], choices=["stock", "gpam", "stock-tf"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--output", default=None, help="write the measurements to this JSON file")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="hf_gpam_vllm_bench_")
    if args.model is None:
        stock_dir, gpam_dir = smollm2_shaped_checkpoints(workdir, args.lambda_init)
        model_name = "SmolLM2-135M-shaped random Llama"
    else:
        stock_dir, gpam_dir = args.model, convert(args.model, workdir, args.lambda_init)
        model_name = args.model
    prompts = chat_prompts(stock_dir, args.prompts)
    common = dict(dtype=args.dtype, gpu_memory_utilization=0.3, max_model_len=1024)
    arms = {
        "stock": (stock_dir, common),
        "gpam": (gpam_dir, common),
        "stock-tf": (stock_dir, dict(common, model_impl="transformers")),
    }
    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for round_index in range(args.repeats):
        order = args.arms if round_index % 2 == 0 else list(reversed(args.arms))
        for arm in order:
            folder, engine_args = arms[arm]
            started = time.perf_counter()
            runs[arm].append(run_arm(folder, prompts, engine_args, args.max_tokens, workdir))
            print(f"round {round_index + 1} {arm}: {runs[arm][-1]['tokens_per_s']:.1f} tokens/s, TTFT "
                  f"{runs[arm][-1]['ttft']:.2f} s ({time.perf_counter() - started:.0f} s with the engine start)",
                  flush=True)

    summary = {arm: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
                     "ttft_s": statistics.median(r["ttft"] for r in results)} for arm, results in runs.items()}
    print(f"\n{model_name}: {args.prompts} chat prompts, {args.max_tokens} new tokens, {args.dtype}, medians of "
          f"{args.repeats} alternated rounds")
    print("| arm | tokens/s | TTFT (batch prefill), s |\n|---|---:|---:|")
    for arm, values in summary.items():
        print(f"| {arm} | {values['tokens_per_s']:.1f} | {values['ttft_s']:.2f} |")
    if "stock" in summary and "gpam" in summary:
        ratio = summary["gpam"]["tokens_per_s"] / summary["stock"]["tokens_per_s"]
        pair_ratios = [g["tokens_per_s"] / s["tokens_per_s"] for g, s in zip(runs["gpam"], runs["stock"])]
        print(f"daGPAM / stock tokens/s: {ratio:.3f} (rounds: {', '.join(f'{r:.3f}' for r in pair_ratios)}; "
              "target >= 0.93)")
        summary["gpam_over_stock_tokens_per_s"] = ratio
        summary["gpam_over_stock_ttft"] = summary["gpam"]["ttft_s"] / summary["stock"]["ttft_s"]
    if "stock-tf" in summary and "gpam" in summary:
        summary["gpam_over_stock_transformers_backend_tokens_per_s"] = (
            summary["gpam"]["tokens_per_s"] / summary["stock-tf"]["tokens_per_s"]
        )
    result = {"model": model_name, "prompts": args.prompts, "max_tokens": args.max_tokens, "dtype": args.dtype,
              "repeats": args.repeats, "runs": runs, "summary": summary}
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
