"""``hf-gpam serve``: ``transformers serve`` for daGPAM checkpoints, with the same options and the OpenAI-compatible API.

Why a command of its own: ``transformers serve`` loads a checkpoint with ``getattr(transformers,
config.architectures[0])`` (``transformers/cli/serving/model_manager.py``, 5.24 and 5.25 alike; 5.25 falls back to
``AutoModelForCausalLM`` only for configs that name no architecture). A class that reaches transformers through
remote code (``GpamLlamaForCausalLM``) is never an attribute of the ``transformers`` package, so
``transformers serve CHECKPOINT --trust-remote-code`` stops with ``AttributeError`` before loading anything, for
every remote-code model, not only daGPAM ones. This command runs the same server after binding the GPAM model classes
of ``hf_gpam.ARCHITECTURES`` to those names on the ``transformers`` module, in its own processes only: this one, and the
model worker transformers 5.25 spawns (a spawned process re-imports the main module, ``hf_gpam.cli``, which binds the
classes when ``HF_GPAM_SERVE_BINDING=1``, set here). The server then loads the checkpoint with hf_gpam's own class,
which is what ``trust_remote_code`` would have given.

    hf-gpam serve my-gpam-model --port 8000                           # the same options as transformers serve
    hf-gpam serve my-gpam-model --continuous-batching

Everything after ``serve`` is handed to ``transformers serve`` unchanged (``--help`` lists its options).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..serving.transformers_binding import SERVE_BINDING_ENV, bind_gpam_classes_to_transformers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "serve_args", nargs=argparse.REMAINDER,
        help="arguments of `transformers serve` (the checkpoint folder or Hub id first, then its options)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        from transformers.cli.transformers import main as transformers_cli
    except ImportError as error:
        raise ValueError(f"transformers' CLI is not importable ({error}); install transformers[serving]") from error
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ValueError(
            f"hf-gpam serve needs FastAPI and Uvicorn ({error}): pip install 'hf_gpam[serving]'"
        ) from error
    os.environ[SERVE_BINDING_ENV] = "1"
    bind_gpam_classes_to_transformers()
    sys.argv = ["transformers", "serve", *args.serve_args]
    transformers_cli()
    return 0
