"""``hf-gpam demo``: the package end to end in a few seconds, offline.

Builds a GPAM GPT-2 from a config, patches a stock GPT-2 and checks its logits are unchanged, saves the patched
model and reloads it in a fresh process with ``trust_remote_code=True`` where ``hf_gpam`` cannot be imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import GPT2LMHeadModel

from .. import GpamGPT2LMHeadModel, patch_model
from ..testing_utils import HIDE_HF_GPAM_PRELUDE, tiny_gpam_config, tiny_stock_config


# hf_gpam is installed in this environment, so the reload process hides it: the checkpoint must stand on its own
RELOAD_SCRIPT = HIDE_HF_GPAM_PRELUDE + """
import json
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__,
                      "logits": model(ids).logits.tolist()}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default=None, help="where to save the patched model (default: a temp dir)")


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (2, 12))

    new_model = GpamGPT2LMHeadModel(tiny_gpam_config("gpt2", gpam_lambda_init=0.5)).eval()
    parameters = sum(p.numel() for p in new_model.parameters())
    print(f"1. new GpamGPT2LMHeadModel: {parameters} parameters, λ = {new_model.gpam_lambdas()['transformer.h.0.attn']}")

    stock = GPT2LMHeadModel(tiny_stock_config("gpt2")).eval()
    with torch.no_grad():
        stock_logits = stock(ids).logits
        patched = patch_model(stock)
        patched_logits = patched(ids).logits
    drift = (patched_logits - stock_logits).abs().max().item()
    print(f"2. patch_model -> {type(patched).__name__}; max |logit change| at λ=0: {drift:.2e}")

    # without --output_dir the checkpoint goes to a temporary folder that is removed when the demo ends
    with tempfile.TemporaryDirectory(prefix="hf_gpam_demo_") as scratch:
        output_dir = args.output_dir or scratch
        patched.save_pretrained(output_dir)
        kept = "" if args.output_dir else " (a temporary folder, removed at the end; --output_dir keeps one)"
        print(f"3. saved to {output_dir}{kept}: {', '.join(sorted(os.listdir(output_dir)))}")
        # the reload's copy of the modeling code goes to the temporary folder too, not to ~/.cache/huggingface/modules
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_MODULES_CACHE": os.path.join(scratch, "modules")}
        result = subprocess.run(
            [sys.executable, "-c", RELOAD_SCRIPT, os.path.abspath(output_dir), json.dumps(ids.tolist())],
            capture_output=True, text=True, env=env, cwd=scratch, check=False,
        )
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        return 1
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    reload_drift = (torch.tensor(reloaded["logits"]) - patched_logits).abs().max().item()
    print(f"4. reloaded with trust_remote_code as {reloaded['class']}; max |logit diff|: {reload_drift:.2e}")
    return 0 if drift < 1e-5 and reload_drift < 1e-5 else 1
