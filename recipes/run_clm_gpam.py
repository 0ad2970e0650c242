#!/usr/bin/env python
"""Train or fine-tune a causal language model with daGPAM attention, in the shape of transformers' ``run_clm.py``.
Every causal-LM family of ``hf_gpam.ARCHITECTURES`` works: GPT-2, Llama, Mistral, Qwen2/3, Gemma2/3, Phi-3,
GPT-NeoX, OPT, OLMo2.

Model sources:
  --model_name_or_path gpt2                   a stock checkpoint (GPT-2, a Llama, ...), converted with
                                              hf_gpam.patch_model (λ = 0: the stock outputs at step 0)
  --model_name_or_path outputs/clm_gpam       a GPAM checkpoint: training continues with its own gpam_* settings
  --model_type llama --config_overrides ...   from scratch, with a byte-level BPE trained on the training text
Data: --dataset_name/--dataset_config_name (datasets Hub), --train_file/--validation_file (txt, json, jsonl, csv
with a --text_column), or nothing: the docstrings of the installed Python standard library.

With no arguments at all it trains a tiny daGPAM GPT-2 from scratch on the stdlib docstrings, offline, in a few
minutes on a laptop CPU, and writes a Hub-ready folder to outputs/clm_gpam (eval loss before/after, perplexity).
Arguments can also come from one JSON file: ``python recipes/run_clm_gpam.py args.json``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from itertools import chain

import datasets
from transformers import AutoModelForCausalLM, TrainingArguments, default_data_collator

# the recipes folder is on sys.path when this file runs as a script; tests add it themselves
from gpam_recipe_utils import (
    evaluation_before_training_is_safe,
    GpamTrainer,
    before_after,
    chat_answer,
    check_chat_template,
    check_data_file,
    load_or_train_tokenizer,
    prepare_model,
    print_closing_summary,
    push_folder,
    recipe_command,
    start_run,
    write_outputs,
)
import hf_gpam
from hf_gpam.architectures import model_types_for_task
from hf_gpam.data import stdlib_docstring_corpus
from hf_gpam.hub import LM_TEMPLATE_PATH, gpam_lambda_values


logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "outputs/clm_gpam"
# the embedded offline run: a 2-layer, 128-wide daGPAM GPT-2 on ~400k characters of stdlib docstrings
DEMO_DEFAULTS = {
    "model_type": "gpt2",
    "do_train": True,
    "do_eval": True,
    "config_overrides": "n_layer=2,n_embd=128,n_head=4,n_positions=128",
    "tokenizer_vocab_size": 2000,
    "block_size": 128,
    "max_steps": 400,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 2e-3,
    "warmup_steps": 0.05,
    "lr_scheduler_type": "cosine",
    "weight_decay": 0.01,
    "eval_strategy": "steps",
    "eval_steps": 200,
    "logging_steps": 25,
    "save_steps": 200,
    "save_total_limit": 2,
    "max_eval_samples": 256,
}
TEXT_EXTENSIONS = ("txt", "json", "jsonl", "csv")
# every causal-LM row of the architecture table
SUPPORTED_MODEL_TYPES = model_types_for_task("causal-lm")


@dataclass
class DataTrainingArguments:
    """The training and evaluation text."""

    dataset_name: str | None = field(default=None, metadata={"help": "A datasets Hub id, e.g. Salesforce/wikitext."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Its configuration, e.g. wikitext-2-raw-v1."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Local training text: .txt, .json, .jsonl or .csv."})
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation text (same formats)."})
    text_column: str = field(default="text", metadata={"help": "The column holding the text (json/jsonl/csv/Hub)."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of the training data held out when there is no validation split."}
    )
    block_size: int | None = field(
        default=None, metadata={"help": "Training sequence length (default: the model's maximum, at most 1024)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep at most this many evaluation blocks."})
    default_corpus_chars: int = field(
        default=400_000, metadata={"help": "Size of the embedded stdlib docstring corpus (no data argument given)."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    eval_before_training: bool = field(
        default=True, metadata={"help": "Also evaluate before training, so all_results.json shows the loss falling."}
    )
    chat_prompt: str | None = field(
        default=None,
        metadata={
            "help": "A user turn answered greedily before and after training, through the tokenizer's chat template "
            "(instruct models), e.g. 'What is the capital of France?'; shown in the closing summary and recorded in "
            "all_results.json."
        },
    )
    chat_max_new_tokens: int = field(default=32, metadata={"help": "Length limit of the --chat_prompt answers."})

    def __post_init__(self):
        if self.dataset_name is not None and self.train_file is not None:
            raise ValueError("give either --dataset_name or --train_file, not both")
        if self.validation_file is not None and self.train_file is None and self.dataset_name is None:
            raise ValueError("--validation_file needs --train_file")


def load_raw_datasets(data_args, model_args, training_args) -> datasets.DatasetDict:
    """``train`` and ``validation`` splits of raw text, from the Hub, local files or the embedded corpus."""
    if data_args.dataset_name is not None:
        raw = datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir
        )
    elif data_args.train_file is not None:
        data_files = {"train": check_data_file(data_args.train_file, "--train_file", TEXT_EXTENSIONS)}
        if data_args.validation_file is not None:
            data_files["validation"] = check_data_file(data_args.validation_file, "--validation_file", TEXT_EXTENSIONS)
        extension = data_args.train_file.rsplit(".", 1)[-1].lower()
        builder = {"txt": "text", "jsonl": "json"}.get(extension, extension)
        kwargs = {"keep_linebreaks": True} if builder == "text" else {}
        raw = datasets.load_dataset(builder, data_files=data_files, cache_dir=model_args.cache_dir, **kwargs)
    else:
        logger.info("no data argument: using %d characters of stdlib docstrings", data_args.default_corpus_chars)
        corpus = stdlib_docstring_corpus(max_chars=data_args.default_corpus_chars)
        raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": corpus})})
    if "validation" not in raw:
        split = raw["train"].train_test_split(
            test_size=data_args.validation_split_percentage / 100, seed=training_args.seed
        )
        raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    column = data_args.text_column
    if column not in raw["train"].column_names:
        raise ValueError(
            f"--text_column {column!r} is not a column of the training data (columns: {raw['train'].column_names})"
        )
    if data_args.train_file is not None:
        files = {"train": ("--train_file", data_args.train_file),
                 "validation": ("--validation_file", data_args.validation_file)}
        for split, (flag, path) in files.items():
            if path is not None and not _has_text(raw[split], column):
                raise ValueError(
                    f"{flag}: every {column!r} value in {path!r} is empty or blank; give a file with some text"
                )
    return raw


def _has_text(split: datasets.Dataset, column: str) -> bool:
    # in batches: stops at the first non-blank text, and never holds a large column in memory at once
    for batch in split.iter(batch_size=10_000):
        if any(isinstance(text, str) and text.strip() for text in batch[column]):
            return True
    return False


def tokenize_and_group(raw, tokenizer, data_args, training_args, block_size: int):
    """Tokenise every document (ending it with the end-of-text token) and cut the stream into equal blocks."""
    column = data_args.text_column

    def tokenize(batch):
        texts = [text for text in batch[column] if text and text.strip()]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [tokenizer.eos_token_id] for x in ids]}

    def group(batch):
        stream = list(chain.from_iterable(batch["input_ids"]))
        total = (len(stream) // block_size) * block_size
        blocks = [stream[i : i + block_size] for i in range(0, total, block_size)]
        return {
            "input_ids": blocks,
            "attention_mask": [[1] * block_size for _ in blocks],
            "labels": [block[:] for block in blocks],
        }

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(
            tokenize, batched=True, remove_columns=raw["train"].column_names,
            num_proc=data_args.preprocessing_num_workers, desc="tokenizing",
        )
        grouped = tokenized.map(
            group, batched=True, batch_size=1000, num_proc=data_args.preprocessing_num_workers,
            desc=f"grouping into blocks of {block_size}",
        )
    for split in ("train", "validation"):
        if len(grouped[split]) == 0:
            raise ValueError(
                f"the {split} text is shorter than one block of {block_size} tokens; give more text or a smaller "
                "--block_size"
            )
    return grouped


def main(argv: list[str] | None = None) -> dict:
    model_args, gpam_args, data_args, training_args, checkpoint = start_run(
        DataTrainingArguments, TrainingArguments, argv, output_dir=DEFAULT_OUTPUT_DIR, demo_defaults=DEMO_DEFAULTS,
        supported=SUPPORTED_MODEL_TYPES, task="run_clm_gpam",
    )

    raw = load_raw_datasets(data_args, model_args, training_args)
    tokenizer = load_or_train_tokenizer(
        model_args, training_args, lambda: raw["train"][data_args.text_column], checkpoint
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_chat_template(tokenizer, data_args.chat_prompt)
    model, base_model = prepare_model(
        model_args, gpam_args, AutoModelForCausalLM, tokenizer, checkpoint, supported=SUPPORTED_MODEL_TYPES,
        task="run_clm_gpam", lora_task_type="CAUSAL_LM",
    )
    # GPT-2's n_positions under the name every family's config answers to
    max_positions = model.config.max_position_embeddings
    block_size = min(data_args.block_size or 1024, max_positions)
    grouped = tokenize_and_group(raw, tokenizer, data_args, training_args, block_size)
    train_dataset, eval_dataset = grouped["train"], grouped["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))

    trainer = GpamTrainer(
        model=model,
        args=training_args,
        gpam_weight_decay=model_args.gpam_weight_decay,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    results = {
        "world_size": training_args.world_size,
        "block_size": block_size,
        "train_blocks": len(train_dataset),
        "eval_blocks": len(eval_dataset),
        "gpam_mode": getattr(trainer.model.config, "gpam_mode", "softmax"),
    }
    # one process: generating on one rank of a sharded (FSDP) model would wait for the others forever
    chat = data_args.chat_prompt if training_args.world_size == 1 else None
    if chat is not None:
        results["chat_prompt"] = chat
        results["chat_answer_before"] = chat_answer(trainer.model, tokenizer, chat, data_args.chat_max_new_tokens)
    if (training_args.do_eval and data_args.eval_before_training and checkpoint is None
            and evaluation_before_training_is_safe(model_args, training_args)):
        metrics = trainer.evaluate(metric_key_prefix="init_eval")
        results["init_eval_loss"] = metrics["init_eval_loss"]
        results["init_perplexity"] = math.exp(min(metrics["init_eval_loss"], 50))
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(train_result.metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50))
        trainer.log_metrics("eval", metrics)
        results.update(metrics)
    if chat is not None:
        results["chat_answer_after"] = chat_answer(trainer.model, tokenizer, chat, data_args.chat_max_new_tokens)

    card = dict(
        base_model=base_model,
        datasets=[data_args.dataset_name] if data_args.dataset_name else None,
        metrics=["perplexity"],
        command=recipe_command("recipes/run_clm_gpam.py", argv),
        repo_id=training_args.hub_model_id,
        summary=(
            f"A {hf_gpam.ARCHITECTURES[model.config.model_type.removeprefix('gpam_')].display_name} causal language "
            "model with daGPAM attention, trained with hf_gpam's run_clm_gpam recipe."
        ),
        limitations=(
            "Trained on "
            + (data_args.dataset_name or data_args.train_file or "stdlib docstrings (the embedded offline corpus)")
            + f" for {trainer.state.global_step} steps; the numbers above are for that run only."
        ),
        template_path=LM_TEMPLATE_PATH,
    )
    write_outputs(trainer, trainer.model, tokenizer, model_args, results, card)
    push_folder(trainer, "run_clm_gpam: end of training")
    if trainer.is_world_process_zero():
        print_closing_summary(
            f"run_clm_gpam: {results['gpam_mode']} {model.config.model_type.removeprefix('gpam_')}, "
            f"{trainer.state.global_step} steps",
            summary_rows(results), gpam_lambda_values(trainer.model), training_args.output_dir,
            next_commands(training_args.output_dir, model_args, chat),
        )
    return results


def summary_rows(results: dict) -> list[tuple[str, str]]:
    """The closing summary's before -> after lines: held-out loss, perplexity, the chat answer."""
    rows = [
        ("held-out loss", before_after(results, "init_eval_loss", "eval_loss")),
        ("perplexity", before_after(results, "init_perplexity", "perplexity", "{:.2f}")),
    ]
    if "train_runtime" in results:
        rows.append(("training time", f"{results['train_runtime']:.0f} s"))
    if "chat_prompt" in results:
        rows.append(("chat prompt", repr(results["chat_prompt"])))
        rows.append(("answer before", repr(results.get("chat_answer_before"))))
        rows.append(("answer after", repr(results.get("chat_answer_after"))))
    return rows


def next_commands(output_dir: str, model_args, chat_prompt: str | None) -> list[str]:
    """What to run on the output folder: chat with it, serve it, diagnose it (a LoRA adapter needs merging first).

    The commands run in the environment that ran this recipe: by the path of its ``bin/`` when it is a virtual
    environment that is not activated (``make run-smollm2`` runs ``.venv/bin/python``), and with the ``[serving]``
    install first when FastAPI or Uvicorn is missing there."""
    if model_args.use_lora and not model_args.merge_lora:
        return ["the folder holds a LoRA adapter: rerun with --merge_lora for a full daGPAM checkpoint that "
                "generate, hf-gpam serve and vLLM load"]
    prompt = shlex.quote(chat_prompt or "The attention mechanism")
    serve = [f"{environment_command('hf-gpam')} serve {output_dir}"]
    if any(importlib.util.find_spec(name) is None for name in ("fastapi", "uvicorn")):
        serve.insert(0, f"{environment_command('pip')} install 'hf_gpam[serving]'   # once: FastAPI and Uvicorn")
    return [
        f"{environment_command('python')} recipes/chat_gpam.py {output_dir} {prompt}",
        *serve,
        f"{environment_command('hf-gpam')} diagnose {output_dir} --text {prompt} --output_dir {output_dir}/diagnostics",
    ]


def environment_command(name: str) -> str:
    """``name`` as the shell finds it in this interpreter's environment: bare when that environment is active (or is
    not a virtual environment), else its path in the environment's ``bin/``, relative when it lies under the current
    directory."""
    active = os.environ.get("VIRTUAL_ENV")
    if sys.prefix == sys.base_prefix or (active and os.path.realpath(active) == os.path.realpath(sys.prefix)):
        return name
    path = os.path.join(os.path.dirname(sys.executable), name)
    relative = os.path.relpath(path)
    return shlex.quote(path if relative.startswith("..") else relative)


if __name__ == "__main__":
    main()
    sys.exit(0)
