"""A ``torchrun`` worker: real FSDP2 training of a tiny daGPAM GPT-2 on CPU ranks over gloo, saved through the
recipes' FSDP save path.

Launched by ``tests/test_distributed.py`` as::

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_fsdp_worker.py OUTPUT_DIR

Why torch's ``fully_shard`` and not ``accelerate launch`` with an FSDP config: accelerate only turns a run into
FSDP when the processes sit on accelerators (``AcceleratorState`` switches to ``DistributedType.FSDP`` from
``MULTI_GPU`` / ``MULTI_XPU`` / ... but never from ``MULTI_CPU``). On a CPU-only machine an FSDP config (version 1
or 2, or the Trainer's own ``--fsdp`` flag) therefore trains plain gloo DDP with ``trainer.is_fsdp_enabled`` False,
or, with ``fsdp_version: 1``, fails in the plugin's ``sync_module_states`` with "no available devices found".
torch's FSDP2 itself runs on CPU with gloo, so this worker shards the model directly and then hands it to the
recipes' ``write_outputs`` exactly as the Trainer would under FSDP (only the Trainer object is a stand-in).

Two runs, one after the other in the same process group: full fine-tuning (``full``) and LoRA through the
recipes' ``apply_lora`` with λ in ``modules_to_save``, merged at save time (``lora``). In each, every rank builds
the same model (same seed), shards each block and the root, and takes a few AdamW steps on its half of each global
batch with trainable λ. Written to ``OUTPUT_DIR/{full,lora}/``:

- ``hub/``: the Hub-ready folder written by ``gpam_recipe_utils.write_outputs`` from the sharded model;
- ``gathered.pt``: the full state dict gathered after training (``get_model_state_dict``, rank 0);
- ``reference.pt``: the same model trained in one process on the whole global batches (rank 0; merged for LoRA),
  which the sharded run must reproduce: FSDP averages the gradients of the equal-sized halves, i.e. the full-batch
  gradient;
- ``report.json``: what each rank held (local vs full parameter sizes), λ at init and the losses.
"""

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, init_device_mesh

import hf_gpam
from hf_gpam.testing_utils import tiny_gpam_config


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
import gpam_recipe_utils  # noqa: E402


STEPS = 3
BATCH_PER_RANK = 4
SEQ_LEN = 16
LEARNING_RATE = 1e-2


def global_batch(step: int, world_size: int, vocab_size: int) -> torch.Tensor:
    """The step's global batch, (world_size * BATCH_PER_RANK, SEQ_LEN) token ids, the same on every rank."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(vocab_size, (world_size * BATCH_PER_RANK, SEQ_LEN), generator=generator)


def train(model, batches) -> list[float]:
    # no weight decay: λ must move only through its gradient, so the test can tell that it got one
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    losses = []
    for input_ids in batches:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def shard_and_train(kind: str, output_dir: Path, rank: int, world_size: int, mesh) -> None:
    """One run: build, optionally wrap with LoRA, shard, train, gather, save through ``write_outputs``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # dropout off: the sharded run and the one-process reference must compute the same function
    config = tiny_gpam_config("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = hf_gpam.GpamGPT2LMHeadModel(config)
    use_lora = kind == "lora"
    model_args = SimpleNamespace(
        use_lora=use_lora, merge_lora=use_lora, lora_target_modules=None, lora_r=4, lora_alpha=8, lora_dropout=0.0
    )
    if use_lora:
        model = gpam_recipe_utils.apply_lora(model, model_args, task_type="CAUSAL_LM")
        # LoRA's B starts at zero; start it elsewhere so that the adapters change the model from the first step
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.02)
    reference = copy.deepcopy(model) if rank == 0 else None
    lambda_init = {name: p.detach().clone() for name, p in model.named_parameters() if "gpam_lambda" in name}

    # FSDP2 shards the local tensors as they are, so every rank must start from the same weights
    checksums = [None] * world_size
    dist.all_gather_object(checksums, sum(p.double().sum().item() for p in model.parameters()))
    assert len(set(checksums)) == 1, f"ranks built different initial weights: {checksums}"

    for block in (model.get_base_model() if use_lora else model).transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    shards = {}
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor) and param.placements == (Shard(0),), f"{name} is not sharded: {param!r}"
        shards[name] = {"full": list(param.shape), "local": list(param.to_local().shape)}

    batches = [global_batch(step, world_size, config.vocab_size) for step in range(STEPS)]
    rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    losses = train(model, [batch[rows] for batch in batches])

    # the gathered training state, on rank 0 (the call accelerate's get_state_dict makes for FSDP2)
    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(gathered, output_dir / "gathered.pt")

    # the recipes' save path, called on every rank as the recipes do at the end of training
    stand_in_trainer = SimpleNamespace(
        args=SimpleNamespace(output_dir=str(output_dir / "hub")),
        is_fsdp_enabled=True,
        is_world_process_zero=lambda: rank == 0,
    )
    gpam_recipe_utils.write_outputs(
        stand_in_trainer, model, None, model_args,
        results={"world_size": world_size, "train_loss": sum(losses) / len(losses)},
        card={"summary": f"FSDP2 test run ({kind})"},
    )

    per_rank = [None] * world_size
    dist.all_gather_object(per_rank, {"rank": rank, "shards": shards, "losses": losses})
    if rank == 0:
        reference_losses = train(reference, batches)
        if use_lora:
            reference = reference.merge_and_unload()
        torch.save(reference.state_dict(), output_dir / "reference.pt")
        report = {
            "world_size": world_size,
            "ranks": per_rank,
            "reference_losses": reference_losses,
            "lambda_init": {name: value.tolist() for name, value in lambda_init.items()},
        }
        (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    dist.barrier()


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for kind in ("full", "lora"):
        shard_and_train(kind, Path(output_dir) / kind, dist.get_rank(), dist.get_world_size(), mesh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
