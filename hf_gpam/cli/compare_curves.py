"""``hf-gpam compare-curves``: training curves of several Trainer runs on one figure.

    hf-gpam compare-curves runs/softmax runs/dagpam --output curves.png --metrics loss eval_loss

Each RUN_DIR is a Trainer ``output_dir``; its ``trainer_state.json`` (or the newest ``checkpoint-*/``'s) holds the
``log_history`` that is plotted against ``step``. A short table with the last training loss and the best
evaluation loss of every run is printed.
"""

from __future__ import annotations

import argparse
import json
import os

from ..analysis.plotting import plot_training_curves, read_trainer_log


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Trainer output folders")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: folder names)")
    parser.add_argument("--metrics", nargs="+", default=["loss", "eval_loss"], help="log_history keys to plot")
    parser.add_argument("--title", default=None)


def _read_log(run_dir: str) -> list[dict]:
    try:
        return read_trainer_log(run_dir)
    except json.JSONDecodeError as error:
        # the decoder's message gives a line and column but not the file: name the run
        raise ValueError(f"the trainer_state.json of {run_dir!r} is not valid JSON ({error})") from error


def run(args: argparse.Namespace) -> int:
    labels = args.labels or [os.path.basename(os.path.normpath(run)) for run in args.runs]
    if len(labels) != len(args.runs):
        raise ValueError(f"--labels has {len(labels)} entries for {len(args.runs)} runs; give one label per run")
    if len(set(labels)) != len(labels):
        raise ValueError(f"run labels must be unique, got {labels}; pass --labels")
    logs = {label: _read_log(run) for label, run in zip(labels, args.runs)}
    path = plot_training_curves(logs, args.output, metrics=args.metrics, title=args.title)
    print(f"{'run':30s} {'steps':>6s} {'last loss':>10s} {'best eval_loss':>15s}")
    for label, log in logs.items():
        losses = [e["loss"] for e in log if "loss" in e]
        evals = [e["eval_loss"] for e in log if "eval_loss" in e]
        steps = max((e.get("step", 0) for e in log), default=0)
        last = f"{losses[-1]:.4f}" if losses else "-"
        best = f"{min(evals):.4f}" if evals else "-"
        print(f"{label[:30]:30s} {steps:6d} {last:>10s} {best:>15s}")
    print(f"wrote {path}")
    return 0
