"""Run ``recipes/run_clm_gpam.py`` as a script, with every rank recording its own λ: a test-only wrapper for the
multi-process recipe tests in ``tests/test_distributed.py``.

    accelerate launch ... tests/dist_clm_lambda_dump.py DUMP_DIR <run_clm_gpam arguments>

Each rank writes ``DUMP_DIR/lambda_rank{R}.json``: λ's gradient before every optimizer step and λ at the end of
training, read from that rank's own copy of the model. Only the rank-0 copy reaches the saved folder, so this is
the one way to see that the other ranks trained the same λ (DDP all-reduces the gradients, so they must agree
exactly).

The callback is attached by wrapping ``transformers.Trainer.__init__``, which every Trainer subclass the recipe
may use runs, so the recipe itself is run unchanged.
"""

import json
import runpy
import sys
from pathlib import Path

import transformers


RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "run_clm_gpam.py"


def lambda_tensors(model) -> dict:
    return {name: param for name, param in model.named_parameters() if "gpam_lambda" in name}


class LambdaDumpCallback(transformers.TrainerCallback):
    def __init__(self, dump_dir: Path):
        self.dump_dir = dump_dir
        self.gradients = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients.append(
            {name: None if p.grad is None else p.grad.tolist() for name, p in lambda_tensors(model).items()}
        )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        dump = {
            "process_index": args.process_index,
            "gradients": self.gradients,
            "lambda": {name: p.tolist() for name, p in lambda_tensors(model).items()},
        }
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"lambda_rank{args.process_index}.json").write_text(json.dumps(dump, indent=2))


def main() -> None:
    dump_dir = Path(sys.argv[1])
    trainer_init = transformers.Trainer.__init__

    def init_with_lambda_dump(self, *args, **kwargs):
        trainer_init(self, *args, **kwargs)
        self.add_callback(LambdaDumpCallback(dump_dir))

    transformers.Trainer.__init__ = init_with_lambda_dump
    sys.argv = [str(RECIPE), *sys.argv[2:]]
    sys.path.insert(0, str(RECIPE.parent))
    runpy.run_path(str(RECIPE), run_name="__main__")


if __name__ == "__main__":
    main()
