"""One version everywhere, λ values far outside the sensible range flagged, and thread counts that suit the machine."""

import re
import runpy
import sys
import warnings
from pathlib import Path

import pytest

import hf_gpam
from hf_gpam import GpamGPT2Config
from hf_gpam.modeling.gpam_config_fields import GPAM_LAMBDA_SENSIBLE_RANGE


ROOT = Path(__file__).resolve().parent.parent


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_pyproject_package_and_readme_give_one_version():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    readme = (ROOT / "README.md").read_text()
    assert hf_gpam.__version__ == pyproject
    assert f"Release {pyproject} (`hf_gpam.__version__`" in readme
    # the README may speak of earlier releases, never of a later one
    mentioned = re.findall(r"\b[Rr]elease (\d+\.\d+(?:\.\d+)?)", readme)
    assert mentioned and all(version_tuple(m) <= version_tuple(pyproject) for m in mentioned), mentioned


@pytest.mark.parametrize("value", [1e9, -5.0, 11.0])
def test_lambda_outside_the_sensible_range_warns(value):
    with pytest.warns(UserWarning, match=r"gpam_lambda_init=.* outside the sensible range"):
        GpamGPT2Config(gpam_lambda_init=value)


@pytest.mark.parametrize("value", [*GPAM_LAMBDA_SENSIBLE_RANGE, 0.0, 0.5])
def test_lambda_inside_the_sensible_range_is_silent(value):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        GpamGPT2Config(gpam_lambda_init=value)
        GpamGPT2Config(gpam_tie_lambda=False, gpam_lambda_init=0.5, gpam_lambda_neg_init=value)


def test_untied_negative_lambda_is_checked_too():
    with pytest.warns(UserWarning, match="gpam_lambda_neg_init"):
        GpamGPT2Config(gpam_tie_lambda=False, gpam_lambda_neg_init=1e9)


def test_make_run_and_demo_use_half_the_available_cpus():
    script = runpy.run_path(str(ROOT / "scripts" / "num_threads.py"))
    assert [script["suggested_threads"](n) for n in (1, 2, 3, 16)] == [1, 1, 1, 8]
    assert script["available_cpus"]() >= 1
    makefile = (ROOT / "Makefile").read_text()
    exported = [line.split(":")[0].split() for line in makefile.splitlines() if ": export OMP_NUM_THREADS = $(NUM_THREADS)" in line]
    assert exported and {"run", "demo"} <= set(exported[0])
    assert "scripts/num_threads.py" in makefile
    # the venv install shows pip's progress
    install = makefile[makefile.index("$(VENV)/.installed: pyproject.toml"):].split("\n\n")[0]
    assert " -q " not in install and "[venv]" in install
