# Two entry points, each creating the virtual environment it needs:
#   make run    the main job: the language-modeling recipe on its embedded default corpus
#   make test   the test suite (what .ci/run runs)
#   make demo   a 10-second tour: new model, patch, save, reload with trust_remote_code
# GPU users: make test TORCH_SPEC="torch" (or any pip requirement) to keep a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run demo test test-slow venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: venv
	$(PY) recipes/run_clm_gpam.py

demo: venv
	$(PY) -m hf_gpam.cli demo

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) outputs
