"""The ``hf-gpam`` command line: one sub-command per module, each exposing ``add_arguments`` and ``run``.

Errors: bad input ends a sub-command with one line on stderr and exit status 2, never a traceback. "Bad input"
is what a user can fix by changing the command or the files it reads:

- ``ValueError`` (an unsupported model type, an out-of-range option, empty text; ``json.JSONDecodeError`` for a
  JSON file that is not JSON is one),
- ``OSError``, alias ``EnvironmentError`` (``FileNotFoundError``, ``PermissionError``; transformers raises it for
  a missing checkpoint, an unknown Hub id, no network with ``HF_HUB_OFFLINE=1`` and a ``config.json`` that is not
  JSON),
- ``safetensors.SafetensorError`` (a truncated or corrupt ``*.safetensors`` file).

Anything else (``RuntimeError`` from torch, ``KeyError``, ``AttributeError``...) is a bug in hf_gpam or in a
library it calls and keeps its traceback, so it can be reported and fixed rather than hidden behind an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from safetensors import SafetensorError


# sub-command -> (module, one-line help); modules are imported only when their command runs
COMMANDS = {
    "convert": ("hf_gpam.convert", "patch a stock checkpoint with daGPAM and write a Hub-ready folder (no training)"),
    "demo": ("hf_gpam.demo", "build a GPAM model, patch a stock one, save and reload it with trust_remote_code"),
    "diagnose": ("hf_gpam.diagnose_cli", "per-layer rank collapse, gradients and attention maps of models on text"),
    "compare-curves": ("hf_gpam.compare_curves_cli", "training-log curves of several Trainer output dirs on one figure"),
    "serve": ("hf_gpam.serve_cli", "transformers serve for daGPAM checkpoints (OpenAI-compatible API, continuous batching)"),
}

# hf-gpam serve's model worker: transformers 5.25+ loads the served model in a spawned process, which re-imports the
# main module (this one, or the hf-gpam script that imports it); the GPAM classes are bound there too
if os.environ.get("HF_GPAM_SERVE_BINDING") == "1":
    from .serve_cli import bind_gpam_classes_to_transformers

    bind_gpam_classes_to_transformers()

# what main() reports as a one-line error with exit status 2 (see the module docstring)
BAD_INPUT_ERRORS = (ValueError, OSError, SafetensorError)


def looks_like_local_path(name: str) -> bool:
    """True when ``name`` can only mean a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``), not a Hub id.

    A Hub id is ``name`` or ``namespace/name``; transformers answers a missing local folder that looks like one
    with a confusing "Repo id must be in the form..." message, so the sub-commands check such paths first.
    """
    if name.startswith((".", "/", "~")) or (os.altsep is not None and os.altsep in name):
        return True
    return os.sep in name and not re.fullmatch(r"[\w.-]+/[\w.-]+", name)


def check_model_source(name: str) -> None:
    """Raise ``FileNotFoundError`` when ``name`` is meant as a local folder (by its form) and there is none."""
    if not os.path.isdir(name) and (looks_like_local_path(name) or os.path.exists(name)):
        raise FileNotFoundError(f"model folder {name!r} does not exist (pass a local folder or a Hub id)")


def unreadable_weights(name: str, error: SafetensorError) -> OSError:
    """The error to raise for a ``SafetensorError`` while loading ``name``: safetensors' own message ("incomplete
    metadata", "header too small") says neither which checkpoint it was reading nor what to do."""
    return OSError(
        f"cannot read the weights of {name!r}: a *.safetensors file is truncated or corrupt ({error}); save or "
        "download the checkpoint again"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-gpam", description="daGPAM attention for HuggingFace Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(module_name=module_name)
        importlib.import_module(module_name).add_arguments(command)
    return parser


def _one_line(error: BaseException, command: str) -> str:
    # transformers' OSErrors span several lines; the prefix is dropped when the error already carries it
    message = " ".join(str(error).split()).removeprefix(f"hf-gpam {command}: ")
    if not isinstance(error, ValueError):
        # "FileNotFoundError: ..." / "SafetensorError: ..." say what kind of input was wrong
        message = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return f"hf-gpam {command}: error: {message}"


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. Bad input (``BAD_INPUT_ERRORS``) is printed as one line on stderr, exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args.module_name).run(args) or 0
    except BAD_INPUT_ERRORS as error:
        print(_one_line(error, args.command), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
