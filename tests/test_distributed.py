"""Multi-process training on 2 CPU ranks over gloo, with trainable λ.

- DDP: the LM recipe under ``accelerate launch --multi_gpu`` (how users run it), each rank recording its own λ.
- FSDP: torch's FSDP2 ``fully_shard`` driven by ``tests/dist_fsdp_worker.py``, saved through the recipes'
  ``write_outputs`` FSDP branch. accelerate does not enable FSDP on CPU processes (an FSDP config silently trains
  DDP there; the worker's docstring has the details), so ``accelerate launch`` cannot run this path without GPUs.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_gpam  # noqa: F401  (registers the GPAM Auto classes for reloading the saved folders)
from hf_gpam.data import stdlib_docstring_corpus
from hf_gpam.hub import hub_ready_problems


TESTS = Path(__file__).resolve().parent
RECIPES = TESTS.parent / "recipes"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_launcher(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # no GPU even where one exists: these tests are about the gloo CPU path; one thread per rank on small CPUs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# ---------------------------------------------------------------------------------------------------- DDP


def test_two_rank_ddp_trains_lambda_identically_on_both_ranks(tmp_path):
    """Real 2-process gloo DDP on CPU (--multi_gpu on a machine without GPUs; --cpu would run one process).

    λ is trainable (the default): it takes part in every forward, so DDP's unused-parameter check has nothing to
    object to, and its gradient is all-reduced like any other: both ranks see the same non-zero gradient at every
    step and end with the same λ, which is the λ saved in the folder, moved away from its initial value.
    """
    corpus = stdlib_docstring_corpus(max_chars=30_000)
    (tmp_path / "train.txt").write_text("\n".join(corpus[:-20]) + "\n")
    (tmp_path / "validation.txt").write_text("\n".join(corpus[-20:]) + "\n")
    out, dumps = tmp_path / "ddp", tmp_path / "lambda_dumps"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(TESTS / "dist_clm_lambda_dump.py"), str(dumps),
        "--model_type", "gpt2", "--config_overrides", "n_layer=2,n_embd=32,n_head=4,n_positions=64",
        "--tokenizer_vocab_size", "300", "--train_file", str(tmp_path / "train.txt"),
        "--validation_file", str(tmp_path / "validation.txt"), "--block_size", "32",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--learning_rate", "3e-3",
        "--do_train", "--do_eval", "--output_dir", str(out), "--max_steps", "3", "--eval_before_training", "False",
        "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "True",
    ]
    result = run_launcher(command, cwd=tmp_path)
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["world_size"] == 2
    # each optimizer step consumes 4 blocks on each of the 2 ranks: an epoch is ceil(blocks / 8) steps (a single
    # process would need twice as many)
    assert saved["epoch"] == pytest.approx(3 / math.ceil(saved["train_blocks"] / 8), rel=1e-6)
    logs = result.stdout + result.stderr
    assert "world size 2, process 0" in logs and "world size 2, process 1" in logs
    assert hub_ready_problems(out) == []

    rank0, rank1 = (json.loads((dumps / f"lambda_rank{r}.json").read_text()) for r in (0, 1))
    assert len(rank0["gradients"]) == len(rank1["gradients"]) == 3
    for step, (grads0, grads1) in enumerate(zip(rank0["gradients"], rank1["gradients"])):
        assert grads0 and all(g is not None and any(g) for g in grads0.values()), f"step {step}: no λ gradient"
        assert grads0 == grads1, f"step {step}: the ranks' λ gradients differ (not all-reduced)"
    assert rank0["lambda"] == rank1["lambda"]

    weights = load_file(out / "model.safetensors")
    lambda_init = json.loads((out / "config.json").read_text())["gpam_lambda_init"]
    for name, values in rank0["lambda"].items():
        assert weights[name].tolist() == values
        assert not torch.allclose(weights[name], torch.full_like(weights[name], lambda_init)), f"{name} never moved"


# ---------------------------------------------------------------------------------------------------- FSDP


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One ``torchrun`` of the FSDP2 worker: a full fine-tuning run and a LoRA run (merged at save time)."""
    out = tmp_path_factory.mktemp("fsdp2")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(TESTS / "dist_fsdp_worker.py"), str(out),
    ]
    run_launcher(command, cwd=out)
    return out


def load_run(folder: Path):
    report = json.loads((folder / "report.json").read_text())
    return report, torch.load(folder / "gathered.pt"), torch.load(folder / "reference.pt")


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fsdp2_shards_every_parameter_and_trains_like_one_process(fsdp_run, kind):
    report, gathered, reference = load_run(fsdp_run / kind)
    assert report["world_size"] == 2
    shards = [rank["shards"] for rank in report["ranks"]]
    assert shards[0].keys() == shards[1].keys() and any("gpam_lambda" in name for name in shards[0])
    for name in shards[0]:
        full, local = shards[0][name]["full"], [rank[name]["local"] for rank in shards]
        # each rank holds its own rows (dim-0 shard), together exactly the full parameter
        assert sum(shape[0] for shape in local) == full[0], name
        assert all(shape[1:] == full[1:] and shape[0] < full[0] for shape in local), name

    # each rank trained on half of every global batch; FSDP averages the gradients of the halves, which is the
    # full-batch gradient, so the sharded run reproduces one process training on the whole batches
    rank_losses = [rank["losses"] for rank in report["ranks"]]
    mean_losses = [sum(step) / len(step) for step in zip(*rank_losses)]
    assert mean_losses == pytest.approx(report["reference_losses"], rel=1e-5)
    if kind == "full":
        assert gathered.keys() == reference.keys()
        for name, tensor in gathered.items():
            torch.testing.assert_close(tensor, reference[name], atol=1e-4, rtol=0, msg=name)


def test_fsdp2_full_finetune_saved_folder_equals_gathered_state(fsdp_run):
    report, gathered, _ = load_run(fsdp_run / "full")
    hub = fsdp_run / "full" / "hub"
    assert hub_ready_problems(hub) == []
    reloaded = AutoModelForCausalLM.from_pretrained(hub).state_dict()
    assert reloaded.keys() == gathered.keys()
    for name, tensor in gathered.items():
        assert torch.equal(reloaded[name], tensor), name
    # λ got gradients through the sharded run: every module's λ moved from its initial value
    for name, init in report["lambda_init"].items():
        assert (gathered[name] - torch.tensor(init)).abs().max() > 1e-3, f"{name} never moved"


def test_fsdp2_lora_merged_folder_equals_gathered_state(fsdp_run):
    report, gathered, reference = load_run(fsdp_run / "lora")
    hub = fsdp_run / "lora" / "hub"
    assert hub_ready_problems(hub) == []
    reloaded = AutoModelForCausalLM.from_pretrained(hub).state_dict()
    assert reloaded.keys() == reference.keys()

    # the adapter saved next to the merged model is the gathered one: the LoRA factors and the trained λ
    adapter = load_file(hub / "adapter" / "adapter_model.safetensors")
    gathered_adapter = {
        name.replace(".modules_to_save", "").replace(".default", ""): tensor
        for name, tensor in gathered.items()
        if ".lora_" in name or ".modules_to_save." in name
    }
    assert adapter.keys() == gathered_adapter.keys() and adapter
    for name, tensor in adapter.items():
        assert torch.equal(tensor, gathered_adapter[name]), name

    scaling = 8 / 4  # lora_alpha / lora_r in the worker
    prefix = "base_model.model."
    for name, tensor in reloaded.items():
        module, leaf = name.rsplit(".", 1)
        if leaf == "weight" and f"{prefix}{module}.lora_A.default.weight" in gathered:
            # a LoRA target: base + scaling * B A, transposed for GPT-2's Conv1D layers (weight stored (in, out));
            # W⁻ (gpam_q_neg) is an nn.Linear
            base = gathered[f"{prefix}{module}.base_layer.weight"]
            lora_a, lora_b = (gathered[f"{prefix}{module}.lora_{ab}.default.weight"] for ab in "AB")
            delta = scaling * lora_b @ lora_a
            expected = base + (delta if "gpam_q_neg" in name else delta.T)
            torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=0, msg=name)
        elif "gpam_lambda" in name:
            # λ is trained in full through modules_to_save; the trained copy is the one saved
            trained = gathered[f"{prefix}{module}.modules_to_save.default.weight"]
            assert torch.equal(tensor, trained), name
            init = torch.tensor(report["lambda_init"][f"{prefix}{module}.original_module.weight"])
            assert (trained - init).abs().max() > 1e-3, f"{name} never moved"
        else:
            # untouched by LoRA; a LoRA target's bias lives in its base_layer
            untouched = gathered.get(prefix + name, gathered.get(f"{prefix}{module}.base_layer.{leaf}"))
            assert untouched is not None and torch.equal(tensor, untouched), name
        torch.testing.assert_close(tensor, reference[name], atol=1e-4, rtol=0, msg=name)
