"""``import hf_gpam`` and ``hf-gpam --help`` cost what transformers' configuration code costs and print nothing:
transformers' modeling code (and, through its quantizers, torchao and bitsandbytes), PEFT and datasets are imported
only when a model class, ``patch_model`` or a command needs them. Each check runs in a fresh interpreter."""

import json
import os
import subprocess
import sys

import pytest

from hf_gpam.cli import COMMANDS


# what `import hf_gpam` must not import: transformers' modeling code and what it pulls in (torchao prints "Failed to
# load ..._C_mxfp8..." and torch._pytree warnings on import), and the optional libraries of the recipes
HEAVY_MODULES = (
    "transformers.modeling_utils",
    "transformers.quantizers",
    "torchao",
    "bitsandbytes",
    "peft",
    "datasets",
    "matplotlib",
)

REPORT = "import json, sys; print(json.dumps(sorted(m for m in sys.modules if m.startswith(tuple(sys.argv[1:])))))"


def run_fresh(code: str, *prefixes: str) -> tuple[list[str], str]:
    """Run ``code`` then ``REPORT`` in a new interpreter: the imported modules starting with ``prefixes``, stderr."""
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\n{REPORT}", *prefixes],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_import_hf_gpam_imports_no_heavy_module_and_prints_nothing():
    imported, stderr = run_fresh("import hf_gpam", *HEAVY_MODULES)
    assert imported == []
    assert stderr == ""


def test_hf_gpam_help_imports_no_command_module():
    code = (
        "import contextlib, io\n"
        "from hf_gpam.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
    )
    commands = [module for module, _ in COMMANDS.values()]
    imported, stderr = run_fresh(code, *commands, *HEAVY_MODULES)
    assert imported == []
    assert stderr == ""


def test_the_auto_classes_build_and_load_gpam_models_after_a_light_import(tmp_path):
    # registration by name: the Auto classes import the model class the first time they use it
    code = (
        "import sys, tempfile, hf_gpam\n"
        "from transformers import AutoModel, AutoModelForCausalLM\n"
        "assert 'transformers.modeling_utils' not in sys.modules\n"
        "config = hf_gpam.GpamLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,\n"
        "    num_attention_heads=4, num_key_value_heads=2, vocab_size=64)\n"
        "model = AutoModelForCausalLM.from_config(config)\n"
        "assert type(model) is hf_gpam.GpamLlamaForCausalLM, type(model)\n"
        f"model.save_pretrained({str(tmp_path)!r})\n"
        f"base = AutoModel.from_pretrained({str(tmp_path)!r})\n"
        "assert type(base) is hf_gpam.GpamLlamaModel, type(base)\n"
    )
    run_fresh(code)


@pytest.mark.parametrize("name", ["GpamLlamaForCausalLM", "GpamGPT2LMHeadModel", "GpamMarianMTModel", "patch_model"])
def test_lazy_public_names_resolve(name):
    import hf_gpam

    assert name in hf_gpam.__all__ and name in dir(hf_gpam)
    assert getattr(hf_gpam, name).__name__ == name


def test_an_unknown_attribute_is_an_attribute_error():
    import hf_gpam

    with pytest.raises(AttributeError, match="GpamNoSuchModel"):
        hf_gpam.GpamNoSuchModel  # noqa: B018
