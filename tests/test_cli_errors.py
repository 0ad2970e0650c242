"""Bad input to every ``hf-gpam`` sub-command ends in one line on stderr and exit status 2, never a traceback;
a genuine bug keeps its traceback (see the ``hf_gpam.cli`` docstring for the split)."""

import pytest
from transformers import GPT2LMHeadModel

from hf_gpam import cli
from hf_gpam.testing_utils import tiny_stock_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def broken_checkpoints(tmp_path_factory):
    """Three unusable checkpoints: a folder that is not there, a cut-off model.safetensors, a config that is not
    JSON (the weights beside it are fine)."""
    root = tmp_path_factory.mktemp("broken")
    truncated = root / "truncated"
    GPT2LMHeadModel(tiny_stock_config("gpt2")).save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])

    bad_config = root / "bad_config"
    GPT2LMHeadModel(tiny_stock_config("gpt2")).save_pretrained(bad_config)
    (bad_config / "config.json").write_text('{"model_type": "gpt2", "n_embd": 32,', encoding="utf-8")
    return {"missing": root / "missing", "truncated": truncated, "bad_config": bad_config}


def fails_with_one_line(capsys, argv, *fragments):
    """Run ``hf-gpam argv``; expect exit status 2 and exactly one error line on stderr holding ``fragments``."""
    assert cli.main([str(word) for word in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"hf-gpam {argv[0]}: error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


CASES = {
    "missing": ("does not exist",),
    "truncated": ("OSError: cannot read the weights", ".safetensors file is truncated or corrupt"),
    "bad_config": ("config.json", "not a valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_bad_checkpoint(broken_checkpoints, tmp_path, capsys, case):
    folder = broken_checkpoints[case]
    line = fails_with_one_line(capsys, ["convert", folder, "--output_dir", tmp_path / "out"], *CASES[case])
    # the message names the checkpoint it could not read
    assert folder.name in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_diagnose_bad_checkpoint(broken_checkpoints, tmp_path, capsys, case):
    folder = broken_checkpoints[case]
    argv = ["diagnose", folder, "--text", "hello", "--output_dir", tmp_path / "out"]
    line = fails_with_one_line(capsys, argv, *CASES[case])
    assert folder.name in line
    assert not (tmp_path / "out" / "diagnostics.json").exists()


def test_compare_curves_bad_trainer_state(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_text('{"log_history": [', encoding="utf-8")
    fails_with_one_line(capsys, ["compare-curves", tmp_path / "run", "--output", tmp_path / "c.png"],
                        "trainer_state.json", "not valid JSON", str(tmp_path / "run"))
    fails_with_one_line(capsys, ["compare-curves", tmp_path / "missing", "--output", tmp_path / "c.png"],
                        "is not a folder")


def test_demo_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder", encoding="utf-8")
    fails_with_one_line(capsys, ["demo", "--output_dir", tmp_path / "taken"], "NotADirectoryError", "taken")


def test_multi_line_messages_are_joined_into_one_line(capsys):
    error = OSError("first line\n  second line")
    assert cli._one_line(error, "convert") == "hf-gpam convert: error: OSError: first line second line"
    # a ValueError from convert_checkpoint already names the command: it is not repeated
    assert cli._one_line(ValueError("hf-gpam convert: bad"), "convert") == "hf-gpam convert: error: bad"


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    # RuntimeError (torch), KeyError, ... are not bad input: hiding them behind exit status 2 would hide bugs
    import hf_gpam.cli.compare_curves as command

    def broken_run(args):
        raise RuntimeError("shape mismatch inside torch")

    monkeypatch.setattr(command, "run", broken_run)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["compare-curves", str(tmp_path), "--output", str(tmp_path / "c.png")])


def test_model_sources_that_must_be_local_folders(tmp_path):
    assert cli.looks_like_local_path("./model") and cli.looks_like_local_path("/abs/model")
    assert cli.looks_like_local_path("runs/a/b")
    assert not cli.looks_like_local_path("gpt2") and not cli.looks_like_local_path("org/name")
    with pytest.raises(FileNotFoundError, match="model folder .*: no such folder"):
        cli.check_model_source(str(tmp_path / "nothing"))
    cli.check_model_source(str(tmp_path))
    # a Hub id is left to transformers (a download, or its own offline error)
    cli.check_model_source("org/name")
