"""The training recipes, end to end on tiny models: each ``main()`` is called with a small argv, and the results
are read back from ``all_results.json`` and from the saved folder reloaded with ``trust_remote_code``."""

import importlib.util
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartForConditionalGeneration,
    GPT2LMHeadModel,
    HfArgumentParser,
    LlamaForCausalLM,
)

import hf_gpam

from hf_gpam.data import (
    number_translation_pairs,
    stdlib_docstring_corpus,
    train_byte_level_bpe,
    train_marian_sentencepiece,
)
from hf_gpam.hub import hub_ready_problems
from hf_gpam.testing_utils import HIDE_HF_GPAM_PRELUDE, tiny_config_overrides, tiny_gpam_config, tiny_stock_config


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
sys.path.insert(0, str(RECIPES))

import gpam_recipe_utils  # noqa: E402
import run_clm_gpam  # noqa: E402
import run_translation_gpam  # noqa: E402


TINY_GPT2 = "n_layer=2,n_embd=32,n_head=4,n_positions=64"
TINY_SEQ2SEQ = (
    "d_model=32,encoder_layers=1,decoder_layers=1,encoder_attention_heads=4,decoder_attention_heads=4,"
    "encoder_ffn_dim=64,decoder_ffn_dim=64,max_position_embeddings=64"
)
FAST = ["--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "True"]


# one intra-op thread for these tiny end-to-end runs (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clm_data")
    corpus = stdlib_docstring_corpus(max_chars=30_000)
    (folder / "train.txt").write_text("\n".join(corpus[:-20]) + "\n")
    (folder / "validation.txt").write_text("\n".join(corpus[-20:]) + "\n")
    return folder


@pytest.fixture(scope="module")
def translation_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("translation_data")
    for name, n, seed in (("train", 300, 0), ("validation", 12, 1)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for pair in number_translation_pairs(n, seed=seed):
                handle.write(json.dumps(pair, ensure_ascii=False) + "\n")
    return folder


def clm_args(text_files, output_dir, *extra):
    return [
        "--model_type", "gpt2", "--config_overrides", TINY_GPT2, "--tokenizer_vocab_size", "300",
        "--train_file", str(text_files / "train.txt"), "--validation_file", str(text_files / "validation.txt"),
        "--block_size", "32", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--learning_rate", "3e-3", "--do_train", "--do_eval", "--output_dir", str(output_dir), *FAST, *extra,
    ]


def read_results(output_dir) -> dict:
    return json.loads((Path(output_dir) / "all_results.json").read_text())


def test_clm_from_scratch_trains_and_saves_hub_ready_folder(text_files, tmp_path):
    results = run_clm_gpam.main(clm_args(text_files, tmp_path / "out", "--max_steps", "8"))
    saved = read_results(tmp_path / "out")
    assert saved["world_size"] == 1 and saved["gpam_mode"] == "dagpam"
    assert saved["perplexity"] == pytest.approx(math.exp(saved["eval_loss"]))
    assert saved["eval_loss"] < saved["init_eval_loss"], "8 steps at lr 3e-3 must lower the eval loss"
    assert saved["eval_loss"] == pytest.approx(results["eval_loss"])
    assert hub_ready_problems(tmp_path / "out") == []

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert model.config.model_type == "gpam_gpt2" and model.config.use_cache is True
    # λ was trained (started at 0.5) and the card and all_results report the values the checkpoint holds
    lam = model.transformer.h[0].attn.gpam_lambda.weight
    assert not torch.allclose(lam, torch.full_like(lam, 0.5))
    assert saved["gpam_lambdas"]["transformer.h.0.attn"] == pytest.approx(lam.tolist())
    card = (tmp_path / "out" / "README.md").read_text()
    assert "python recipes/run_clm_gpam.py --model_type gpt2" in card and "- gpam" in card

    # the output folder is a GPAM checkpoint: training continues from it, keeping its gpam_* settings
    run_clm_gpam.main([
        "--model_name_or_path", str(tmp_path / "out"), "--train_file", str(text_files / "train.txt"),
        "--validation_file", str(text_files / "validation.txt"), "--block_size", "32", "--max_steps", "2",
        "--do_train", "--do_eval", "--gpam_layers", "0",
        "--output_dir", str(tmp_path / "continued"), *FAST,
    ])
    continued = read_results(tmp_path / "continued")
    # same weights, same evaluation blocks: the continued run starts where the first one ended
    assert continued["init_eval_loss"] == pytest.approx(saved["eval_loss"], rel=1e-5)
    config = json.loads((tmp_path / "continued" / "config.json").read_text())
    assert config["model_type"] == "gpam_gpt2" and config["gpam_layers"] is None
    assert f"base_model: {tmp_path / 'out'}" in (tmp_path / "continued" / "README.md").read_text()


def test_translation_from_scratch_with_json_config_generate_and_beams(translation_files, tmp_path):
    args = {
        "model_type": "marian", "config_overrides": TINY_SEQ2SEQ, "tokenizer_vocab_size": 200,
        "train_file": str(translation_files / "train.jsonl"),
        "validation_file": str(translation_files / "validation.jsonl"),
        "source_lang": "en", "target_lang": "de", "max_steps": 6, "per_device_train_batch_size": 8,
        "learning_rate": 3e-3, "do_train": True, "do_eval": True, "predict_with_generate": True, "num_beams": 2,
        "val_max_target_length": 24, "output_dir": str(tmp_path / "out"), "report_to": "none", "save_strategy": "no",
    }
    (tmp_path / "args.json").write_text(json.dumps(args))
    run_translation_gpam.main([str(tmp_path / "args.json")])
    saved = read_results(tmp_path / "out")
    assert saved["num_beams"] == 2 and 0.0 <= saved["eval_bleu"] <= 100.0 and 0.0 <= saved["eval_chrf"] <= 100.0
    assert saved["eval_loss"] < saved["init_eval_loss"]
    predictions = (tmp_path / "out" / "eval_generated_predictions.txt").read_text().splitlines()
    assert len(predictions) == 12
    assert hub_ready_problems(tmp_path / "out") == []
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert model.config.model_type == "gpam_marian" and len(model.gpam_lambdas()) == 3


def test_translation_patches_stock_bart_and_softmax_baseline(translation_files, tmp_path):
    torch.manual_seed(0)
    texts = [p["translation"][lang] for p in number_translation_pairs(300) for lang in ("en", "de")]
    tokenizer = train_byte_level_bpe(texts, vocab_size=400, model_type="bart", save_directory=str(tmp_path / "bart"))
    stock = BartForConditionalGeneration(tiny_stock_config("bart", vocab_size=len(tokenizer)))
    stock.save_pretrained(tmp_path / "bart")
    common = [
        "--model_name_or_path", str(tmp_path / "bart"), "--train_file", str(translation_files / "train.jsonl"),
        "--validation_file", str(translation_files / "validation.jsonl"), "--max_steps", "2",
        "--do_train", "--do_eval", *FAST,
    ]
    run_translation_gpam.main([*common, "--output_dir", str(tmp_path / "dagpam"), "--gpam_layers", "0"])
    config = json.loads((tmp_path / "dagpam" / "config.json").read_text())
    assert config["model_type"] == "gpam_bart" and config["gpam_lambda_init"] == 0.0 and config["gpam_layers"] == [0]
    assert "facebook" not in (tmp_path / "dagpam" / "README.md").read_text()
    assert f"base_model: {tmp_path / 'bart'}" in (tmp_path / "dagpam" / "README.md").read_text()

    run_translation_gpam.main([*common, "--output_dir", str(tmp_path / "softmax"), "--gpam_mode", "softmax"])
    weights = load_file(tmp_path / "softmax" / "model.safetensors")
    assert read_results(tmp_path / "softmax")["gpam_mode"] == "softmax"
    assert not [k for k in weights if "gpam_" in k], "the softmax baseline must not carry daGPAM parameters"


def test_lora_targets_gpam_parameters_and_merges(text_files, tmp_path):
    torch.manual_seed(0)
    stock_dir = tmp_path / "gpt2"
    tokenizer = train_byte_level_bpe(
        stdlib_docstring_corpus(max_chars=30_000), vocab_size=300, model_type="gpt2", save_directory=str(stock_dir)
    )
    GPT2LMHeadModel(tiny_stock_config("gpt2", vocab_size=len(tokenizer))).save_pretrained(stock_dir)
    out = tmp_path / "lora"
    run_clm_gpam.main([
        "--model_name_or_path", str(stock_dir), "--train_file", str(text_files / "train.txt"),
        "--validation_file", str(text_files / "validation.txt"), "--block_size", "32", "--max_steps", "4",
        "--learning_rate", "5e-2", "--per_device_train_batch_size", "4", "--do_train", "--do_eval",
        "--use_lora", "--merge_lora", "--output_dir", str(out), *FAST,
    ])
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {"c_attn", "c_proj", "gpam_q_neg"} <= set(adapter_config["target_modules"])
    assert adapter_config["modules_to_save"] == ["gpam_lambda"]
    adapter_weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("gpam_q_neg.lora_A" in k for k in adapter_weights)
    assert any("gpam_lambda" in k for k in adapter_weights)

    merged = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert hub_ready_problems(out) == []
    assert not any("lora" in name for name, _ in merged.named_parameters())
    # patched at λ = 0; λ trained through modules_to_save must have moved and been merged into the model
    lam = merged.transformer.h[1].attn.gpam_lambda.weight
    assert lam.abs().max() > 1e-4
    assert read_results(out)["gpam_lambdas"]["transformer.h.1.attn"] == pytest.approx(lam.tolist())


def test_lora_adapter_only_output(text_files, tmp_path):
    out = tmp_path / "adapter_only"
    run_clm_gpam.main([*clm_args(text_files, out, "--max_steps", "1", "--eval_before_training", "False"), "--use_lora"])
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "all_results.json"} <= files
    assert "model.safetensors" not in files
    assert "peft.PeftModel.from_pretrained" in (out / "README.md").read_text()


def test_next_commands_name_the_environment_that_ran_the_recipe(tmp_path, monkeypatch):
    """make runs .venv/bin/python without activating .venv: the printed commands must run there, not on PATH."""
    venv = tmp_path / "repo" / ".venv"
    (venv / "bin").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "executable", str(venv / "bin" / "python"))
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    merged = gpam_recipe_utils.ModelArguments(use_lora=True, merge_lora=True)
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else found(name, *a))
    commands = run_clm_gpam.next_commands("out", merged, "Hi there?")
    assert commands == [
        ".venv/bin/python recipes/chat_gpam.py out 'Hi there?'",
        ".venv/bin/pip install 'hf_gpam[serving]'   # once: FastAPI and Uvicorn",
        ".venv/bin/hf-gpam serve out",
        ".venv/bin/hf-gpam diagnose out --text 'Hi there?' --output_dir out/diagnostics",
    ]
    # activated (VIRTUAL_ENV names it) and with the serving extra: bare names, no install line
    monkeypatch.setenv("VIRTUAL_ENV", str(venv))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert run_clm_gpam.next_commands("out", merged, None)[:2] == [
        "python recipes/chat_gpam.py out 'The attention mechanism'", "hf-gpam serve out"]
    # a virtual environment elsewhere is named by its absolute path
    monkeypatch.delenv("VIRTUAL_ENV")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert run_clm_gpam.environment_command("hf-gpam") == str(venv / "bin" / "hf-gpam")


@pytest.mark.parametrize("model_type", ["bart", "marian"])
def test_lora_default_targets_seq2seq(model_type):
    import hf_gpam

    torch.manual_seed(0)
    model_class = hf_gpam.ARCHITECTURES[model_type].auto_classes[AutoModelForSeq2SeqLM]
    model = model_class(hf_gpam.testing_utils.tiny_gpam_config(model_type))
    model_args = gpam_recipe_utils.ModelArguments(use_lora=True)
    peft_model = gpam_recipe_utils.apply_lora(model, model_args, task_type="SEQ_2_SEQ_LM")
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    for target in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "gpam_q_neg"):
        assert any(f".{target}.lora_A" in name for name in trainable), target
    # 6 attention modules (2 encoder self, 2 decoder self, 2 cross), each with a trained copy of λ
    assert sum("gpam_lambda.modules_to_save" in name for name in trainable) == 6
    ids = torch.randint(3, 90, (2, 7))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    lam_grads = [p.grad for name, p in peft_model.named_parameters() if "gpam_lambda.modules_to_save" in name]
    assert all(g is not None and g.abs().sum() > 0 for g in lam_grads), "λ must receive gradients through PEFT"
    # LoRA on W⁻ must take part in the forward (lora_B starts at 0, so its gradient is the first to be non-zero)
    w_neg_grads = [p.grad for name, p in peft_model.named_parameters() if "gpam_q_neg.lora_B" in name]
    assert len(w_neg_grads) == 6 and all(g is not None and g.abs().sum() > 0 for g in w_neg_grads)


CAUSAL_LM_FAMILIES = [t for t, row in hf_gpam.ARCHITECTURES.items() if row.task == "causal-lm" and t != "gpt2"]
TINY_LLAMA = (
    "num_hidden_layers=2,hidden_size=64,num_attention_heads=4,num_key_value_heads=2,intermediate_size=128,"
    "max_position_embeddings=128"
)


def test_clm_llama_from_scratch(text_files, tmp_path):
    out = tmp_path / "llama"
    args = clm_args(text_files, out, "--max_steps", "8")
    args[args.index("gpt2")], args[args.index(TINY_GPT2)] = "llama", TINY_LLAMA
    run_clm_gpam.main(args)
    saved = read_results(out)
    assert saved["eval_loss"] < saved["init_eval_loss"], "8 steps at lr 3e-3 must lower the eval loss"
    assert hub_ready_problems(out) == []
    config = json.loads((out / "config.json").read_text())
    # the overrides reach the constructor: head_dim follows hidden_size / num_attention_heads (64 / 4), GQA kept
    assert (config["model_type"], config["head_dim"], config["num_key_value_heads"]) == ("gpam_llama", 16, 2)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert config["eos_token_id"] == config["bos_token_id"] == tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "GpamLlamaForCausalLM"
    assert saved["gpam_lambdas"]["model.layers.0.self_attn"] == pytest.approx(
        model.model.layers[0].self_attn.gpam_lambda.weight.tolist()
    )
    card = (out / "README.md").read_text()
    # the causal-LM card template, naming the family
    assert "This is a causal language model whose attention uses **daGPAM**" in card
    assert "A Llama causal language model with daGPAM attention" in card


@pytest.fixture(scope="module")
def stock_llama_dir(tmp_path_factory):
    """A tiny stock LlamaForCausalLM saved with save_pretrained, next to a byte-level BPE tokenizer."""
    folder = tmp_path_factory.mktemp("stock_llama")
    tokenizer = train_byte_level_bpe(
        stdlib_docstring_corpus(max_chars=30_000), vocab_size=300, model_type="gpt2", save_directory=str(folder)
    )
    torch.manual_seed(0)
    config = tiny_stock_config(
        "llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def validation_blocks(text_files, tokenizer, count: int, block_size: int) -> torch.Tensor:
    # the recipe's evaluation blocks, rebuilt by hand: non-blank lines, each ended by the end-of-text token
    lines = (text_files / "validation.txt").read_text().splitlines(keepends=True)
    ids = tokenizer([line for line in lines if line.strip()], add_special_tokens=False)["input_ids"]
    stream = [token for document in ids for token in document + [tokenizer.eos_token_id]]
    return torch.tensor(stream[: count * block_size]).view(count, block_size)


def test_clm_llama_from_a_stock_checkpoint(text_files, stock_llama_dir, tmp_path):
    out = tmp_path / "continued"
    run_clm_gpam.main([
        "--model_name_or_path", str(stock_llama_dir), "--train_file", str(text_files / "train.txt"),
        "--validation_file", str(text_files / "validation.txt"), "--block_size", "32", "--max_steps", "6",
        "--max_eval_samples", "4", "--learning_rate", "3e-3", "--per_device_train_batch_size", "4",
        "--do_train", "--do_eval", "--output_dir", str(out), *FAST,
    ])
    saved = read_results(out)
    # patched at λ = 0: the first evaluation is the stock model's loss on the same blocks
    stock = LlamaForCausalLM.from_pretrained(stock_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(stock_llama_dir)
    blocks = validation_blocks(text_files, tokenizer, 4, 32)
    with torch.no_grad():
        stock_loss = stock(blocks, labels=blocks).loss.item()
    assert saved["init_eval_loss"] == pytest.approx(stock_loss, rel=1e-5)
    assert saved["eval_loss"] < saved["init_eval_loss"]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.config.model_type == "gpam_llama" and model.config.gpam_lambda_init == 0.0
    assert max(abs(v) for v in model.model.layers[1].self_attn.gpam_lambda.weight.tolist()) > 1e-4, "λ must train"
    assert f"base_model: {stock_llama_dir}" in (out / "README.md").read_text()


def test_clm_llama_lora_from_a_stock_checkpoint(text_files, stock_llama_dir, tmp_path):
    out = tmp_path / "lora"
    run_clm_gpam.main([
        "--model_name_or_path", str(stock_llama_dir), "--train_file", str(text_files / "train.txt"),
        "--validation_file", str(text_files / "validation.txt"), "--block_size", "32", "--max_steps", "3",
        "--max_eval_samples", "4", "--learning_rate", "5e-2", "--do_train", "--do_eval", "--use_lora",
        "--merge_lora", "--output_dir", str(out), *FAST,
    ])
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "v_proj", "gpam_q_neg"}
    assert adapter_config["modules_to_save"] == ["gpam_lambda"] and adapter_config["fan_in_fan_out"] is False
    merged = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert hub_ready_problems(out) == [] and not any("lora" in name for name, _ in merged.named_parameters())
    assert merged.model.layers[1].self_attn.gpam_lambda.weight.abs().max() > 1e-4, "λ trains through modules_to_save"


@pytest.mark.parametrize("model_type", CAUSAL_LM_FAMILIES)
def test_every_causal_family_builds_from_scratch(model_type):
    tokenizer = train_byte_level_bpe(["the cat sat on the mat"] * 10, vocab_size=270)
    model_args = gpam_recipe_utils.ModelArguments(
        model_type=model_type, config_overrides=tiny_config_overrides(model_type)
    )
    config = gpam_recipe_utils.scratch_config(model_args, gpam_recipe_utils.GpamArguments(), tokenizer)
    assert config.model_type == f"gpam_{model_type}" and config.vocab_size == len(tokenizer)
    assert config.eos_token_id == config.bos_token_id == config.pad_token_id == tokenizer.eos_token_id
    assert (config.num_hidden_layers, config.hidden_size) == (2, 32)
    model = AutoModelForCausalLM.from_config(config)
    ids = tokenizer(["the cat sat"], return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids, labels=ids).loss)
    assert gpam_recipe_utils.log_training_footprint(model)["parameters"] < 100_000


@pytest.mark.parametrize("model_type", CAUSAL_LM_FAMILIES)
def test_lora_default_targets_of_every_causal_family(model_type):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_gpam_config(model_type))
    targets = gpam_recipe_utils.default_lora_targets(model.config.model_type)
    row = hf_gpam.ARCHITECTURES[model_type]
    assert targets == [*row.lora_targets, "gpam_q_neg"]
    module_names = [name for name, _ in model.named_modules()]
    for target in targets:
        assert any(name.endswith("." + target) for name in module_names), f"{target} is no module of {model_type}"
    peft_model = gpam_recipe_utils.apply_lora(model, gpam_recipe_utils.ModelArguments(use_lora=True), "CAUSAL_LM")
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    layers = model.config.num_hidden_layers
    for target in targets:
        assert sum(f".{target}.lora_A" in name for name in trainable) == layers, target
    assert sum("gpam_lambda.modules_to_save" in name for name in trainable) == layers


def test_resume_continues_a_stopped_run_exactly(text_files, tmp_path):
    args = clm_args(text_files, tmp_path / "run", "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3",
                    "--eval_before_training", "False")
    run_clm_gpam.main(args)
    uninterrupted = load_file(tmp_path / "run" / "model.safetensors")
    # as if the run had been killed between step 3 and step 6
    shutil.rmtree(tmp_path / "run" / "checkpoint-6")
    (tmp_path / "run" / "model.safetensors").unlink()
    run_clm_gpam.main([*args, "--resume_from_checkpoint", "True"])
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert min(entry["step"] for entry in state["log_history"] if "loss" in entry) == 1
    resumed = load_file(tmp_path / "run" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-5, rtol=1e-4, msg=name)


def test_clear_errors(text_files, translation_files, tmp_path):
    base = clm_args(text_files, tmp_path / "err", "--max_steps", "1")
    with pytest.raises(ValueError, match="checkpoint folder .* does not exist"):
        run_clm_gpam.main([*base, "--resume_from_checkpoint", str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="no checkpoint-\\* folder found"):
        run_clm_gpam.main([*base, "--resume_from_checkpoint", "True"])
    with pytest.raises(ValueError, match="--train_file: data file .* does not exist"):
        run_clm_gpam.main([*base, "--train_file", str(tmp_path / "missing.txt")])
    unknown_language = "--target_lang 'fr' is not a language of the train data \\(languages: de, en\\)"
    with pytest.raises(ValueError, match=unknown_language):
        run_translation_gpam.main([
            "--model_type", "marian", "--train_file", str(translation_files / "train.jsonl"), "--target_lang", "fr",
            "--output_dir", str(tmp_path / "err2"), "--do_train",
        ])
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported by this recipe"):
        run_translation_gpam.main([
            "--model_type", "gpt2", "--config_overrides", TINY_GPT2, "--train_file",
            str(translation_files / "train.jsonl"), "--output_dir", str(tmp_path / "err3"), "--do_train",
        ])
    with pytest.raises(ValueError, match="--model_type 't5' is not supported"):
        run_clm_gpam.main([*base, "--model_type", "t5"])

    # a checkpoint of a wider model cannot be resumed into this one
    run_clm_gpam.main(clm_args(text_files, tmp_path / "wide", "--max_steps", "2", "--save_strategy", "steps",
                               "--save_steps", "2", "--eval_before_training", "False", "--do_eval", "False"))
    narrow = [*clm_args(text_files, tmp_path / "narrow", "--max_steps", "4"), "--config_overrides",
              "n_layer=2,n_embd=16,n_head=4,n_positions=64", "--tokenizer_name", str(tmp_path / "wide")]
    mismatch = "does not match the model of this run .*c_attn.weight: checkpoint \\(32, 96\\), model \\(16, 48\\)"
    with pytest.raises(ValueError, match=mismatch):
        run_clm_gpam.main([*narrow, "--resume_from_checkpoint", str(tmp_path / "wide" / "checkpoint-2")])

    # a stock checkpoint of an architecture the recipe cannot train
    BartForConditionalGeneration(tiny_stock_config("bart")).save_pretrained(tmp_path / "bart")
    with pytest.raises(ValueError, match="run_clm_gpam: architecture 'bart' is not supported .*supported: gpt2"):
        run_clm_gpam.main([*base[4:], "--model_name_or_path", str(tmp_path / "bart"), "--tokenizer_name",
                           str(tmp_path / "wide")])


def test_embedded_defaults_build_and_tokenize(tmp_path):
    """No model and no data arguments: the embedded corpus / task and the demo defaults are used (shrunk here)."""
    results = run_clm_gpam.main([
        "--output_dir", str(tmp_path / "clm"), "--max_steps", "1", "--default_corpus_chars", "20000",
        "--config_overrides", "n_layer=1,n_embd=32,n_head=4,n_positions=64", "--block_size", "64",
        "--tokenizer_vocab_size", "300", "--max_eval_samples", "2", "--eval_before_training", "False", *FAST,
    ])
    assert results["train_blocks"] > 20 and results["block_size"] == 64
    # demo defaults were applied (from scratch, daGPAM, train and eval) while the user's flags won
    assert results["gpam_mode"] == "dagpam" and "eval_loss" in results and "train_loss" in results
    assert json.loads((tmp_path / "clm" / "config.json").read_text())["n_embd"] == 32

    results = run_translation_gpam.main([
        "--output_dir", str(tmp_path / "mt"), "--max_steps", "1", "--default_train_pairs", "200",
        "--default_eval_pairs", "4", "--config_overrides", TINY_SEQ2SEQ, "--tokenizer_vocab_size", "200",
        "--val_max_target_length", "8", "--eval_before_training", "False", *FAST,
    ])
    assert results["train_pairs"] == 200 and "eval_bleu" in results
    assert (tmp_path / "mt" / "source.spm").is_file()


def test_parse_defaults_apply_only_to_the_embedded_run():
    parsed = gpam_recipe_utils.parse_arguments(
        (gpam_recipe_utils.ModelArguments, gpam_recipe_utils.GpamArguments, run_clm_gpam.DataTrainingArguments,
         run_clm_gpam.TrainingArguments),
        ["--model_name_or_path", "gpt2", "--dataset_name", "wikitext"],
        base_defaults={"output_dir": "outputs/x"}, demo_defaults=run_clm_gpam.DEMO_DEFAULTS,
        is_demo=gpam_recipe_utils.is_demo,
    )
    model_args, gpam_args, data_args, training_args = parsed
    assert training_args.output_dir == "outputs/x" and training_args.max_steps == -1
    assert model_args.model_type is None and gpam_args.options() == {
        "gpam_mode": "dagpam", "gpam_tie_lambda": True, "gpam_lambda_trainable": True,
        "gpam_negative_init": "neg_identity", "gpam_attention_types": ["self", "cross"], "gpam_lambda_neg_init": None,
        "gpam_rope_variant": "relative",
    }


def test_gpam_arguments_mirror_the_config_fields():
    from dataclasses import fields

    from hf_gpam.modeling.gpam_config_fields import GpamConfigFields

    assert [f.name for f in fields(gpam_recipe_utils.GpamArguments)] == [f.name for f in fields(GpamConfigFields)]


@pytest.mark.parametrize("gpam_weight_decay", [False, True], ids=["w_neg_no_decay", "w_neg_decay"])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_recipe_trainer_optimizer_groups(tmp_path, gpam_weight_decay, use_lora):
    """λ never decays; W⁻ decays only with --gpam_weight_decay; the stock rule (biases, LayerNorms) still holds."""
    import hf_gpam
    from transformers import TrainingArguments

    model = hf_gpam.ARCHITECTURES["gpt2"].auto_classes[AutoModelForCausalLM](tiny_gpam_config("gpt2"))
    flags = ["--output_dir", str(tmp_path), "--weight_decay", "0.1", "--report_to", "none"]
    flags += (["--gpam_weight_decay"] if gpam_weight_decay else []) + (["--use_lora"] if use_lora else [])
    parser = HfArgumentParser((gpam_recipe_utils.ModelArguments, TrainingArguments))
    model_args, training_args = parser.parse_args_into_dataclasses(args=flags)
    assert model_args.gpam_weight_decay is gpam_weight_decay
    if use_lora:
        model = gpam_recipe_utils.apply_lora(model, model_args, task_type="CAUSAL_LM")
    trainer = gpam_recipe_utils.GpamTrainer(
        model=model, args=training_args, gpam_weight_decay=model_args.gpam_weight_decay
    )
    decayed, not_decayed = trainer.create_optimizer().param_groups
    assert (decayed["weight_decay"], not_decayed["weight_decay"]) == (0.1, 0.0)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decayed["params"]}
    not_decayed = {names[id(p)] for p in not_decayed["params"]}
    assert decayed | not_decayed == {name for name, p in model.named_parameters() if p.requires_grad}
    lambdas = {n for n in decayed | not_decayed if ".gpam_lambda." in n}
    w_neg = {n for n in decayed | not_decayed if ".gpam_q_neg." in n}
    assert len(lambdas) == 2 and len(w_neg) == (4 if use_lora else 2)
    assert lambdas <= not_decayed
    assert w_neg <= (decayed if gpam_weight_decay else not_decayed)
    projection = ".c_attn.lora_A." if use_lora else ".c_attn.weight"
    assert any(projection in n for n in decayed)
    assert not any(n.endswith(".bias") or ".ln_" in n for n in decayed)


def test_lora_refuses_target_modules_it_cannot_find():
    import hf_gpam

    model_class = hf_gpam.ARCHITECTURES["gpt2"].auto_classes[AutoModelForCausalLM]
    model = model_class(tiny_gpam_config("gpt2"))
    model_args = gpam_recipe_utils.ModelArguments(use_lora=True, lora_target_modules=["c_attn", "q_proj", "qkv"])
    refused = (
        "--lora_target_modules: 'q_proj', 'qkv' match no module of this gpam_gpt2 model; candidates \\(its Linear "
        "/ Conv1D layers\\): c_attn, c_fc, c_proj, gpam_q_neg, lm_head"
    )
    with pytest.raises(ValueError, match=refused):
        gpam_recipe_utils.apply_lora(model, model_args, task_type="CAUSAL_LM")

    # a softmax-mode model has no W⁻: asked for, it is refused; as a default target, it is skipped
    softmax = model_class(tiny_gpam_config("gpt2", gpam_mode="softmax"))
    asked = gpam_recipe_utils.ModelArguments(use_lora=True, lora_target_modules=["c_attn", "gpam_q_neg"])
    with pytest.raises(ValueError, match="'gpam_q_neg' matches no module"):
        gpam_recipe_utils.apply_lora(softmax, asked, task_type="CAUSAL_LM")
    wrapped = gpam_recipe_utils.apply_lora(
        softmax, gpam_recipe_utils.ModelArguments(use_lora=True), task_type="CAUSAL_LM"
    )
    assert set(wrapped.peft_config["default"].target_modules) == {"c_attn", "c_proj", "c_fc"}

    # full dotted names and suffixes are module names too (PEFT matches them as suffixes)
    model = model_class(tiny_gpam_config("gpt2"))
    dotted = gpam_recipe_utils.ModelArguments(use_lora=True, lora_target_modules=["attn.c_proj", "h.1.mlp.c_fc"])
    wrapped = gpam_recipe_utils.apply_lora(model, dotted, task_type="CAUSAL_LM")
    lora = {n for n, _ in wrapped.named_parameters() if "lora_A" in n}
    assert len(lora) == 3 and not any(".mlp.c_proj." in n for n in lora)


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.txt", ""), ("blank.txt", "\n   \n\t\n"), ("blank.jsonl", "\n\n"), ("header_only.csv", "text\n\n"),
        ("empty_array.json", "[\n  ]\n"),
    ],
    ids=lambda value: value.split(".")[0] if "." in value else None,
)
@pytest.mark.parametrize("flag", ["--train_file", "--validation_file"])
def test_empty_data_file_is_named(tmp_path, text_files, name, content, flag):
    path = tmp_path / name
    path.write_text(content)
    extension = name.rsplit(".", 1)[1]
    good = tmp_path / f"good.{extension}"
    good.write_text({"txt": "some text\n", "jsonl": '{"text": "some text"}\n', "csv": "text\nsome text\n",
                     "json": '[{"text": "some text"}]'}[extension])
    files = {"--train_file": good, "--validation_file": good, flag: path}
    argv = [*clm_args(text_files, tmp_path / "out", "--max_steps", "1"), "--train_file", str(files["--train_file"]),
            "--validation_file", str(files["--validation_file"])]
    with pytest.raises(ValueError, match=f"{flag}: data file '{path}' is empty"):
        run_clm_gpam.main(argv)


def test_all_blank_text_column_and_empty_translation_file_are_named(tmp_path, text_files, translation_files):
    good, blank = tmp_path / "good.jsonl", tmp_path / "blank_texts.jsonl"
    good.write_text('{"text": "some text"}\n')
    blank.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(ValueError, match=f"--validation_file: every 'text' value in '{blank}' is empty or blank"):
        run_clm_gpam.main([*clm_args(text_files, tmp_path / "out", "--max_steps", "1"),
                           "--train_file", str(good), "--validation_file", str(blank)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"--validation_file: data file '{empty}' is empty"):
        run_translation_gpam.main([
            "--model_type", "marian", "--train_file", str(translation_files / "train.jsonl"),
            "--validation_file", str(empty), "--output_dir", str(tmp_path / "mt"), "--do_train",
        ])


INVALID_ROWS = [
    {"translation": {"en": "One apple.", "de": "Ein Apfel."}},
    None,  # a blank line: not a row, but it counts in the file's line numbers
    {"translation": {"en": "Two apples."}},
    {"translation": {"en": "Three apples.", "de": "Drei Äpfel."}},
    {"translation": {"en": "  ", "de": "Vier Äpfel."}},
    {"translation": {"en": "Five apples.", "de": "Fünf Äpfel."}},
]


def write_rows(path, rows, as_array: bool):
    if as_array:
        # one element per line, so that line numbers match the JSON Lines layout
        lines = ["["] + [("" if row is None else json.dumps(row, ensure_ascii=False) + ",") for row in rows]
        lines[-1] = lines[-1].rstrip(",")
        path.write_text("\n".join(lines + ["]"]) + "\n")
    else:
        path.write_text("\n".join("" if row is None else json.dumps(row, ensure_ascii=False) for row in rows) + "\n")


@pytest.mark.parametrize("as_array", [False, True], ids=["jsonl", "json_array"])
def test_translation_rows_are_all_checked_with_line_numbers(tmp_path, as_array, caplog):
    from types import SimpleNamespace

    path = tmp_path / ("train.json" if as_array else "train.jsonl")
    write_rows(path, INVALID_ROWS, as_array)
    offset = 1 if as_array else 0  # the array's "[" line
    data_args = run_translation_gpam.DataTrainingArguments(train_file=str(path), validation_file=str(path))
    model_args, training_args = SimpleNamespace(cache_dir=str(tmp_path / "cache")), SimpleNamespace(seed=0)
    expected = (
        f"'{path}': 2 of 5 rows lack a non-empty 'en' or 'de' text \\(line {3 + offset}: no 'de' text; "
        f"line {5 + offset}: empty 'en' text\\). Fix them, or pass --skip_invalid_rows"
    )
    with pytest.raises(ValueError, match=expected):
        run_translation_gpam.load_raw_datasets(data_args, model_args, training_args)

    data_args.skip_invalid_rows = True
    with caplog.at_level("WARNING"):
        raw, skipped = run_translation_gpam.load_raw_datasets(data_args, model_args, training_args)
    assert skipped == {"train": 2, "validation": 2}
    assert [row["translation"]["en"] for row in raw["train"]] == ["One apple.", "Three apples.", "Five apples."]
    assert f"--skip_invalid_rows: skipped 2 of 5 rows of '{path}'" in caplog.text


def test_skipped_rows_and_model_size_are_reported(tmp_path, translation_files, caplog):
    """The count of skipped rows lands in all_results.json, and the model size and memory are logged (at the
    recipe's default log level) before any training step. No step is needed to see either."""
    train = tmp_path / "train.jsonl"
    train.write_text((translation_files / "train.jsonl").read_text() + json.dumps({"translation": {"en": "x"}}) + "\n")
    argv = ["--model_type", "marian", "--config_overrides", TINY_SEQ2SEQ, "--tokenizer_vocab_size", "200",
            "--train_file", str(train), "--validation_file", str(translation_files / "validation.jsonl"),
            "--output_dir", str(tmp_path / "out"), *FAST]
    with pytest.raises(ValueError, match="line 301: no 'de' text"):
        run_translation_gpam.main(argv)
    run_translation_gpam.main([*argv, "--skip_invalid_rows"])
    results = read_results(tmp_path / "out")
    assert results["skipped_invalid_rows"] == {"train": 1} and results["train_pairs"] == 300
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    count = sum(p.numel() for p in model.parameters())
    size_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model: ")]
    assert len(size_lines) == 1, "the refused run stops before the model is built"
    # Marian's sinusoidal position embeddings are frozen during training
    logged = re.match(r"model: ([\d,]+) parameters \(([\d,]+) trainable\); weights 0\.00 GiB, \+ gradients \+ "
                      r"AdamW state ≈ 0\.00 GiB", size_lines[0])
    assert logged and int(logged[1].replace(",", "")) == count and int(logged[2].replace(",", "")) < count


def test_sharded_checkpoint_is_checked(tmp_path):
    import hf_gpam

    model_class = hf_gpam.ARCHITECTURES["gpt2"].auto_classes[AutoModelForCausalLM]
    model_class(tiny_gpam_config("gpt2", n_embd=64)).save_pretrained(tmp_path / "wide", max_shard_size="40KB")
    assert (tmp_path / "wide" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "wide" / "model.safetensors").exists()
    narrow = model_class(tiny_gpam_config("gpt2"))
    # c_attn of layer 1 lives in a later shard than the first one: every shard is read
    with pytest.raises(ValueError, match="\\(sharded model\\) does not match .*h.1.attn.c_attn.weight: checkpoint "
                                         "\\(64, 192\\), model \\(32, 96\\)"):
        gpam_recipe_utils.check_checkpoint_matches(str(tmp_path / "wide"), narrow)
    gpam_recipe_utils.check_checkpoint_matches(str(tmp_path / "wide"), model_class(tiny_gpam_config("gpt2", n_embd=64)))


def test_lora_checkpoint_is_checked(tmp_path):
    import hf_gpam

    model_class = hf_gpam.ARCHITECTURES["gpt2"].auto_classes[AutoModelForCausalLM]

    def lora_model(**lora):
        args = gpam_recipe_utils.ModelArguments(use_lora=True, **lora)
        return gpam_recipe_utils.apply_lora(model_class(tiny_gpam_config("gpt2")), args, task_type="CAUSAL_LM")

    lora_model(lora_r=4).save_pretrained(tmp_path / "r4")
    gpam_recipe_utils.check_checkpoint_matches(str(tmp_path / "r4"), lora_model(lora_r=4))
    with pytest.raises(ValueError, match="\\(LoRA adapter\\) does not match .*c_attn.lora_A.weight: checkpoint "
                                         "\\(4, 32\\), model \\(8, 32\\)"):
        gpam_recipe_utils.check_checkpoint_matches(str(tmp_path / "r4"), lora_model(lora_r=8))
    # other targets: the adapters on W⁻ that this run would train are not in the checkpoint
    lora_model(lora_r=4, lora_target_modules=["c_attn"]).save_pretrained(tmp_path / "c_attn_only")
    with pytest.raises(ValueError, match="gpam_q_neg.lora_A.weight: checkpoint missing"):
        gpam_recipe_utils.check_checkpoint_matches(str(tmp_path / "c_attn_only"), lora_model(lora_r=4))
    with pytest.raises(ValueError, match="holds a LoRA adapter but this run trains the full model; add --use_lora"):
        gpam_recipe_utils.check_checkpoint_matches(str(tmp_path / "r4"), model_class(tiny_gpam_config("gpt2")))
    model_class(tiny_gpam_config("gpt2")).save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match="holds a model but this run trains LoRA adapters; drop --use_lora"):
        gpam_recipe_utils.check_checkpoint_matches(str(tmp_path / "full"), lora_model(lora_r=4))


def test_training_footprint_of_the_default_marian():
    """--model_type marian without --config_overrides is the ~400M-parameter Marian: the log says so up front."""
    import hf_gpam

    # what scratch_config starts from: the stock Marian defaults
    config = hf_gpam.ARCHITECTURES["marian"].config_class()
    with torch.device("meta"):
        model = hf_gpam.ARCHITECTURES["marian"].auto_classes[AutoModelForSeq2SeqLM](config)
    footprint = gpam_recipe_utils.training_footprint(model)
    assert footprint["parameters"] > 3e8
    # fp32: 4 bytes of weights per parameter, 12 more (gradient + AdamW moments) per trainable one
    expected = 4 * footprint["parameters"] + 12 * footprint["trainable_parameters"]
    assert footprint["gib"] == pytest.approx(expected / 2**30) and footprint["gib"] > 5


# runs in a fresh interpreter, with hf_gpam hidden (the prelude) unless the test imports it instead
TOKENIZER_LOAD_SCRIPT = """
import transformers

for folder, how in zip(sys.argv[1::2], sys.argv[2::2]):
    print(f"=== {folder} {how}", flush=True)
    kwargs = {"trust_remote_code": True} if how == "trust_remote_code" else {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    print(f"\\nloaded {type(tokenizer).__name__}", flush=True)
"""


def load_tokenizers_in_subprocess(tmp_path, calls, hide_hf_gpam: bool) -> dict:
    """{(folder, how): what the call printed}, from one fresh interpreter whose stdin is closed: a prompt cannot
    wait for an answer, and the timeout catches one that would."""
    prelude = HIDE_HF_GPAM_PRELUDE if hide_hf_gpam else "import sys\nimport hf_gpam\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", prelude + TOKENIZER_LOAD_SCRIPT, *[str(x) for call in calls for x in call]],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    sections = result.stdout.split("=== ")[1:]
    return {tuple(section.split("\n", 1)[0].rsplit(" ", 1)): section for section in sections}


def save_output_folder(tmp_path, model_type: str):
    """A Hub-ready folder as the recipes write it: a tiny GPAM model and a tokenizer trained here."""
    import hf_gpam
    from hf_gpam.hub import save_hub_ready

    pairs = [p["translation"] for p in number_translation_pairs(200)]
    texts = [p["en"] for p in pairs] + [p["de"] for p in pairs]
    if model_type == "gpt2":
        tokenizer = train_byte_level_bpe(texts, vocab_size=300, save_directory=str(tmp_path / "tokenizer"))
    else:
        tokenizer = train_marian_sentencepiece(texts, vocab_size=200, save_directory=str(tmp_path / "tokenizer"))
    auto_class = AutoModelForCausalLM if model_type == "gpt2" else AutoModelForSeq2SeqLM
    model_class = hf_gpam.ARCHITECTURES[model_type].auto_classes[auto_class]
    save_hub_ready(model_class(tiny_gpam_config(model_type, vocab_size=len(tokenizer))), tmp_path / model_type,
                   tokenizer=tokenizer)
    return tmp_path / model_type


CUSTOM_CODE_PROMPT = "Do you wish to run the custom code?"


def test_tokenizer_of_an_output_folder_loads_as_documented(tmp_path):
    """A recipe's output folder holds a stock tokenizer next to a GPAM config. AutoTokenizer reads the config
    first (AutoConfig, before tokenizer_config.json), so without hf_gpam it needs trust_remote_code=True, exactly
    like the model; the README and the model card say so. A bare call asks "Do you wish to run the custom code?"
    (and, unanswered, falls back to the tokenizer): this test pins that, so the docs change if it stops."""
    folder = save_output_folder(tmp_path, "gpt2")
    loads = load_tokenizers_in_subprocess(tmp_path, [(folder, "trust_remote_code"), (folder, "bare")],
                                          hide_hf_gpam=True)
    documented = loads[(str(folder), "trust_remote_code")]
    assert "loaded GPT2Tokenizer" in documented and CUSTOM_CODE_PROMPT not in documented
    assert CUSTOM_CODE_PROMPT in loads[(str(folder), "bare")]


@pytest.mark.slow
def test_tokenizer_of_a_marian_output_folder_and_with_hf_gpam_imported(tmp_path):
    """The same for a SentencePiece (Marian) folder, and the other documented way: with hf_gpam imported the GPAM
    config class is registered, so a bare AutoTokenizer call needs no remote code and asks nothing."""
    folder = save_output_folder(tmp_path, "marian")
    without = load_tokenizers_in_subprocess(tmp_path, [(folder, "trust_remote_code")], hide_hf_gpam=True)
    with_hf_gpam = load_tokenizers_in_subprocess(tmp_path, [(folder, "bare")], hide_hf_gpam=False)
    for loaded in (without[(str(folder), "trust_remote_code")], with_hf_gpam[(str(folder), "bare")]):
        assert "loaded MarianTokenizer" in loaded and CUSTOM_CODE_PROMPT not in loaded


@pytest.fixture(scope="module")
def wider_stock_llama_dir(tmp_path_factory):
    """A tiny stock Llama of width 64 (bitsandbytes' 4-bit CPU kernels need at least 64 input features)."""
    folder = tmp_path_factory.mktemp("stock_llama_64")
    tokenizer = train_byte_level_bpe(
        stdlib_docstring_corpus(max_chars=30_000), vocab_size=300, model_type="gpt2", save_directory=str(folder)
    )
    torch.manual_seed(0)
    config = tiny_stock_config(
        "llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, hidden_size=64, head_dim=16, intermediate_size=128,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_qlora_on_a_4bit_stock_llama_trains_adapters_and_lambda(text_files, wider_stock_llama_dir, tmp_path, caplog):
    # the README's "QLoRA a Llama with daGPAM" command, on a tiny stock Llama (bitsandbytes runs on the CPU)
    stock_llama_dir = wider_stock_llama_dir
    out = tmp_path / "qlora"
    with caplog.at_level(logging.INFO):
        run_clm_gpam.main([
            "--model_name_or_path", str(stock_llama_dir), "--quantization", "bnb-4bit", "--bnb_4bit_compute_dtype",
            "float32", "--use_lora", "--train_file", str(text_files / "train.txt"), "--validation_file",
            str(text_files / "validation.txt"), "--block_size", "32", "--max_steps", "3", "--max_eval_samples", "4",
            "--learning_rate", "5e-2", "--do_train", "--do_eval", "--output_dir", str(out), *FAST,
        ])
    saved = read_results(out)
    # no evaluation before training on the CPU with a 4-bit base (see evaluation_before_training_is_safe); the loss
    # after 3 steps is below the base model's (λ = 0: the quantized stock model's) loss on the same blocks
    assert "init_eval_loss" not in saved
    base = AutoModelForCausalLM.from_pretrained(
        stock_llama_dir, quantization_config=gpam_recipe_utils.quantization_config(
            gpam_recipe_utils.ModelArguments(model_name_or_path=str(stock_llama_dir), use_lora=True,
                                             quantization="bnb-4bit", bnb_4bit_compute_dtype="float32")
        ), device_map="cpu",
    ).eval()
    blocks = validation_blocks(text_files, AutoTokenizer.from_pretrained(stock_llama_dir), 4, 32)
    with torch.no_grad():
        base_loss = base(blocks, labels=blocks).loss.item()
    assert saved["eval_loss"] < base_loss - 1e-3, (saved["eval_loss"], base_loss)
    assert any("skipping the evaluation before training" in r.getMessage() for r in caplog.records)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "v_proj", "gpam_q_neg"}
    assert adapter_config["modules_to_save"] == ["gpam_lambda"]
    footprint = [r.getMessage() for r in caplog.records if "base quantized with bitsandbytes" in r.getMessage()]
    assert footprint, "the memory estimate names the quantized base"


def test_quantized_footprint_counts_packed_weights_and_lora(wider_stock_llama_dir):
    stock_llama_dir = wider_stock_llama_dir
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    full = gpam_recipe_utils.training_footprint(LlamaForCausalLM.from_pretrained(stock_llama_dir))
    quantized = AutoModelForCausalLM.from_pretrained(
        stock_llama_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
    )
    four_bit = gpam_recipe_utils.training_footprint(quantized)
    # the same logical parameters, stored in far fewer bytes (the quantized projections at 4 bits plus scales)
    assert four_bit["parameters"] == full["parameters"]
    assert four_bit["weights_gib"] < 0.8 * full["weights_gib"]
    lora = get_peft_model(hf_gpam.patch_model(quantized), LoraConfig(r=2, target_modules=["q_proj"]))
    with_lora = gpam_recipe_utils.training_footprint(lora)
    adapters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert with_lora["trainable_parameters"] == adapters
    assert with_lora["gib"] == pytest.approx(with_lora["weights_gib"] + 3 * 4 * adapters / 2**30)


def test_quantization_flags_are_checked(text_files, tmp_path):
    base = ["--train_file", str(text_files / "train.txt"), "--output_dir", str(tmp_path / "x")]
    with pytest.raises(ValueError, match="--quantization 'gptq' is not one of bnb-4bit, bnb-8bit, torchao-int8"):
        run_clm_gpam.main([*base, "--model_name_or_path", "x", "--use_lora", "--quantization", "gptq"])
    with pytest.raises(ValueError, match="--quantization trains adapters on a frozen quantized base: add --use_lora"):
        run_clm_gpam.main([*base, "--model_name_or_path", "x", "--quantization", "bnb-4bit"])
    with pytest.raises(ValueError, match="--quantization loads a pretrained base"):
        run_clm_gpam.main([*base, "--model_type", "llama", "--use_lora", "--quantization", "bnb-8bit"])
