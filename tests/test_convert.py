"""``hf-gpam convert`` and the Hub-ready folder / model card it writes (hf_gpam.hub)."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    GPT2LMHeadModel,
)

import hf_gpam
from hf_gpam.architectures import ARCHITECTURES, DECODER_FAMILIES
from hf_gpam.cli import main as cli_main
from hf_gpam.cli.convert import convert_checkpoint
from hf_gpam.data import train_byte_level_bpe
from hf_gpam.hub import gpam_lambda_values, hub_ready_problems, render_model_card
from hf_gpam.testing_utils import tiny_gpam_config, tiny_stock_config


# one intra-op thread for these tiny end-to-end runs (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def stock_gpt2_dir(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "stock_gpt2"
    texts = ["the quick brown fox jumps over the lazy dog"] * 20
    tokenizer = train_byte_level_bpe(texts, vocab_size=300, model_type="gpt2", save_directory=str(folder))
    model = GPT2LMHeadModel(tiny_stock_config("gpt2", vocab_size=len(tokenizer))).eval()
    model.save_pretrained(folder)
    return folder, model


def test_convert_cli_writes_hub_ready_folder_with_identical_outputs(stock_gpt2_dir, tmp_path, capsys):
    folder, stock = stock_gpt2_dir
    out = tmp_path / "converted"
    assert cli_main(["convert", str(folder), "--output_dir", str(out), "--gpam_layers", "1"]) == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["model_class"] == "GpamGPT2LMHeadModel" and summary["max_abs_output_change"] < 1e-5
    assert hub_ready_problems(out) == []
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_gpam_gpt2.py", "tokenizer.json", "README.md"} <= files

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpam_gpt2" and config["gpam_layers"] == [1]
    assert "AutoModelForCausalLM" in config["auto_map"]

    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    converted = [name for name, m in reloaded.named_modules() if hasattr(m, "gpam_q_neg")]
    assert converted == ["transformer.h.1.attn"]
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # λ = 0 after conversion: the stock model's logits, computed independently by transformers' GPT-2
        torch.testing.assert_close(reloaded(ids).logits, stock(ids).logits, atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("lazy dog")["input_ids"]) == "lazy dog"

    card = (out / "README.md").read_text()
    front_matter = card.split("---")[1]
    assert "library_name: transformers" in front_matter and "- gpam" in front_matter
    assert f"base_model: {folder}" in front_matter
    assert "trust_remote_code=True" in card and "revision=revision" in card
    assert f"hf-gpam convert {folder} --output_dir {out} --gpam_layers 1" in card
    assert "`transformer.h.1.attn` | 0.0000 | 0.0000" in card


def test_convert_seq2seq_without_tokenizer_and_with_options(tmp_path):
    torch.manual_seed(0)
    stock = BartForConditionalGeneration(tiny_stock_config("bart")).eval()
    stock.save_pretrained(tmp_path / "bart")
    summary = convert_checkpoint(
        str(tmp_path / "bart"), str(tmp_path / "out"), gpam_attention_types=["cross"], gpam_lambda_init=0.25
    )
    assert summary["model_class"] == "GpamBartForConditionalGeneration"
    assert summary["tokenizer_saved"] is False
    # λ = 0.25 is not the identity: the conversion must report a real change
    assert summary["max_abs_output_change"] > 1e-6
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    lambdas = gpam_lambda_values(reloaded)
    assert sorted(lambdas) == ["model.decoder.layers.0.encoder_attn", "model.decoder.layers.1.encoder_attn"]
    assert all(v == [0.25] * 4 for v in lambdas.values())
    # 2 cross-attention modules × (d_head² + H) = 2 × (8·8 + 4)
    assert summary["gpam_new_parameters"] == 2 * (8 * 8 + 4)


@pytest.mark.parametrize("model_type", list(DECODER_FAMILIES))
def test_convert_every_decoder_family(model_type, tmp_path):
    """Each family's tiny stock causal LM converts with its default backend (Gemma2: eager, the only one stock
    has), computes what stock computes at λ = 0, and reloads through its remote code."""
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(tiny_stock_config(model_type)).eval()
    stock.save_pretrained(tmp_path / "stock")
    summary = convert_checkpoint(str(tmp_path / "stock"), str(tmp_path / "out"))
    gpam_class = ARCHITECTURES[model_type].model_classes[type(stock)]
    assert summary["model_class"] == gpam_class.__name__ and summary["max_abs_output_change"] < 1e-5
    assert hub_ready_problems(tmp_path / "out") == []
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert reloaded.config.model_type == f"gpam_{model_type}"
    assert len(gpam_lambda_values(reloaded)) == stock.config.num_hidden_layers
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, stock(ids).logits, atol=1e-5, rtol=1e-5)


def test_convert_keeps_the_head_the_checkpoint_names(tmp_path):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    stock = LlamaForSequenceClassification(tiny_stock_config("llama", num_labels=3)).eval()
    stock.save_pretrained(tmp_path / "classifier")
    summary = convert_checkpoint(str(tmp_path / "classifier"), str(tmp_path / "out"))
    # the classifier head is converted with the body, not dropped by loading a causal LM or a base model
    assert summary["model_class"] == "GpamLlamaForSequenceClassification"
    assert summary["max_abs_output_change"] < 1e-5


def test_convert_rejects_unsupported_architecture(tmp_path):
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=50)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model_type 'bert'.*supported: gpt2, bart, marian, llama, mistral"):
        convert_checkpoint(str(tmp_path / "bert"), str(tmp_path / "out"))


def test_model_card_front_matter_and_lambda_table():
    model = hf_gpam.GpamMarianMTModel(tiny_gpam_config("marian", gpam_tie_lambda=False, gpam_lambda_init=0.3,
                                                       gpam_lambda_neg_init=0.1))
    card = render_model_card(model, base_model="org/base", datasets=["wmt16"], metrics=["bleu", "chrf"],
                             results={"eval_bleu": 12.5, "gpam_lambdas": {"x": [1.0]}}, command="python train.py")
    front_matter = card.split("---")[1]
    expected = ("base_model: org/base", "- wmt16", "- bleu", "- chrf", "- gpam", "- marian",
                "pipeline_tag: translation")
    for line in expected:
        assert line in front_matter
    assert "AutoModelForSeq2SeqLM" in card and "python train.py" in card
    assert "| eval_bleu | 12.5000 |" in card and "gpam_lambdas" not in card.split("## Results")[1]
    # untied: mean λ⁺ and mean λ⁻ shown separately, 6 attention modules in a 2+2-layer encoder-decoder
    assert card.count("| 0.3000 | 0.1000 |") == 6


@pytest.fixture
def stock_bart_dir(tmp_path):
    folder = tmp_path / "stock_bart"
    BartForConditionalGeneration(tiny_stock_config("bart")).save_pretrained(folder)
    return folder


def test_convert_never_writes_into_its_source_folder(stock_bart_dir, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in stock_bart_dir.iterdir()}
    link = tmp_path / "link_to_source"
    link.symlink_to(stock_bart_dir, target_is_directory=True)
    # the same folder spelt four ways, with and without permission to overwrite
    for output_dir in (stock_bart_dir, f"{stock_bart_dir}/", stock_bart_dir / ".." / "stock_bart", link):
        for overwrite in ([], ["--overwrite_output_dir"]):
            argv = ["convert", str(stock_bart_dir), "--output_dir", str(output_dir), *overwrite]
            assert cli_main(argv) == 2
            assert "is the folder of the checkpoint being converted" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is the folder of the checkpoint being converted"):
        convert_checkpoint(str(link), str(stock_bart_dir), overwrite_output_dir=True)
    assert {p.name: p.read_bytes() for p in stock_bart_dir.iterdir()} == before


def test_convert_never_writes_into_the_hub_cache_snapshot_of_its_source(tmp_path, monkeypatch):
    # a Hub id has no folder of its own, but its cached files sit in a snapshot folder of the Hub cache
    import huggingface_hub.constants

    cache = tmp_path / "hub_cache"
    repo = cache / "models--org--tiny-bart"
    snapshot = repo / "snapshots" / ("0" * 40)
    BartForConditionalGeneration(tiny_stock_config("bart")).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ValueError, match="is the folder of the checkpoint being converted"):
        convert_checkpoint("org/tiny-bart", str(snapshot), overwrite_output_dir=True)


def test_convert_refuses_a_non_empty_output_dir_unless_told(stock_bart_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["convert", str(stock_bart_dir), "--output_dir", str(out)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "is not empty (1 entries: notes.txt)" in err and "--overwrite_output_dir" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="overwrite_output_dir=True"):
        convert_checkpoint(str(stock_bart_dir), str(out))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        convert_checkpoint(str(stock_bart_dir), str(tmp_path / "a_file"), overwrite_output_dir=True)

    assert cli_main([*argv, "--overwrite_output_dir"]) == 0
    capsys.readouterr()
    assert (out / "notes.txt").read_text() == "keep me"
    assert hub_ready_problems(out) == []
    # an existing empty folder needs no flag
    (tmp_path / "empty").mkdir()
    assert convert_checkpoint(str(stock_bart_dir), str(tmp_path / "empty"))["model_class"].startswith("GpamBart")
