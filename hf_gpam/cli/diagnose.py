"""``hf-gpam diagnose``: per-layer rank collapse, gradients and attention maps of one or more models on your text.

    hf-gpam diagnose ./softmax_run ./dagpam_run --text "The quick brown fox." --output_dir diag/

writes ``diag/diagnostics.json`` (per model, per layer, every metric of ``hf_gpam.analysis.diagnostics``), the per-layer
curves of all models on one figure per stack (``layers_decoder.png``, ``layers_encoder.png`` for BART/Marian) and
the signed attention maps of one layer and head per model (``attention_<model>.png``), and prints a short table.

MODEL is a local folder or a Hub id, stock or GPAM; GPAM folders written by ``save_pretrained`` load through their
own code (``trust_remote_code=True``). The tokenizer comes from the model folder or ``--tokenizer``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics

import torch
from safetensors import SafetensorError

from . import check_model_source, unreadable_weights
from ..architectures import ARCHITECTURES, GPAM_MODEL_TYPES, supported_model_types
from ..analysis.diagnostics import attention_components, diagnose_model, max_positions, model_family


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL", help="model folder(s) or Hub id(s)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", nargs="+", help="input text(s); several texts form one padded batch")
    source.add_argument("--file", help="a UTF-8 text file, one input per non-empty line")
    parser.add_argument("--output_dir", required=True, help="where diagnostics.json and the PNGs are written")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or id (default: the model's own)")
    parser.add_argument("--stack", default="decoder", choices=("decoder", "encoder"),
                        help="stack of the attention map to draw (BART/Marian have both)")
    parser.add_argument("--layer", type=int, default=-1, help="layer of the attention map to draw (-1 = last)")
    parser.add_argument("--head", type=int, default=0, help="head of the attention map to draw")
    parser.add_argument("--max_texts", type=int, default=32, help="use at most this many texts from --file")


def read_texts(args: argparse.Namespace) -> list[str]:
    """The input texts from ``--text`` or ``--file``; raises ``ValueError`` when there is nothing to measure."""
    if args.file is not None:
        if not os.path.isfile(args.file):
            raise ValueError(f"--file {args.file!r} does not exist")
        with open(args.file, encoding="utf-8") as handle:
            texts = [line.strip() for line in handle if line.strip()][: args.max_texts]
        where = f"--file {args.file!r}"
    else:
        texts = [t.strip() for t in args.text if t.strip()]
        where = "--text"
    if not texts:
        raise ValueError(f"{where} holds no text; pass at least one non-empty input")
    return texts


def load_model_and_tokenizer(name: str, tokenizer_name: str | None = None):
    """Load a supported model (eager attention, eval mode) and its tokenizer.

    Raises ``FileNotFoundError`` for a missing folder, ``OSError`` for unreadable weights and ``ValueError``
    naming ``name`` for a config or tokenizer that cannot be read (see ``hf_gpam.cli`` for what counts as bad
    input).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    check_model_source(name)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=True)
    except (OSError, ValueError) as error:  # no config.json, not JSON, no model_type, unknown Hub id, offline
        raise ValueError(
            f"cannot load a model config from {name!r} ({type(error).__name__}: {error}). Pass a folder written by "
            "save_pretrained or a Hub id (Hub ids need network access; HF_HUB_OFFLINE=1 allows local folders only)."
        ) from error
    architecture = ARCHITECTURES.get(config.model_type) or GPAM_MODEL_TYPES.get(config.model_type)
    if architecture is None:
        raise ValueError(
            f"{name!r} is a {config.model_type!r} model; hf-gpam diagnose supports {supported_model_types()} "
            "(stock or GPAM)"
        )
    # the head whose loss sends gradients into every query weight: the LM head of the row's task
    auto_class = AutoModelForSeq2SeqLM if architecture.task == "seq2seq-lm" else AutoModelForCausalLM
    try:
        model = auto_class.from_pretrained(name, trust_remote_code=True, attn_implementation="eager").eval()
    except SafetensorError as error:
        raise unreadable_weights(name, error) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or name)
    # the same errors convert tolerates for a tokenizer: missing files, unreadable JSON, an unknown class
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"no tokenizer for {name!r} ({type(error).__name__}: {error}); save one in the model folder or pass "
            "--tokenizer"
        ) from error
    if tokenizer.pad_token is None:
        # GPT-2 (and a BPE trained like its tokenizer) has no pad token; padding is left out of every statistic
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def encode(tokenizer, texts: list[str], model, name: str) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` into a right-padded batch; refuses inputs the model cannot take."""
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    lengths = batch["attention_mask"].sum(-1)
    if int(lengths.min()) == 0:
        raise ValueError("an input text tokenises to no tokens; remove empty inputs")
    limit = max_positions(model.config)
    if limit is not None and int(lengths.max()) > limit:
        longest = int(lengths.argmax())
        raise ValueError(
            f"input {longest} is {int(lengths.max())} tokens long, more than {name!r} accepts ({limit} positions); "
            "shorten it or split it into several lines"
        )
    vocab = model.config.vocab_size
    if int(batch["input_ids"].max()) >= vocab:
        raise ValueError(
            f"the tokenizer produced id {int(batch['input_ids'].max())} but {name!r} has a vocabulary of {vocab}; "
            "use the tokenizer the model was trained with (--tokenizer)"
        )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _unique_labels(names: list[str]) -> list[str]:
    labels, seen = [], {}
    for name in names:
        base = os.path.basename(os.path.normpath(name)) or name
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return labels


def _summary_row(label: str, result) -> str:
    stack = "decoder"
    residual = result.curve("residual_fro", stack)
    cosine = result.curve("mean_cosine", stack)
    grads = [v for v in result.curve("query_grad_norm", stack) if v is not None]
    negative = [v for v in result.curve("negative_mass", stack) if v is not None]
    lambdas = [v for v in result.curve("lambda", stack) if v is not None]
    lam = f"{statistics.mean(lambdas):.3f}" if lambdas else "-"
    return (
        f"{label[:24]:24s} {'daGPAM' if result.is_gpam else 'softmax':8s} {result.loss:8.3f} "
        f"{residual[0]:.3f}->{residual[-1]:.3f}  {cosine[-1]:7.3f} {statistics.mean(grads):10.2e} "
        f"{statistics.mean(negative) if negative else 0.0:8.3f} {lam:>6s}"
    )


def run(args: argparse.Namespace) -> int:
    from ..analysis.plotting import plot_layer_curves, plot_signed_attention

    texts = read_texts(args)
    labels = _unique_labels(args.models)
    os.makedirs(args.output_dir, exist_ok=True)
    results, figures = {}, []
    for name, label in zip(args.models, labels):
        model, tokenizer = load_model_and_tokenizer(name, args.tokenizer)
        inputs = encode(tokenizer, texts, model, name)
        result = diagnose_model(model, inputs["input_ids"], inputs["attention_mask"], name=label)
        results[label] = result

        stack = args.stack if model_family(model) == "seq2seq" else "decoder"
        layers = sum(1 for h in result.hidden_states if h.stack == stack) - 1
        layer = args.layer if args.layer >= 0 else layers + args.layer
        if not 0 <= layer < layers:
            raise ValueError(f"--layer {args.layer} is out of range: {name!r} has {layers} {stack} layers")
        components = attention_components(
            model, inputs["input_ids"], inputs["attention_mask"], stack=stack, layer=layer
        )
        heads = components["p_gpam"].shape[1]
        if not 0 <= args.head < heads:
            raise ValueError(f"--head {args.head} is out of range: {name!r} has {heads} heads")
        tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
        path = os.path.join(args.output_dir, f"attention_{_safe(label)}_{stack}{layer}_head{args.head}.png")
        figures.append(plot_signed_attention(
            components, path, head=args.head, tokens=tokens,
            title=f"{label}: {stack} layer {layer}, head {args.head}, input 0",
        ))

    for stack in ("decoder", "encoder"):
        with_stack = {label: r for label, r in results.items() if stack in r.stacks()}
        if with_stack:
            path = os.path.join(args.output_dir, f"layers_{stack}.png")
            figures.append(plot_layer_curves(
                with_stack, path, stack=stack,
                metrics=("residual_fro", "residual_l1inf", "mean_cosine", "query_grad_norm", "entropy",
                         "negative_mass"),
                title=f"{stack}: per-layer diagnostics on {len(texts)} input(s)",
            ))

    report = {"texts": texts, "models": {label: r.to_dict() for label, r in results.items()}}
    json_path = os.path.join(args.output_dir, "diagnostics.json")
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)

    print(f"{'model':24s} {'kind':8s} {'loss':>8s} {'residual_F':>12s} {'cos_last':>8s} {'mean|gQ|':>10s} "
          f"{'neg_mass':>8s} {'λ':>6s}")
    for label, result in results.items():
        print(_summary_row(label, result))
    print(f"wrote {json_path} and {len(figures)} figure(s) to {args.output_dir}")
    return 0


def _safe(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label)
