"""Hub-compatible checkpoints: what save_pretrained writes, and loading it with trust_remote_code in a fresh
process, offline, where hf_gpam cannot be imported."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_gpam
from hf_gpam.modeling.gpam_config_fields import GpamConfigFields
from hf_gpam.testing_utils import HIDE_HF_GPAM_PRELUDE

from .utils import MODEL_TYPES, gpam_model, main_output, model_inputs, sharpen_attention


AUTO_CLASS = {"gpt2": "AutoModelForCausalLM", "bart": "AutoModelForSeq2SeqLM", "marian": "AutoModelForSeq2SeqLM"}

# runs in a subprocess: hf_gpam is installed in this environment, so the prelude hides it
REMOTE_LOAD_SCRIPT = HIDE_HF_GPAM_PRELUDE + """
import json
import torch
import transformers

folder, auto_class, inputs_path, output_path = sys.argv[1:]
try:
    import hf_gpam  # noqa: F401
    sys.exit("hf_gpam is importable, the test would prove nothing")
except ImportError:
    pass
model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
base = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)
inputs = {k: torch.tensor(v) for k, v in json.load(open(inputs_path)).items()}
with torch.no_grad():
    outputs = model(**inputs)
    generated = model.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4, do_sample=False,
        pad_token_id=model.config.pad_token_id,
    )
json.dump(
    {
        "module": type(model).__module__,
        "base_class": type(base).__name__,
        "logits": outputs.logits.tolist(),
        "generated": generated.tolist(),
        "lambdas": {n: m.gpam_lambda.weight.tolist() for n, m in model.named_modules() if hasattr(m, "gpam_lambda")},
    },
    open(output_path, "w"),
)
"""


def remote_load(folder, model_type, inputs, tmp_path):
    inputs_path, output_path = tmp_path / "inputs.json", tmp_path / "outputs.json"
    inputs_path.write_text(json.dumps({k: v.tolist() for k, v in inputs.items()}))
    # HF_MODULES_CACHE inside tmp_path: remote code is copied there, not into the user's cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD_SCRIPT, str(folder), AUTO_CLASS[model_type], str(inputs_path),
         str(output_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output_path.read_text())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_checkpoint_loads_with_trust_remote_code_without_hf_gpam(tmp_path, model_type):
    model = sharpen_attention(gpam_model(model_type, gpam_lambda_init=0.4))
    with torch.no_grad():
        for index, module in enumerate(model.gpam_modules()):
            module.gpam_lambda.weight.fill_(0.1 * (index + 1))
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    inputs = model_inputs(model_type, left_padding=model_type == "gpt2")
    with torch.no_grad():
        logits = main_output(model(**inputs))
        generated = model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4,
            do_sample=False, pad_token_id=model.config.pad_token_id,
        )
    loaded = remote_load(folder, model_type, inputs, tmp_path)
    assert loaded["module"].startswith("transformers_modules.")
    assert loaded["base_class"] == list(hf_gpam.ARCHITECTURES[model_type].model_classes.values())[0].__name__
    torch.testing.assert_close(torch.tensor(loaded["logits"]), logits, atol=1e-5, rtol=1e-5)
    assert loaded["generated"] == generated.tolist()
    assert loaded["lambdas"] == {n: t.tolist() for n, t in model.gpam_lambdas().items()}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_saved_folder_is_complete_and_self_contained(tmp_path, model_type):
    model = gpam_model(model_type, gpam_layers=[1], gpam_lambda_init=0.3)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files
    assert f"modeling_gpam_{model_type}.py" in files and f"configuration_gpam_{model_type}.py" in files

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"gpam_{model_type}"
    base_class = list(hf_gpam.ARCHITECTURES[model_type].model_classes.values())[0]
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_gpam_{model_type}.{type(model.config).__name__}",
        "AutoModel": f"modeling_gpam_{model_type}.{base_class.__name__}",
        AUTO_CLASS[model_type]: f"modeling_gpam_{model_type}.{type(model).__name__}",
    }
    for field_name in GpamConfigFields.__dataclass_fields__:
        assert field_name in config, f"{field_name} missing from config.json"
    assert config["gpam_layers"] == [1] and config["gpam_lambda_init"] == 0.3

    # the shipped code imports only torch, transformers, the standard library and its own folder
    allowed = {"torch", "transformers", *sys.stdlib_module_names}
    shipped = {p.stem for p in Path(tmp_path).glob("*.py")}
    for path in Path(tmp_path).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
                assert roots <= allowed, f"{path.name} imports {roots - allowed}"
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert node.module.split(".")[0] in allowed, f"{path.name} imports {node.module}"
                else:
                    # only single-dot sibling imports are shipped by save_pretrained
                    assert node.level == 1 and node.module in shipped, f"{path.name}: from {'.' * node.level}{node.module}"


def test_auto_classes_are_registered_on_import():
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    # the decoder families' registration is covered in tests/test_decoders.py
    for model_type in MODEL_TYPES:
        architecture = hf_gpam.ARCHITECTURES[model_type]
        config = AutoConfig.for_model(architecture.gpam_model_type)
        assert type(config) is architecture.config_class
        for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM):
            expected = architecture.auto_classes.get(auto_class)
            if expected is not None:
                assert auto_class._model_mapping[architecture.config_class] is expected
        head = AUTO_CLASS[model_type]
        assert head in {cls.__name__ for cls in architecture.auto_classes}


def test_model_card_names_the_auto_class_of_the_saved_head(tmp_path):
    import transformers

    from hf_gpam.hub import save_hub_ready
    from hf_gpam.testing_utils import tiny_stock_config

    classifier = hf_gpam.patch_model(transformers.LlamaForSequenceClassification(tiny_stock_config("llama", num_labels=3)))
    save_hub_ready(classifier, tmp_path / "classifier")
    card = (tmp_path / "classifier" / "README.md").read_text()
    assert "AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True" in card
    assert "AutoModelForCausalLM" not in card
    save_hub_ready(gpam_model("bart"), tmp_path / "seq2seq")
    assert "AutoModelForSeq2SeqLM.from_pretrained(repo" in (tmp_path / "seq2seq" / "README.md").read_text()
