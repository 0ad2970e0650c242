"""scripts/compat.py without building any environment: parsing pytest's summary, the table and the report, the
tests' environment, argument checks and the reuse of an environment that is already installed."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_compat():
    spec = importlib.util.spec_from_file_location("compat_script", REPO_ROOT / "scripts" / "compat.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the class bodies run
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


compat = _load_compat()


@pytest.mark.parametrize(
    "output, expected",
    [
        (
            "tests/test_ops.py ....F\n===== 1 failed, 12 passed, 2 errors, 3 warnings in 4.56s =====\n",
            dict(passed=12, failed=1, errors=2, seconds=4.56),
        ),
        (
            "........\n120 passed, 3 skipped, 1 deselected in 95.31s (0:01:35)\n",
            dict(passed=120, skipped=3, deselected=1, seconds=95.31),
        ),
        ("E   ImportError: cannot import name 'x'\n1 error in 0.50s\n", dict(errors=1, seconds=0.5)),
        ("\nno tests ran in 0.01s\n", dict(seconds=0.01)),
        ("2 passed, 1 xfailed, 1 xpassed, 1 rerun in 1.00s", dict(passed=2, xfailed=1, xpassed=1, seconds=1.0)),
        # a captured line that looks like a summary is not the last one: the real summary wins
        ("3 passed in 1.00s\nmore output\n5 failed, 1 passed in 2.00s\n", dict(passed=1, failed=5, seconds=2.0)),
    ],
    ids=["failed-errors-warnings", "passed-skipped-duration", "one-error", "no-tests", "x-and-rerun", "last-line"],
)
def test_parse_pytest_summary(output, expected):
    assert compat.parse_pytest_summary(output) == compat.PytestSummary(**expected)


def test_parse_pytest_summary_without_a_summary_line():
    # e.g. a conftest that fails to import: pytest prints the error and no summary
    output = "ImportError while loading conftest 'tests/conftest.py'.\nE   ModuleNotFoundError: No module named 'y'\n"
    assert compat.parse_pytest_summary(output) is None
    assert compat.parse_pytest_summary("the test ran in 3.0s and passed\n") is None


def _results():
    passing = compat.PytestSummary(passed=40, skipped=2, seconds=30.0)
    ok = compat.VersionResult("5.23.0", "2.13.0+cpu", passing, exit_status=0, seconds=31.2)
    failing = compat.VersionResult("5.24.0", "2.13.0+cpu", compat.PytestSummary(passed=20, failed=20), 1, 25.0)
    broken = compat.VersionResult("5.22.2", problem="install failed", seconds=3.0)
    return [broken, ok, failing]


def test_markdown_table_has_one_row_per_version():
    lines = compat.markdown_table(_results()).splitlines()
    assert lines[0] == "| transformers | torch | passed | failed | errors | skipped | seconds | result |"
    assert lines[2] == "| 5.22.2 | ? | – | – | – | – | 3.0 | FAIL (install failed) |"
    assert lines[3] == "| 5.23.0 | 2.13.0+cpu | 40 | 0 | 0 | 2 | 31.2 | pass |"
    assert lines[4] == "| 5.24.0 | 2.13.0+cpu | 20 | 20 | 0 | 0 | 25.0 | FAIL (pytest exit status 1) |"
    assert len({line.count("|") for line in lines}) == 1
    assert [r.ok for r in _results()] == [False, True, False]


def test_a_run_without_summary_line_fails():
    crashed = compat.VersionResult("5.24.0", "2.13.0", None, exit_status=4)
    assert not crashed.ok and "no summary line" in crashed.outcome


def test_report_says_what_was_run():
    report = compat.render_report(
        _results(),
        command="python scripts/compat.py --tests tests/test_ops.py",
        tests=["tests/test_ops.py"],
        missing_tests=["tests/test_interface.py"],
        kept_skip_version_check=False,
        date="2025-01-01 00:00 UTC",
        python_version="3.11.9",
    )
    assert "- date: 2025-01-01 00:00 UTC" in report
    assert "- torch: 2.13.0+cpu; Python 3.11.9" in report
    assert "- command: `python scripts/compat.py --tests tests/test_ops.py`" in report
    assert "not run: `tests/test_interface.py`" in report
    assert compat.markdown_table(_results()) in report
    assert compat.SKIP_VERSION_CHECK_ENV not in report
    bypassed = compat.render_report(
        _results(), command="c", tests=["t"], missing_tests=[], kept_skip_version_check=True
    )
    assert f"{compat.SKIP_VERSION_CHECK_ENV}=1 was kept" in bypassed


def test_pytest_environment_verifies_the_version_gate_unless_told_otherwise(monkeypatch):
    monkeypatch.setenv(compat.SKIP_VERSION_CHECK_ENV, "1")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    env = compat.pytest_environment(keep_skip_version_check=False)
    assert compat.SKIP_VERSION_CHECK_ENV not in env and "PYTHONPATH" not in env
    assert env["HF_HUB_OFFLINE"] == "1"
    assert compat.pytest_environment(keep_skip_version_check=True)[compat.SKIP_VERSION_CHECK_ENV] == "1"
    monkeypatch.delenv(compat.SKIP_VERSION_CHECK_ENV)
    # the script never sets it itself
    assert compat.SKIP_VERSION_CHECK_ENV not in compat.pytest_environment(keep_skip_version_check=True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--versions", "latest"], "'latest' is not a release number"),
        (["--tests", "tests/test_nothing_here.py"], "none of the test modules exists"),
    ],
    ids=["bad-version", "no-tests"],
)
def test_bad_arguments_stop_before_building_anything(argv, message, tmp_path, capsys):
    assert compat.main([*argv, "--compat-dir", str(tmp_path / "compat"), "--output", ""]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "compat").exists()


@pytest.mark.skipif(os.name == "nt", reason="the stand-in venv python is a shell script")
def test_an_installed_environment_is_reused(tmp_path, monkeypatch):
    import torch
    import transformers

    # a stand-in venv whose python is this interpreter, marked as installed for this pyproject.toml
    venv_dir = tmp_path / f"venv-{transformers.__version__}"
    (venv_dir / "bin").mkdir(parents=True)
    python = venv_dir / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    wanted = {
        "transformers": transformers.__version__,
        "torch_spec": "torch==x",
        "extras": compat.EXTRAS,
        "pyproject_sha256": compat.hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes()).hexdigest(),
    }
    (venv_dir / "hf_gpam-compat.json").write_text(json.dumps({"wanted": wanted}))

    def no_install(command, log, **kwargs):
        raise AssertionError(f"an installed environment was installed again: {command}")

    monkeypatch.setattr(compat, "_run_logged", no_install)
    found, installed = compat.ensure_environment(transformers.__version__, "torch==x", tmp_path)
    assert found == python
    assert installed == {"torch": torch.__version__, "transformers": transformers.__version__}
    # another torch spec is another environment: it is installed again
    with pytest.raises(AssertionError, match="installed again"):
        compat.ensure_environment(transformers.__version__, "torch==y", tmp_path)


def test_main_writes_the_report_and_fails_when_a_version_fails(tmp_path, monkeypatch, capsys):
    by_version = {r.transformers: r for r in _results()}
    monkeypatch.setattr(compat, "run_version", lambda version, args, tests: by_version[version])
    output = tmp_path / "compat.md"
    argv = ["--versions", "5.23.0", "--tests", "tests/test_ops.py", "--output", str(output)]
    assert compat.main(argv) == 0
    assert "| 5.23.0 | 2.13.0+cpu | 40 |" in output.read_text() and "| 5.23.0 |" in capsys.readouterr().out
    assert compat.main([*argv[:2], "5.24.0", *argv[2:]]) == 1
    assert compat.main(["--versions", "5.22.2", *argv[2:]]) == 1


def test_the_default_run_covers_continuous_batching_serving_and_backends():
    assert {"tests/test_backends.py", "tests/test_serving.py"} <= set(compat.DEFAULT_TESTS)
    assert "serving" in compat.EXTRAS.split(",") and "not serving" not in compat.PYTEST_MARKERS
    assert {Path(t).stem for t in compat.DEFAULT_TESTS} <= set(compat.FEATURES)


def test_the_report_says_which_features_each_release_runs(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_backends" name="a"/>'
        '<testcase classname="tests.test_backends" name="b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_serving" name="c"><skipped/></testcase>'
        '<testcase classname="tests.test_ops" name="d"/>'
        '</testsuite></testsuites>'
    )
    modules = compat.module_results(junit)
    assert modules == {"test_backends": (1, 1, 0), "test_serving": (0, 0, 1), "test_ops": (1, 0, 0)}
    rows = [compat.VersionResult("5.23.0", "2.13.0", modules=modules), compat.VersionResult("5.24.0", "2.13.0")]
    tests = ["tests/test_ops.py", "tests/test_backends.py", "tests/test_serving.py"]
    report = compat.render_report(rows, command="c", tests=tests, missing_tests=[], kept_skip_version_check=False)
    assert "| 5.23.0 | yes | FAIL 1/2 | skipped |" in report
    assert "| 5.24.0 | – | – | – |" in report
    assert "hf-gpam serve" in report and "continuous batching" in report
