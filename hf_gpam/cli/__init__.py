"""The ``hf-gpam`` command line: one sub-command per module of this package, each exposing ``add_arguments`` and
``run``. Only the module of the command that runs is imported: ``hf-gpam --help`` imports none of them (nor torch).

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
import sys

from ..modeling.gpam_loading import check_model_source, looks_like_local_path


# sub-command -> (module, one-line help); modules are imported only when their command runs
COMMANDS = {
    "convert": ("hf_gpam.cli.convert", "patch a stock checkpoint with daGPAM and write a Hub-ready folder (no training)"),
    "demo": ("hf_gpam.cli.demo", "build a GPAM model, patch a stock one, save and reload it with trust_remote_code"),
    "diagnose": ("hf_gpam.cli.diagnose", "per-layer rank collapse, gradients and attention maps of models on text"),
    "compare-curves": ("hf_gpam.cli.compare_curves", "training-log curves of several Trainer output dirs on one figure"),
    "serve": ("hf_gpam.cli.serve", "transformers serve for daGPAM checkpoints (OpenAI-compatible API, continuous batching)"),
}

# hf-gpam serve's model worker: transformers 5.25+ loads the served model in a spawned process, which re-imports the
# main module (this one, or the hf-gpam script that imports it); the GPAM classes are bound there too
if os.environ.get("HF_GPAM_SERVE_BINDING") == "1":
    from ..serving.transformers_binding import bind_gpam_classes_to_transformers

    bind_gpam_classes_to_transformers()


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """What ``main()`` reports as a one-line error with exit status 2 (see the module docstring)."""
    from safetensors import SafetensorError

    return (ValueError, OSError, SafetensorError)


def unreadable_weights(name: str, error: Exception) -> OSError:
    """The error to raise for a ``SafetensorError`` while loading ``name``: safetensors' own message ("incomplete
    metadata", "header too small") says neither which checkpoint it was reading nor what to do."""
    return OSError(
        f"cannot read the weights of {name!r}: a *.safetensors file is truncated or corrupt ({error}); save or "
        "download the checkpoint again"
    )


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: the sub-commands by name and help line, without their options (their modules are not
    imported; ``command_parser`` builds one sub-command's full parser)."""
    parser = argparse.ArgumentParser(prog="hf-gpam", description="daGPAM attention for HuggingFace Transformers")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        # add_help=False: `hf-gpam convert --help` reaches the command's own parser
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The full parser of sub-command ``name`` (imports its module)."""
    module_name, help_text = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"hf-gpam {name}", description=help_text)
    importlib.import_module(module_name).add_arguments(parser)
    parser.set_defaults(command=name, module_name=module_name)
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
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen, rest = build_parser().parse_known_args(argv)
    args = command_parser(chosen.command).parse_args(rest)
    try:
        return importlib.import_module(args.module_name).run(args) or 0
    except bad_input_errors() as error:
        print(_one_line(error, args.command), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
