"""daGPAM on the GPU attention backends: equality, a training step and decode speed against stock, in one run.

    python benchmarks/gpu_check.py                       # cuda, bfloat16, every backend that loads here
    python benchmarks/gpu_check.py --backends sdpa flex_attention flash_attention_2 kernels-community/flash-attn3
    python benchmarks/gpu_check.py --device cpu --dtype float32   # a dry run of the script itself (no flash there)

For a Llama-shaped daGPAM model (GQA 32/8 heads of 128, random weights, λ ≠ 0 and a random W⁻) each backend is
checked for
  1. equality: logits of a padded batch against the eager daGPAM model in float32 (relative error, bf16 tolerance),
     and the backend name the stock function reads through the dual-attention wrapper is the stock one;
  2. a training step: loss.backward() runs, and λ, W⁻, W_Q get finite, non-zero gradients;
  3. decode speed: greedy decoding with the KV cache, daGPAM against the stock model on the same backend, interleaved
     repetitions, median ratio.
A backend that cannot load here (flash-attn not installed, no kernels package, no GPU) is reported as such, never
skipped silently. The table goes to stdout and, with --output, to a JSON file with the machine and versions. This is
not part of the test suite: the CPU-side equivalents are tests/test_backends.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import hf_gpam


DEFAULT_BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
                    "kernels-community/flash-attn3")
# relative error of the logits against float32 eager that each dtype is allowed (bf16 keeps 8 bits of mantissa)
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def llama_config(args) -> LlamaConfig:
    return LlamaConfig(
        num_hidden_layers=args.layers, hidden_size=args.heads * args.head_dim, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, intermediate_size=2 * args.heads * args.head_dim,
        vocab_size=1000, max_position_embeddings=4096, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def randomise(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.gpam_modules():
            weight = module.gpam_q_neg.weight
            weight.copy_((torch.randn(weight.shape, generator=generator) * 0.3).to(weight))
            module.gpam_lambda.weight.copy_(torch.rand(module.gpam_lambda.weight.shape, generator=generator) + 0.3)
    return model


def padded_batch(args, device):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (args.batch, args.prompt), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, : args.prompt // 2] = 0
    return ids.to(device), mask.to(device)


def load_on(model, backend: str):
    """``model`` switched to ``backend``, or the reason it cannot run here."""
    try:
        model.set_attn_implementation(backend)
    except Exception as error:  # flash-attn missing, no kernels package, no GPU: reported, not hidden
        return f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return None


def names_seen_by_the_stock_function(model, backend: str, ids, mask) -> list[str] | None:
    """The backend names the stock attention function of ``backend`` read off the modules it was handed in one forward.

    Through the dual-attention wrapper it must read the stock name: flash attention and Hub kernels load their kernel
    by that name (``lazy_import_flash_attention``), and a daGPAM name there fails to load. None for a backend with no
    registered stock function; empty where daGPAM never calls it (eager and sdpa have daGPAM functions of their own).
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    if backend not in mapping:
        return None
    stock_function, seen = mapping[backend], set()

    def recording(module, *args, **kwargs):
        seen.add(module.config._attn_implementation)
        return stock_function(module, *args, **kwargs)

    mapping[backend] = recording
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        mapping[backend] = stock_function
    return sorted(seen)


def check_backend(backend, stock, gpam, reference, args, device, dtype) -> dict:
    row = {"backend": backend}
    for model in (stock, gpam):
        reason = load_on(model, backend)
        if reason is not None:
            return {**row, "status": f"not run: {reason}"}
    ids, mask = padded_batch(args, device)
    with torch.no_grad():
        logits = gpam(input_ids=ids, attention_mask=mask).logits.float()
    valid = mask.bool()
    error = ((logits - reference)[valid].norm() / reference[valid].norm()).item()
    row["relative_error"] = error
    row["equal"] = error <= TOLERANCE[dtype]
    row["stock_names"] = names_seen_by_the_stock_function(gpam, backend, ids, mask)
    # a training step through the backend
    gpam.train()
    try:
        gpam.zero_grad()
        loss = gpam(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        module = gpam.gpam_modules()[0]
        grads = {
            "lambda": module.gpam_lambda.weight.grad, "w_neg": module.gpam_q_neg.weight.grad,
            "w_q": module.q_proj.weight.grad,
        }
        row["train_step"] = all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    except Exception as error:
        row["train_step"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    gpam.eval()
    # decode speed, stock and daGPAM interleaved
    times = {"stock": [], "gpam": []}
    for repetition in range(args.repetitions + 1):
        for name, model in (("stock", stock), ("gpam", gpam)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repetition:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    row["decode_ms_stock"] = 1e3 * statistics.median(times["stock"])
    row["decode_ms_gpam"] = 1e3 * statistics.median(times["gpam"])
    row["decode_ratio"] = statistics.median(g / s for g, s in zip(times["gpam"], times["stock"]))
    stock_name_ok = row["stock_names"] is None or set(row["stock_names"]) <= {backend}
    row["status"] = "ok" if row["equal"] and row["train_step"] is True and stock_name_ok else "FAILED"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--backends", nargs="+", default=list(DEFAULT_BACKENDS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None, help="write the rows and the machine to this JSON file")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    stock = LlamaForCausalLM(llama_config(args)).eval()
    gpam = randomise(hf_gpam.patch_model(copy.deepcopy(stock)))
    # the reference: eager daGPAM in float32, on the same device
    reference_model = copy.deepcopy(gpam).to(device)
    reference_model.set_attn_implementation("eager")
    ids, mask = padded_batch(args, device)
    with torch.no_grad():
        reference = reference_model(input_ids=ids, attention_mask=mask).logits.float()
    del reference_model
    stock, gpam = stock.to(device=device, dtype=dtype), gpam.to(device=device, dtype=dtype)
    rows = [check_backend(backend, stock, gpam, reference, args, device, dtype) for backend in args.backends]
    print(f"{'backend':<32} {'status':<8} {'rel.err':>9} {'train':>6} {'decode ms stock':>16} {'daGPAM':>8} {'ratio':>6}")
    for row in rows:
        if "relative_error" not in row:
            print(f"{row['backend']:<32} {row['status']}")
            continue
        print(f"{row['backend']:<32} {row['status']:<8} {row['relative_error']:>9.2e} {str(row['train_step'])[:6]:>6} "
              f"{row['decode_ms_stock']:>16.1f} {row['decode_ms_gpam']:>8.1f} {row['decode_ratio']:>6.3f}")
    if args.output is not None:
        machine = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "transformers": transformers.__version__, "dtype": args.dtype,
            "command": " ".join(sys.argv),
        }
        args.output.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0 if all(row["status"] in ("ok",) or row["status"].startswith("not run") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
