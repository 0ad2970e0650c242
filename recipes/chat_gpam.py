#!/usr/bin/env python
"""Answer prompts greedily with a causal-LM folder written by the recipes (or any checkpoint ``AutoModelForCausalLM``
loads once hf_gpam is imported).

```bash
python recipes/chat_gpam.py outputs/smollm2_dagpam "What is the capital of France?" "Name a prime number."
```

An instruct model's prompts go through its tokenizer's chat template; a model without one continues the text.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# the recipes folder is on sys.path when this file runs as a script
from gpam_recipe_utils import chat_answer
import hf_gpam  # noqa: F401  (registers the GPAM classes with the Auto classes)


def answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    if getattr(tokenizer, "chat_template", None):
        return chat_answer(model, tokenizer, prompt, max_new_tokens)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Greedy answers of a causal-LM folder to one or more prompts.")
    parser.add_argument("model", help="a model folder (e.g. outputs/smollm2_dagpam) or Hub id")
    parser.add_argument("prompts", nargs="+", help="one or more prompts")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model) and os.sep in args.model:
        print(f"chat_gpam: model folder {args.model!r} does not exist", file=sys.stderr)
        return 1
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    for prompt in args.prompts:
        print(f"> {prompt}\n{answer(model, tokenizer, prompt, args.max_new_tokens)}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
