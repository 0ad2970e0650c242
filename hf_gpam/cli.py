"""The ``hf-gpam`` command line: one sub-command per module, each exposing ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys


# sub-command -> (module, one-line help); modules are imported only when their command runs
COMMANDS = {
    "convert": ("hf_gpam.convert", "patch a stock checkpoint with daGPAM and write a Hub-ready folder (no training)"),
    "demo": ("hf_gpam.demo", "build a GPAM model, patch a stock one, save and reload it with trust_remote_code"),
    "diagnose": ("hf_gpam.diagnose_cli", "per-layer rank collapse, gradients and attention maps of models on text"),
    "compare-curves": ("hf_gpam.compare_curves_cli", "training-log curves of several Trainer output dirs on one figure"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-gpam", description="daGPAM attention for HuggingFace Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(module_name=module_name)
        importlib.import_module(module_name).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; a ``ValueError`` (bad model, input or option) is printed as one line, exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args.module_name).run(args) or 0
    except ValueError as error:
        print(f"hf-gpam {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
