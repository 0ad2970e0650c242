"""``hf-gpam demo`` (``make demo``) runs end to end and leaves nothing behind: its checkpoint folder and the copy of
the modeling code its trust_remote_code reload makes are temporary."""

import tempfile

import pytest

from hf_gpam.cli import main as cli_main


@pytest.mark.usefixtures("one_torch_thread")
def test_demo_runs_and_leaves_no_folder_behind(tmp_path, monkeypatch, capsys):
    scratch, hf_home = tmp_path / "tmp", tmp_path / "hf_home"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_MODULES_CACHE", raising=False)
    assert cli_main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "4. reloaded with trust_remote_code" in out
    # torchinductor_<user>: torch's own compile cache, shared by every torch process, not a folder of the demo's
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
    # the reload process's modules cache would default to $HF_HOME/modules
    assert not (hf_home / "modules").exists()
