"""``hf-gpam convert MODEL --output_dir DIR``: patch a stock checkpoint with daGPAM and write a Hub-ready folder.

No training happens: the folder holds the patched weights (λ = 0 by default, so the model computes what the stock
one did), the self-contained modeling code (``trust_remote_code=True`` loads it without hf_gpam), the tokenizer
when the checkpoint has one, and a model card. The largest logit change caused by the conversion, measured on a
small random batch, is printed and recorded in the card.

Example:

```bash
hf-gpam convert gpt2 --output_dir outputs/gpt2-dagpam
hf-gpam convert HuggingFaceTB/SmolLM2-135M --output_dir outputs/smollm2-dagpam
hf-gpam convert Helsinki-NLP/opus-mt-en-de --output_dir outputs/opus-mt-en-de-dagpam --gpam_layers 0 1 2
hf-gpam convert ~/.cache/hf_gpam/smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf --output_dir outputs/smollm2-dagpam
```

``--gguf_file`` reads a GGUF file (in MODEL's folder, or a path) through transformers' GGUF loader, which needs the
``gguf`` package and dequantizes the weights to float32; the folder written is ordinary safetensors.

The output folder must be new or empty unless ``--overwrite_output_dir`` is given (files of the same name are then
replaced, others kept), and it is never the source checkpoint's own folder, local or in the Hub cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
from dataclasses import MISSING, fields

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from ..architectures import ARCHITECTURES, supported_model_types
from . import check_model_source, unreadable_weights
from ..hub import save_hub_ready
from ..modeling.gpam_config_fields import GpamConfigFields
from ..modeling.gpam_gguf import check_gguf_architecture, check_gguf_file
from ..patching import is_gpam_model, patch_model


logger = logging.getLogger(__name__)

TASKS = {"auto": None, "causal-lm": AutoModelForCausalLM, "seq2seq-lm": AutoModelForSeq2SeqLM, "base": AutoModel}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_gpam_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--gpam_*`` option per GPAM config field, with the field's help text; unset options keep
    ``patch_model``'s defaults (notably λ = 0)."""
    group = parser.add_argument_group("daGPAM options (the gpam_* config fields)")
    for spec in fields(GpamConfigFields):
        help_text = spec.metadata.get("help", "")
        kwargs = {"default": None, "help": help_text}
        if spec.name in ("gpam_layers",):
            kwargs.update(type=int, nargs="+")
        elif spec.name == "gpam_attention_types":
            kwargs.update(nargs="+")
        elif spec.name in ("gpam_tie_lambda", "gpam_lambda_trainable"):
            kwargs.update(type=_parse_bool, metavar="{true,false}")
        elif spec.name in ("gpam_lambda_init", "gpam_lambda_neg_init"):
            kwargs.update(type=float)
        if spec.default is not MISSING and spec.name != "gpam_lambda_init":
            kwargs["help"] = f"{help_text} (default: {spec.default})"
        group.add_argument(f"--{spec.name}", **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help=f"a stock checkpoint of a supported family ({supported_model_types()}): local folder or Hub id"
    )
    parser.add_argument("--output_dir", required=True, help="the folder to write (new or empty)")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true",
        help="write into a non-empty --output_dir, replacing files of the same name (never the source folder)",
    )
    parser.add_argument(
        "--task", choices=sorted(TASKS), default="auto",
        help="which head to load: causal-lm, seq2seq-lm, base (no head), or auto (the class the checkpoint's "
        "config names, e.g. LlamaForSequenceClassification, else the family's LM head)",
    )
    parser.add_argument("--revision", default="main", help="Hub revision of MODEL to convert")
    parser.add_argument(
        "--gguf_file", default=None,
        help="convert a GGUF file: its name in MODEL's folder (or Hub repository), or a path; the weights are "
        "dequantized to float32 by transformers (needs the gguf package)",
    )
    parser.add_argument("--repo_id", default=None, help="the Hub repository the folder is meant for (model card)")
    parser.add_argument(
        "--attn_implementation", default=None, choices=("sdpa", "eager"),
        help="attention backend to load and convert with (default: transformers' choice for the family, sdpa where "
        "it supports it, eager otherwise, e.g. Gemma2)",
    )
    add_gpam_arguments(parser)


def _source_folder(model_name_or_path: str, revision: str) -> str | None:
    # a local folder is the source itself; a Hub id's files live in a snapshot folder of the Hub cache, whose
    # entries are links into the shared blob store: writing "over" them would corrupt the cache
    if os.path.isdir(model_name_or_path):
        return model_name_or_path
    try:
        cached = try_to_load_from_cache(model_name_or_path, "config.json", revision=revision)
    except ValueError:  # not a valid repo id: nothing cached to protect
        return None
    return os.path.dirname(cached) if isinstance(cached, str) else None


def check_output_dir(
    model_name_or_path: str, output_dir: str, *, revision: str = "main", overwrite_output_dir: bool = False
) -> None:
    """Refuse an ``output_dir`` that would destroy something: the source checkpoint's folder (always), a file, or
    a non-empty folder (unless ``overwrite_output_dir``).

    Paths are compared after resolving links, so ``./ckpt``, ``ckpt/`` and a symlink to it are the same folder.

    Raises:
        ValueError: saying which case it is and what to pass instead.
    """
    source = _source_folder(model_name_or_path, revision)
    if source is not None and (
        os.path.realpath(output_dir) == os.path.realpath(source)
        or os.path.isdir(output_dir) and os.path.samefile(output_dir, source)
    ):
        raise ValueError(
            f"--output_dir {output_dir!r} is the folder of the checkpoint being converted ({model_name_or_path!r}); "
            "converting in place would overwrite the source weights. Choose another folder."
        )
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} is a file, not a folder; choose a folder path")
    entries = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if entries and not overwrite_output_dir:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"--output_dir {output_dir!r} is not empty ({len(entries)} entries: {shown}); choose a new folder, or "
            "pass --overwrite_output_dir (overwrite_output_dir=True in Python) to replace the files in it"
        )


def _model_class(config, task: str):
    # --task names an Auto class; "auto" takes the stock class the checkpoint's config names when the table row
    # converts it (base model, LM head, sequence classifier), else the row's LM head
    if TASKS[task] is not None:
        return TASKS[task]
    architecture = ARCHITECTURES[config.model_type]
    stock_classes = {stock.__name__: stock for stock in architecture.model_classes}
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        if name in stock_classes:
            return stock_classes[name]
    if architectures:
        return AutoModel
    return AutoModelForSeq2SeqLM if architecture.task == "seq2seq-lm" else AutoModelForCausalLM


def _dummy_inputs(model, config) -> dict:
    generator = torch.Generator().manual_seed(0)
    vocab = min(config.vocab_size, 1000)
    ids = torch.randint(3, vocab, (2, 8), generator=generator)
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(3, vocab, (2, 5), generator=generator)
    return inputs


def _first_output(output) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def convert_checkpoint(
    model_name_or_path: str,
    output_dir: str,
    *,
    task: str = "auto",
    revision: str = "main",
    repo_id: str | None = None,
    attn_implementation: str | None = None,
    command: str | None = None,
    overwrite_output_dir: bool = False,
    gguf_file: str | None = None,
    **gpam_options,
) -> dict:
    """Patch ``model_name_or_path`` with daGPAM and write a Hub-ready folder to ``output_dir``.

    ``output_dir`` must be new or empty unless ``overwrite_output_dir=True``, and is never the source folder
    (``check_output_dir``); this is checked before anything is loaded. ``attn_implementation`` None lets
    transformers choose the family's default backend (sdpa, or eager for families without sdpa such as Gemma2).
    ``gguf_file`` names a GGUF file in ``model_name_or_path`` (or a path to one), which transformers dequantizes.

    Returns a summary: the GPAM class, the number of new parameters, the largest absolute change of the logits
    (or last hidden states) on a fixed random batch, and the files written.

    Example:

    ```python
    >>> import tempfile
    >>> from transformers import GPT2LMHeadModel
    >>> from hf_gpam.cli.convert import convert_checkpoint
    >>> from hf_gpam.testing_utils import tiny_stock_config
    >>> stock_dir, out_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> GPT2LMHeadModel(tiny_stock_config("gpt2")).save_pretrained(stock_dir)
    >>> convert_checkpoint(stock_dir, out_dir)["model_class"]
    'GpamGPT2LMHeadModel'
    ```
    """
    check_model_source(model_name_or_path)
    check_output_dir(model_name_or_path, output_dir, revision=revision, overwrite_output_dir=overwrite_output_dir)
    load_kwargs = {"revision": revision}
    if gguf_file is not None:
        check_gguf_file(model_name_or_path, gguf_file)
        local = gguf_file if os.path.isfile(gguf_file) else os.path.join(model_name_or_path, gguf_file)
        if os.path.isfile(local):
            # one line for an architecture transformers' GGUF loader cannot read
            check_gguf_architecture(local)
        load_kwargs["gguf_file"] = gguf_file
    config = AutoConfig.from_pretrained(model_name_or_path, **load_kwargs)
    if config.model_type not in ARCHITECTURES:
        raise ValueError(
            f"hf-gpam convert: {model_name_or_path!r} has model_type {config.model_type!r}, which is not supported "
            f"(supported: {supported_model_types()}; GPAM checkpoints need no conversion)"
        )
    if task not in TASKS:
        raise ValueError(f"hf-gpam convert: task {task!r} is not one of {', '.join(sorted(TASKS))}")
    model_class = _model_class(config, task)
    try:
        model = model_class.from_pretrained(
            model_name_or_path, attn_implementation=attn_implementation, **load_kwargs
        )
    except SafetensorError as error:
        raise unreadable_weights(model_name_or_path, error) from error
    model.eval()
    inputs = _dummy_inputs(model, config)
    with torch.no_grad():
        before = _first_output(model(**inputs))
        model = patch_model(model, **gpam_options)
        after = _first_output(model(**inputs))
    max_change = (after - before).abs().max().item()
    if not is_gpam_model(model):
        raise RuntimeError("hf-gpam convert: patch_model did not produce a GPAM model")

    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **load_kwargs)
    except (OSError, ValueError, TypeError) as error:
        # a weights-only checkpoint is fine: the folder is then written without a tokenizer
        logger.warning("no tokenizer saved: could not load one from %s (%s)", model_name_or_path, error)
    # transformers 5 builds an empty tokenizer (special tokens only) for a folder without tokenizer files
    if tokenizer is not None and len(tokenizer) <= len(tokenizer.all_special_tokens):
        logger.warning("no tokenizer saved: %s has no tokenizer files", model_name_or_path)
        tokenizer = None

    source = model_name_or_path if gguf_file is None else f"{model_name_or_path} ({gguf_file}, dequantized)"
    new_parameters = sum(p.numel() for name, p in model.named_parameters() if ".gpam_" in name)
    files = save_hub_ready(
        model,
        output_dir,
        tokenizer=tokenizer,
        repo_id=repo_id,
        base_model=model_name_or_path,
        command=command,
        summary=(
            f"`{source}` converted to daGPAM attention with hf_gpam, without training. With λ = "
            f"{_lambda_summary(model)} the model computes what the original computes (largest output change on a "
            f"random batch: {max_change:.2e}); fine-tune it to learn λ."
        ),
        limitations="Not trained after conversion: expect the original model's quality until λ is fine-tuned.",
    )
    return {
        "model_class": type(model).__name__,
        "gpam_new_parameters": new_parameters,
        "max_abs_output_change": max_change,
        "tokenizer_saved": tokenizer is not None,
        "files": files,
    }


def _lambda_summary(model) -> str:
    values = sorted({round(v, 6) for p in (m.gpam_lambda.weight for m in model.modules() if hasattr(m, "gpam_lambda"))
                     for v in p.flatten().tolist()})
    return ", ".join(map(str, values)) if values else "(no daGPAM modules)"


def run(args: argparse.Namespace) -> int:
    gpam_options = {
        spec.name: getattr(args, spec.name)
        for spec in fields(GpamConfigFields)
        if getattr(args, spec.name, None) is not None
    }
    # rebuilt from the parsed arguments: sys.argv is not this command when run() is called from Python
    words = ["hf-gpam", "convert", args.model, "--output_dir", args.output_dir]
    if args.task != "auto":
        words += ["--task", args.task]
    if args.revision != "main":
        words += ["--revision", args.revision]
    if args.gguf_file is not None:
        words += ["--gguf_file", args.gguf_file]
    for name, value in gpam_options.items():
        words += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    command = " ".join(map(shlex.quote, words))
    summary = convert_checkpoint(
        args.model,
        args.output_dir,
        task=args.task,
        revision=args.revision,
        repo_id=args.repo_id,
        attn_implementation=args.attn_implementation,
        command=command,
        overwrite_output_dir=args.overwrite_output_dir,
        gguf_file=args.gguf_file,
        **gpam_options,
    )
    print(json.dumps(summary, indent=2))
    return 0
