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

import transformers

from .architectures import ARCHITECTURES


# set by `hf-gpam serve`, inherited by the processes it starts (see hf_gpam.cli)
SERVE_BINDING_ENV = "HF_GPAM_SERVE_BINDING"


def bind_gpam_classes_to_transformers() -> list[str]:
    """Make ``getattr(transformers, "GpamLlamaForCausalLM")`` (and every other GPAM model class) resolve, in this
    process; return the names bound. Used by ``hf-gpam serve`` only: importing hf_gpam never does it."""
    names = []
    for architecture in ARCHITECTURES.values():
        for gpam_class in architecture.model_classes.values():
            setattr(transformers, gpam_class.__name__, gpam_class)
            names.append(gpam_class.__name__)
    return names


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
