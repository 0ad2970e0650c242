"""What ``GpamXxx.from_pretrained`` refuses or warns about before it builds anything: a missing local folder, a
checkpoint of another family, and a stock checkpoint loaded with λ ≠ 0 (its outputs are then not the stock ones)."""

import os
import time
import warnings

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM, PreTrainedModel

from hf_gpam import GpamGPT2LMHeadModel, GpamLlamaForCausalLM
from hf_gpam.cli import main as cli_main
from hf_gpam.cli.convert import convert_checkpoint
from hf_gpam.modeling.gpam_loading import looks_like_local_path
from hf_gpam.testing_utils import tiny_gpam_config, tiny_stock_config


@pytest.fixture(scope="module")
def stock_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_stock_config("gpt2")).save_pretrained(root / "gpt2")
    LlamaForCausalLM(tiny_stock_config("llama")).save_pretrained(root / "llama")
    GpamGPT2LMHeadModel(tiny_gpam_config("gpt2")).save_pretrained(root / "gpam_gpt2")
    return root


@pytest.fixture
def nothing_is_built(monkeypatch):
    # the refusals must come before transformers builds (or downloads) anything
    def build(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}: transformers' from_pretrained was reached")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(build))


@pytest.mark.parametrize(
    "gpam_class, checkpoint, found",
    [(GpamLlamaForCausalLM, "gpt2", "'gpt2'"), (GpamGPT2LMHeadModel, "llama", "'llama'")],
    ids=["gpt2-into-llama", "llama-into-gpt2"],
)
def test_a_checkpoint_of_another_family_is_refused_in_one_line(gpam_class, checkpoint, found, stock_dirs, nothing_is_built):
    with pytest.raises(ValueError) as error:
        gpam_class.from_pretrained(stock_dirs / checkpoint)
    message = str(error.value)
    assert "\n" not in message
    assert f"is a {found} checkpoint" in message and gpam_class.config_class.model_type in message


def test_a_stock_checkpoint_with_nonzero_lambda_warns_and_says_how_to_keep_the_outputs(stock_dirs):
    with pytest.warns(UserWarning, match=r"gpam_lambda_init=0\.0"):
        GpamGPT2LMHeadModel.from_pretrained(stock_dirs / "gpt2")
    with pytest.warns(UserWarning, match=r"no longer the stock"):
        GpamGPT2LMHeadModel.from_pretrained(stock_dirs / "gpt2", config=tiny_gpam_config("gpt2"))


def test_a_stock_checkpoint_with_lambda_zero_keeps_the_stock_outputs_without_a_warning(stock_dirs):
    ids = torch.arange(12).reshape(2, 6)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stock.*checkpoint", category=UserWarning)
        gpam = GpamGPT2LMHeadModel.from_pretrained(stock_dirs / "gpt2", gpam_lambda_init=0.0).eval()
        # a GPAM checkpoint carries its own λ: no warning either
        GpamGPT2LMHeadModel.from_pretrained(stock_dirs / "gpam_gpt2")
        GpamGPT2LMHeadModel.from_pretrained(stock_dirs / "gpt2", gpam_mode="softmax")
    stock = GPT2LMHeadModel.from_pretrained(stock_dirs / "gpt2").eval()
    with torch.no_grad():
        torch.testing.assert_close(gpam(ids).logits, stock(ids).logits)


def test_a_local_looking_path_that_does_not_exist_is_no_such_folder_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    # `outputs/x` has the form of a Hub id, but `outputs` is a folder here
    assert looks_like_local_path("outputs/x") and not looks_like_local_path("org/name")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="'outputs/x' does not exist: no such folder"):
        GpamLlamaForCausalLM.from_pretrained("outputs/x")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        convert_checkpoint("outputs/x", str(tmp_path / "converted"))
    assert cli_main(["convert", "outputs/x", "--output_dir", "converted"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no such folder" in error
    assert time.monotonic() - start < 5, "a missing local folder must not reach the Hub"
    assert not os.path.exists("converted")
