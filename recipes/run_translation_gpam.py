#!/usr/bin/env python
"""Train or fine-tune a translation model (Marian or BART) with daGPAM attention, in the shape of transformers'
``run_translation.py``.

Model sources:
  --model_name_or_path Helsinki-NLP/opus-mt-en-de   a stock Marian / BART checkpoint, patched with hf_gpam (λ = 0)
  --model_name_or_path outputs/translation_gpam     a GPAM checkpoint: training continues with its gpam_* settings
  --model_type marian|bart --config_overrides ...   from scratch, with a tokenizer trained on the training pairs
Data: --dataset_name/--dataset_config_name (e.g. wmt16 de-en), --train_file/--validation_file/--test_file (json
or jsonl, one ``{"translation": {"en": ..., "de": ...}}`` per line) with --source_lang/--target_lang, or nothing:
a generated English -> German task with numbers written out in words.

With no arguments at all it trains a tiny daGPAM Marian model from scratch on the number-words task, offline, in a
few minutes on a laptop CPU, and writes a Hub-ready folder to outputs/translation_gpam with sacreBLEU and chrF
(computed through ``evaluate`` with the metric module shipped in recipes/metrics/sacrebleu_offline).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import evaluate
import numpy as np
from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, Seq2SeqTrainingArguments

# the recipes folder is on sys.path when this file runs as a script; tests add it themselves
from gpam_recipe_utils import (
    evaluation_before_training_is_safe,
    GpamSeq2SeqTrainer,
    before_after,
    check_data_file,
    load_or_train_tokenizer,
    prepare_model,
    print_closing_summary,
    push_folder,
    recipe_command,
    start_run,
    write_outputs,
)
from hf_gpam.architectures import model_types_for_task
from hf_gpam.data import number_translation_pairs
from hf_gpam.hub import TRANSLATION_TEMPLATE_PATH, gpam_lambda_values


logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "outputs/translation_gpam"
METRIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "sacrebleu_offline")
# the embedded offline run: a 2+2-layer, 128-wide daGPAM Marian model on the generated number-words task
DEMO_DEFAULTS = {
    "model_type": "marian",
    "config_overrides": (
        "d_model=128,encoder_layers=2,decoder_layers=2,encoder_attention_heads=4,decoder_attention_heads=4,"
        "encoder_ffn_dim=256,decoder_ffn_dim=256,max_position_embeddings=64"
    ),
    "tokenizer_vocab_size": 400,
    "do_train": True,
    "do_eval": True,
    "predict_with_generate": True,
    "max_source_length": 48,
    "max_target_length": 48,
    "max_steps": 1200,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "learning_rate": 3e-3,
    "warmup_steps": 0.05,
    "lr_scheduler_type": "cosine",
    "eval_strategy": "no",
    "logging_steps": 50,
    "save_steps": 300,
    "save_total_limit": 2,
    "max_eval_samples": 200,
}
DATA_EXTENSIONS = ("json", "jsonl")


@dataclass
class DataTrainingArguments:
    """The parallel data and how it is tokenised and decoded."""

    dataset_name: str | None = field(default=None, metadata={"help": "A datasets Hub id, e.g. wmt16."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, e.g. de-en."})
    train_file: str | None = field(
        default=None, metadata={"help": 'Local json/jsonl, one {"translation": {"en": ..., "de": ...}} per line.'}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation pairs (same layout)."})
    test_file: str | None = field(default=None, metadata={"help": "Local pairs for --do_predict (same layout)."})
    source_lang: str = field(default="en", metadata={"help": "Key of the source text in each translation dict."})
    target_lang: str = field(default="de", metadata={"help": "Key of the target text in each translation dict."})
    source_prefix: str = field(default="", metadata={"help": "Text put before every source sentence."})
    max_source_length: int = field(default=128, metadata={"help": "Source tokens kept (longer ones are cut)."})
    max_target_length: int = field(default=128, metadata={"help": "Target tokens kept when training."})
    val_max_target_length: int | None = field(
        default=None, metadata={"help": "Longest generated translation (default: --max_target_length)."}
    )
    num_beams: int | None = field(
        default=None, metadata={"help": "Beams for generation in eval/predict (default: generation_num_beams or 1)."}
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of the training pairs held out when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep at most this many evaluation pairs."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep at most this many test pairs."})
    default_train_pairs: int = field(
        default=8000, metadata={"help": "Size of the embedded number-words training set (no data argument given)."}
    )
    default_eval_pairs: int = field(default=200, metadata={"help": "Size of its validation set."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    eval_before_training: bool = field(
        default=True, metadata={"help": "Also measure the eval loss before training (no generation)."}
    )
    skip_invalid_rows: bool = field(
        default=False,
        metadata={
            "help": "Leave out rows that lack a non-empty source or target text (counted in a warning and in "
            "all_results.json) instead of stopping with their line numbers."
        },
    )

    def __post_init__(self):
        if self.dataset_name is not None and self.train_file is not None:
            raise ValueError("give either --dataset_name or --train_file, not both")
        if self.source_lang == self.target_lang:
            raise ValueError(f"--source_lang and --target_lang are both {self.source_lang!r}")


def load_raw_datasets(data_args, model_args, training_args) -> tuple[datasets.DatasetDict, dict[str, int]]:
    """Splits of ``{"translation": {lang: text}}`` examples from the Hub, local files or the embedded task, every
    row checked (``check_translation_rows``).

    Returns:
        ``(raw, skipped)``: the splits, and the number of invalid rows skipped per split (``--skip_invalid_rows``).
    """
    sources = {}
    if data_args.dataset_name is not None:
        raw = datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir
        )
    elif data_args.train_file is not None:
        data_files = {"train": check_data_file(data_args.train_file, "--train_file", DATA_EXTENSIONS)}
        for split, path in (("validation", data_args.validation_file), ("test", data_args.test_file)):
            if path is not None:
                data_files[split] = check_data_file(path, f"--{split}_file", DATA_EXTENSIONS)
        raw = datasets.load_dataset("json", data_files=data_files, cache_dir=model_args.cache_dir)
        sources = data_files
    else:
        if (data_args.source_lang, data_args.target_lang) != ("en", "de"):
            raise ValueError(
                "the embedded number-words task is English -> German: use --source_lang en --target_lang de, or "
                "give your own data"
            )
        # disjoint seeds keep validation sentences out of the generator stream used for training
        raw = datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_list(number_translation_pairs(data_args.default_train_pairs, seed=0)),
                "validation": datasets.Dataset.from_list(
                    number_translation_pairs(data_args.default_eval_pairs, seed=1)
                ),
            }
        )
    skipped = {}
    # before the validation split is carved out of the training rows, so that row i is still line i's example
    for name in list(raw):
        raw[name], count = check_translation_rows(raw[name], name, sources.get(name), data_args)
        if count:
            skipped[name] = count
    if "validation" not in raw:
        split = raw["train"].train_test_split(
            test_size=data_args.validation_split_percentage / 100, seed=training_args.seed
        )
        raw = datasets.DatasetDict({**raw, "train": split["train"], "validation": split["test"]})
    return raw, skipped


def _row_problem(translation, languages: tuple[str, str]) -> str | None:
    """What is wrong with one example's ``translation`` value, or None when it has a text in both languages."""
    if not isinstance(translation, dict):
        return "no translation dict"
    for lang in languages:
        text = translation.get(lang)
        if text is None:
            return f"no {lang!r} text"
        if not isinstance(text, str):
            return f"{lang!r} is a {type(text).__name__}, not a text"
        if not text.strip():
            return f"empty {lang!r} text"
    return None


def json_row_lines(path: str, rows: list[int]) -> dict[int, int]:
    """The 1-based line in ``path`` where each of ``rows`` (indices in datasets' row order) starts.

    JSON Lines: datasets skips blank lines, so row i is the i-th non-blank line. A JSON array: row i is its i-th
    element, located with the decoder's own positions.
    """
    wanted, lines = set(rows), {}
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        decoder = json.JSONDecoder()
        position = len(text) - len(stripped) + 1
        line, counted_to, row, last = 1, 0, 0, max(wanted, default=-1)
        while row <= last:
            while position < len(text) and text[position] in " \t\r\n,":
                position += 1
            if position >= len(text) or text[position] == "]":
                break
            line += text.count("\n", counted_to, position)
            counted_to = position
            if row in wanted:
                lines[row] = line
            _, position = decoder.raw_decode(text, position)
            row += 1
        return lines
    row = 0
    for number, content in enumerate(text.splitlines(), start=1):
        if content.strip():
            if row in wanted:
                lines[row] = number
            row += 1
    return lines


def check_translation_rows(split: datasets.Dataset, name: str, path: str | None, data_args):
    """Check that every row of ``split`` has a non-empty text in both languages.

    A language that no row has is a wrong ``--source_lang`` / ``--target_lang``. Rows missing a language, or with
    an empty or blank text, are reported with their line in ``path`` (their row number for Hub data), or, with
    ``--skip_invalid_rows``, dropped and counted in a warning.

    Returns:
        ``(split, skipped)``: the split (without the invalid rows when they are skipped) and how many were skipped.
    """
    where = f"{path!r}" if path else f"the {name} data"
    if "translation" not in split.column_names:
        raise ValueError(
            f"{where} has no 'translation' column (columns: {split.column_names}); each example must "
            'look like {"translation": {"en": "...", "de": "..."}}'
        )
    languages = (data_args.source_lang, data_args.target_lang)
    seen_languages, invalid = set(), []
    start = 0
    # in batches, so that a large corpus is never materialised as one Python list
    for batch in split.iter(batch_size=10_000):
        for offset, translation in enumerate(batch["translation"]):
            if isinstance(translation, dict):
                seen_languages.update(lang for lang, text in translation.items() if text is not None)
            problem = _row_problem(translation, languages)
            if problem is not None:
                invalid.append((start + offset, problem))
        start += len(batch["translation"])
    for flag, lang in zip(("--source_lang", "--target_lang"), languages):
        if lang not in seen_languages:
            raise ValueError(
                f"{flag} {lang!r} is not a language of the {name} data "
                f"(languages: {', '.join(sorted(seen_languages))})"
            )
    if not invalid:
        return split, 0
    shown = invalid[:5]
    if path is not None:
        lines = json_row_lines(path, [row for row, _ in shown])
        described = [f"line {lines.get(row, '?')}: {problem}" for row, problem in shown]
    else:
        described = [f"row {row + 1}: {problem}" for row, problem in shown]
    summary = "; ".join(described) + (f"; ... ({len(invalid)} in all)" if len(invalid) > len(shown) else "")
    if not data_args.skip_invalid_rows:
        raise ValueError(
            f"{where}: {len(invalid)} of {len(split)} rows lack a non-empty {languages[0]!r} or {languages[1]!r} "
            f"text ({summary}). Fix them, or pass --skip_invalid_rows to leave them out (the count is logged)."
        )
    if len(invalid) == len(split):
        raise ValueError(f"{where}: none of its {len(split)} rows has a non-empty {languages[0]!r} and "
                         f"{languages[1]!r} text ({summary})")
    logger.warning("--skip_invalid_rows: skipped %d of %d rows of %s (%s)", len(invalid), len(split), where, summary)
    bad = {row for row, _ in invalid}
    return split.select([row for row in range(len(split)) if row not in bad]), len(invalid)

# every encoder-decoder row of the architecture table (BART, Marian)
SUPPORTED_MODEL_TYPES = model_types_for_task("seq2seq-lm")


def main(argv: list[str] | None = None) -> dict:
    model_args, gpam_args, data_args, training_args, checkpoint = start_run(
        DataTrainingArguments, Seq2SeqTrainingArguments, argv, output_dir=DEFAULT_OUTPUT_DIR,
        demo_defaults=DEMO_DEFAULTS, supported=SUPPORTED_MODEL_TYPES, task="run_translation_gpam",
    )
    src, tgt = data_args.source_lang, data_args.target_lang

    raw, skipped_rows = load_raw_datasets(data_args, model_args, training_args)
    tokenizer = load_or_train_tokenizer(
        model_args,
        training_args,
        lambda: [ex[src] for ex in raw["train"]["translation"]] + [ex[tgt] for ex in raw["train"]["translation"]],
        checkpoint,
    )
    model, base_model = prepare_model(
        model_args, gpam_args, AutoModelForSeq2SeqLM, tokenizer, checkpoint, supported=SUPPORTED_MODEL_TYPES,
        task="run_translation_gpam", lora_task_type="SEQ_2_SEQ_LM",
    )

    def preprocess(batch):
        sources = [data_args.source_prefix + ex[src] for ex in batch["translation"]]
        targets = [ex[tgt] for ex in batch["translation"]]
        model_inputs = tokenizer(sources, max_length=data_args.max_source_length, truncation=True)
        labels = tokenizer(text_target=targets, max_length=data_args.max_target_length, truncation=True)
        model_inputs["labels"] = labels["input_ids"]
        return model_inputs

    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
              "test": data_args.max_predict_samples}
    processed = {}
    with training_args.main_process_first(desc="tokenizing"):
        for name, split in raw.items():
            if limits.get(name) is not None:
                split = split.select(range(min(limits[name], len(split))))
                raw[name] = split
            processed[name] = split.map(
                preprocess, batched=True, remove_columns=split.column_names,
                num_proc=data_args.preprocessing_num_workers, desc=f"tokenizing {name}",
            )

    metric = evaluate.load(METRIC_DIR)

    def decode(token_ids) -> list[str]:
        token_ids = np.where(token_ids != -100, token_ids, tokenizer.pad_token_id)
        return [text.strip() for text in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    def compute_metrics(prediction):
        predictions = decode(prediction.predictions)
        references = decode(prediction.label_ids)
        scores = metric.compute(predictions=predictions, references=[[r] for r in references])
        lengths = [np.count_nonzero(row != tokenizer.pad_token_id) for row in prediction.predictions]
        return {"bleu": scores["bleu"], "chrf": scores["chrf"], "gen_len": float(np.mean(lengths))}

    trainer = GpamSeq2SeqTrainer(
        model=model,
        args=training_args,
        gpam_weight_decay=model_args.gpam_weight_decay,
        train_dataset=processed["train"] if training_args.do_train else None,
        eval_dataset=processed["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=compute_metrics if training_args.predict_with_generate else None,
    )
    generation = {
        "max_length": data_args.val_max_target_length or data_args.max_target_length,
        "num_beams": data_args.num_beams or training_args.generation_num_beams or 1,
    }
    results = {
        "world_size": training_args.world_size,
        "train_pairs": len(processed["train"]),
        "eval_pairs": len(processed["validation"]),
        "num_beams": generation["num_beams"],
        "gpam_mode": getattr(trainer.model.config, "gpam_mode", "softmax"),
    }
    if skipped_rows:
        results["skipped_invalid_rows"] = skipped_rows
    if (training_args.do_eval and data_args.eval_before_training and checkpoint is None
            and evaluation_before_training_is_safe(model_args, training_args)):
        # loss only: generating with an untrained model is slow and tells nothing
        trainer.compute_metrics = None
        results["init_eval_loss"] = trainer.evaluate(metric_key_prefix="init_eval")["init_eval_loss"]
        trainer.compute_metrics = compute_metrics if training_args.predict_with_generate else None
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(train_result.metrics)

    def predict(name: str, prefix: str, filename: str) -> None:
        # predict() gives the loss, the metrics and the generated ids in one generation pass
        output = trainer.predict(processed[name], metric_key_prefix=prefix, **generation)
        trainer.log_metrics(prefix, output.metrics)
        results.update(output.metrics)
        if trainer.is_world_process_zero():
            os.makedirs(training_args.output_dir, exist_ok=True)
            with open(os.path.join(training_args.output_dir, filename), "w", encoding="utf-8") as handle:
                handle.write("\n".join(decode(output.predictions)) + "\n")

    if training_args.do_eval:
        if training_args.predict_with_generate:
            predict("validation", "eval", "eval_generated_predictions.txt")
        else:
            results.update(trainer.evaluate())
    if training_args.do_predict:
        if not training_args.predict_with_generate:
            raise ValueError("--do_predict writes generated translations: add --predict_with_generate")
        predict("test" if "test" in processed else "validation", "predict", "generated_predictions.txt")

    card = dict(
        base_model=base_model,
        datasets=[data_args.dataset_name] if data_args.dataset_name else None,
        metrics=["bleu", "chrf"],
        command=recipe_command("recipes/run_translation_gpam.py", argv),
        repo_id=training_args.hub_model_id,
        summary=(
            f"A {src} -> {tgt} translation model with daGPAM attention, trained with hf_gpam's "
            "run_translation_gpam recipe."
        ),
        limitations=(
            "Trained on "
            + (data_args.dataset_name or data_args.train_file or "the generated number-words task (embedded default)")
            + f" for {trainer.state.global_step} steps; BLEU/chrF above are sacreBLEU corpus scores on that "
            "run's validation data only."
        ),
        template_path=TRANSLATION_TEMPLATE_PATH,
    )
    write_outputs(trainer, trainer.model, tokenizer, model_args, results, card)
    push_folder(trainer, "run_translation_gpam: end of training")
    if trainer.is_world_process_zero():
        rows = [("held-out loss", before_after(results, "init_eval_loss", "eval_loss"))]
        if "eval_bleu" in results:
            rows.append(("BLEU / chrF", f"{results['eval_bleu']:.1f} / {results.get('eval_chrf', float('nan')):.1f}"))
        if "train_runtime" in results:
            rows.append(("training time", f"{results['train_runtime']:.0f} s"))
        output_dir = training_args.output_dir
        if model_args.use_lora and not model_args.merge_lora:
            commands = ["the folder holds a LoRA adapter: rerun with --merge_lora for a full daGPAM checkpoint"]
        else:
            # the embedded task's kind of input; any sentence of --source_lang for other data
            sample = "seven cars" if output_dir == DEFAULT_OUTPUT_DIR else "your sentence"
            commands = [
                f"python -c \"import hf_gpam, transformers as t; m = t.AutoModelForSeq2SeqLM.from_pretrained('{output_dir}'); "
                f"k = t.AutoTokenizer.from_pretrained('{output_dir}'); "
                f"print(k.batch_decode(m.generate(**k(['{sample}'], return_tensors='pt')), skip_special_tokens=True))\"",
                f"hf-gpam diagnose {output_dir} --text '{sample}' --output_dir {output_dir}/diagnostics",
            ]
        print_closing_summary(
            f"run_translation_gpam: {results['gpam_mode']} {model.config.model_type.removeprefix('gpam_')}, "
            f"{trainer.state.global_step} steps",
            rows, gpam_lambda_values(trainer.model), output_dir, commands,
        )
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
