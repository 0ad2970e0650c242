"""Where Q⁻ meets RoPE: a tiny Llama trained from scratch with each ``gpam_rope_variant`` and with softmax.

daGPAM's negative query is Q⁻ = ReLU(Q⁺)W⁻. In a RoPE model the query entering the softmax is already rotated,
Q⁺ = RoPE(Q̃), which gives two readings (``docs/rope.md``):

    literal   Q⁻ = ReLU(RoPE(Q̃))W⁻        the spec read literally; P⁻ also depends on absolute positions
    relative  Q⁻ = RoPE(ReLU(Q̃)W⁻)        rotated with the same positions; P⁻ depends on i − j only, like P⁺
    softmax   gpam_mode="softmax"          stock Llama attention, the baseline

Each variant trains the same Llama (default: 4 layers, hidden 128, 4 query heads sharing 2 K/V heads, blocks of 128
tokens) on the same token stream, for the same steps and seeds: the standard library's docstrings
(``hf_gpam.data.stdlib_docstring_corpus``, every tenth paragraph held out for validation) with a byte-level BPE
trained on the training paragraphs (``hf_gpam.data.train_byte_level_bpe``). The optimiser is AdamW with the
project's weight-decay rule (``hf_gpam.training.gpam_optimizer_groups``: λ never decays, W⁻ only with
--gpam_weight_decay), linear warmup then cosine decay. Validation loss (mean token cross-entropy over a fixed set
of held-out blocks) is recorded at every --eval_every steps, and once more at the end with every position id shifted
by --shifted_eval_offset (the same text further into a document); the table gives mean ± std over seeds.

Usage:

    python benchmarks/rope_study.py                         # 3 variants x 3 seeds x 300 steps, ~15 min on 2 cores
    python benchmarks/rope_study.py --steps 50 --seeds 0    # a smoke run

Results go to --output (JSON with every run, the command and the machine) and the table is printed. Nothing here
is part of the test run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

from hf_gpam import GpamLlamaConfig, GpamLlamaForCausalLM  # noqa: E402
from hf_gpam.data import stdlib_docstring_corpus, train_byte_level_bpe  # noqa: E402
from hf_gpam.training import gpam_optimizer_groups  # noqa: E402


VARIANTS = {
    "softmax": dict(gpam_mode="softmax"),
    "literal": dict(gpam_mode="dagpam", gpam_rope_variant="literal"),
    "relative": dict(gpam_mode="dagpam", gpam_rope_variant="relative"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=2000)
    parser.add_argument("--corpus_chars", type=int, default=1_500_000, help="characters of docstrings to gather")
    parser.add_argument("--eval_blocks", type=int, default=64, help="held-out blocks in the validation loss")
    parser.add_argument(
        "--shifted_eval_offset", type=int, default=1000,
        help="after training, the validation loss again with every position id shifted by this much (0: skip)",
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup_steps", type=int, default=30)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--gpam_weight_decay", action="store_true", help="decay W⁻ too (λ never decays)")
    parser.add_argument("--lambda_init", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--output", default=os.path.join("benchmarks", "results", "rope_study.json"))
    return parser.parse_args(argv)


def token_streams(args) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train ids, validation ids, eos id): every tenth paragraph held out, documents joined by the eos token."""
    paragraphs = stdlib_docstring_corpus(max_chars=args.corpus_chars)
    train_text = [p for i, p in enumerate(paragraphs) if i % 10]
    valid_text = [p for i, p in enumerate(paragraphs) if i % 10 == 0]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = train_byte_level_bpe(train_text, vocab_size=args.vocab_size, save_directory=folder)
    eos = tokenizer.eos_token_id

    def stream(texts):
        ids = []
        for encoded in tokenizer(texts)["input_ids"]:
            ids.extend(encoded + [eos])
        return torch.tensor(ids, dtype=torch.long)

    return stream(train_text), stream(valid_text), eos, len(tokenizer)


def build_model(args, variant: str, vocab_size: int, eos: int) -> GpamLlamaForCausalLM:
    config = GpamLlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.block_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        tie_word_embeddings=True, gpam_lambda_init=args.lambda_init, **VARIANTS[variant],
    )
    return GpamLlamaForCausalLM(config)


def learning_rate(step: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def validation_loss(model, blocks: torch.Tensor, batch_size: int, offset: int = 0) -> float:
    """Mean token cross-entropy over ``blocks``, with position ids ``offset, offset + 1, ...``."""
    model.eval()
    positions = torch.arange(offset, offset + blocks.shape[1])[None]
    losses = [
        model(input_ids=batch, labels=batch, position_ids=positions.expand_as(batch)).loss.item()
        for batch in blocks.split(batch_size)
    ]
    model.train()
    return statistics.fmean(losses)


def train_one(args, variant: str, seed: int, train_ids, valid_blocks, vocab_size: int, eos: int) -> dict:
    torch.manual_seed(seed)
    model = build_model(args, variant, vocab_size, eos).train()
    optimizer = torch.optim.AdamW(
        gpam_optimizer_groups(model, args.weight_decay, args.gpam_weight_decay), lr=args.lr, betas=(0.9, 0.95)
    )
    # the batch order depends on the seed only, so every variant sees the same blocks in the same order
    batches = torch.Generator().manual_seed(1000 + seed)
    starts_limit = len(train_ids) - args.block_size
    curve, start = {}, time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        starts = torch.randint(0, starts_limit, (args.batch_size,), generator=batches)
        batch = torch.stack([train_ids[s : s + args.block_size] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve[step + 1] = validation_loss(model, valid_blocks, args.batch_size)
    lambdas = [m.gpam_lambda.weight.detach().mean().item() for m in model.gpam_modules()]
    # the same text at other positions: a model whose attention depends on i - j only scores it the same
    shifted = validation_loss(model, valid_blocks, args.batch_size, args.shifted_eval_offset) if args.shifted_eval_offset else None
    return {
        "variant": variant, "seed": seed, "valid_loss": curve, "shifted_valid_loss": shifted,
        "final_train_loss": loss.item(),
        "mean_lambda": statistics.fmean(lambdas) if lambdas else None,
        "parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start,
    }


def table(runs: list[dict], variants: list[str]) -> str:
    """Markdown: validation loss at each evaluated step, mean ± std over seeds, per variant."""
    steps = sorted({int(s) for run in runs for s in run["valid_loss"]})
    lines = [
        "| variant | seeds | " + " | ".join(f"val loss @ {s}" for s in steps)
        + " | val loss @ end, positions shifted | mean λ at the end |",
        "|---|---|" + "---|" * len(steps) + "---|---|",
    ]

    def mean_std(values):
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.4f} ± {spread:.4f}"

    for variant in variants:
        mine = [run for run in runs if run["variant"] == variant]
        if not mine:
            continue
        cells = []
        for step in steps:
            cells.append(mean_std([run["valid_loss"][step] for run in mine if step in run["valid_loss"]]))
        shifted = [run["shifted_valid_loss"] for run in mine if run.get("shifted_valid_loss") is not None]
        cells.append(mean_std(shifted) if shifted else "–")
        lambdas = [run["mean_lambda"] for run in mine if run["mean_lambda"] is not None]
        lam = f"{statistics.fmean(lambdas):.3f}" if lambdas else "–"
        lines.append(f"| {variant} | {len(mine)} | " + " | ".join(cells) + f" | {lam} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train_ids, valid_ids, eos, vocab_size = token_streams(args)
    # a fixed set of non-overlapping held-out blocks, the same for every run
    usable = (len(valid_ids) // args.block_size) * args.block_size
    valid_blocks = valid_ids[:usable].view(-1, args.block_size)[: args.eval_blocks]
    print(
        f"train tokens {len(train_ids)}, validation blocks {len(valid_blocks)} x {args.block_size}, vocab {vocab_size}",
        flush=True,
    )
    runs = []
    for seed in args.seeds:
        for variant in args.variants:
            run = train_one(args, variant, seed, train_ids, valid_blocks, vocab_size, eos)
            runs.append(run)
            curve = ", ".join(f"{s}: {v:.4f}" for s, v in run["valid_loss"].items())
            print(f"{variant:>8} seed {seed}: {curve} ({run['seconds']:.0f} s)", flush=True)
    result = {
        "command": " ".join(["python", "benchmarks/rope_study.py", *(sys.argv[1:] if argv is None else argv)]),
        "args": vars(args),
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
        },
        "train_tokens": len(train_ids),
        "runs": runs,
    }
    print(table(runs, args.variants))
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"saved {args.output}")
    return result


if __name__ == "__main__":
    main()
