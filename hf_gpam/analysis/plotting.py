"""PNG figures for the diagnostics: per-layer curves of several models, signed attention maps, training curves.

Everything renders with matplotlib's non-interactive ``Agg`` backend into files; nothing is shown on screen and
no global matplotlib state is changed beyond selecting the backend when the first figure is drawn.

matplotlib is an optional dependency (``pip install "hf_gpam[diagnostics]"``). It is imported on first use, not
with this module: ``hf-gpam`` imports every sub-command when it builds its parser, and ``hf-gpam convert`` must
work where only torch and transformers are installed.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .diagnostics import ATTENTION_METRICS, HIDDEN_METRICS, ModelDiagnostics


METRIC_LABELS = {
    "residual_fro": "rank-collapse residual ‖X−1x̄ᵀ‖_F/‖X‖_F",
    "residual_l1inf": "rank-collapse residual, ℓ1,∞ (Dong et al.)",
    "mean_cosine": "mean pairwise token cosine",
    "entropy": "attention entropy (nats, of |P|)",
    "negative_mass": "share of negative attention mass",
    "query_grad_norm": "‖∂L/∂W_Q‖_F",
    "key_grad_norm": "‖∂L/∂W_K‖_F",
    "q_neg_grad_norm": "‖∂L/∂W⁻‖_F",
    "lambda": "mean λ over heads",
}
DEFAULT_METRICS = ("residual_fro", "residual_l1inf", "mean_cosine", "query_grad_norm", "entropy", "negative_mass")
LOG_SCALE_METRICS = ("query_grad_norm", "key_grad_norm", "q_neg_grad_norm")


@functools.cache
def _pyplot():
    """``matplotlib.pyplot`` on the ``Agg`` backend, imported on first use; a clear error when it is missing."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "hf_gpam.analysis.plotting draws its figures with matplotlib, which is not installed. Install it with "
            '`pip install "hf_gpam[diagnostics]"` (or `pip install matplotlib`).'
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def __getattr__(name: str):
    # `from hf_gpam.analysis.plotting import plt` (benchmarks/paper_study.py) keeps working without importing matplotlib
    # for everyone who imports this module
    if name == "plt":
        return _pyplot()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _as_runs(value) -> list[ModelDiagnostics]:
    runs = value if isinstance(value, (list, tuple)) else [value]
    return [run if isinstance(run, ModelDiagnostics) else ModelDiagnostics.from_dict(run) for run in runs]


def _mean_band(curves: list[list[float | None]]):
    # curves of one label (one per seed) -> x, mean, min, max; None (metric absent at that layer) -> NaN
    length = max(len(c) for c in curves)
    values = np.full((len(curves), length), np.nan)
    for row, curve in enumerate(curves):
        values[row, : len(curve)] = [np.nan if v is None else v for v in curve]
    with np.errstate(all="ignore"):
        return np.arange(length), np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)


def plot_layer_curves(
    results: Mapping[str, ModelDiagnostics | dict | Sequence[ModelDiagnostics | dict]],
    path: str,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    stack: str = "decoder",
    kind: str = "self",
    title: str | None = None,
) -> str:
    """Per-layer curves of several models on one figure: one panel per metric, one line per label.

    A label may map to several diagnostics (seeds): the line is their mean and the shaded band their min–max.
    Hidden-state metrics are drawn against depth (0 = block input), attention metrics against layer index.

    Args:
        results: label -> ``ModelDiagnostics`` (or its ``to_dict()``), or a list of them.
        path: the PNG to write (folders are created).
        metrics: names from ``HIDDEN_METRICS``, ``ATTENTION_METRICS`` or ``"lambda"``.
        stack: "decoder" (GPT-2, BART/Marian decoder) or "encoder". kind: "self" or "cross" attention.

    Returns:
        ``path``.

    Example:

    ```python
    >>> import torch
    >>> from hf_gpam import GpamGPT2LMHeadModel
    >>> from hf_gpam.analysis.diagnostics import diagnose_model
    >>> from hf_gpam.analysis.plotting import plot_layer_curves
    >>> from hf_gpam.testing_utils import tiny_gpam_config
    >>> result = diagnose_model(GpamGPT2LMHeadModel(tiny_gpam_config("gpt2")), torch.randint(3, 90, (2, 8)))
    >>> plot_layer_curves({"daGPAM": result}, "/tmp/curves.png")
    '/tmp/curves.png'
    ```
    """
    if not results:
        raise ValueError("plot_layer_curves: results is empty; pass at least one label -> diagnostics")
    allowed = HIDDEN_METRICS + ATTENTION_METRICS + ("lambda",)
    unknown = [m for m in metrics if m not in allowed]
    if unknown:
        raise ValueError(f"plot_layer_curves: unknown metric(s) {unknown}; allowed: {', '.join(allowed)}")
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = _pyplot().subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False)
    for axis, metric in zip(axes.flat, metrics):
        for index, (label, value) in enumerate(results.items()):
            curves = [run.curve(metric, stack, kind) for run in _as_runs(value)]
            if not any(v is not None for curve in curves for v in curve):
                continue
            x, mean, low, high = _mean_band(curves)
            color = f"C{index}"
            axis.plot(x, mean, marker="o", markersize=3, color=color, label=label)
            if len(curves) > 1:
                axis.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
        axis.set_title(METRIC_LABELS.get(metric, metric), fontsize=9)
        axis.set_xlabel("depth (0 = block input)" if metric in HIDDEN_METRICS else "layer")
        if metric in LOG_SCALE_METRICS and axis.lines and all(
            np.nanmin(line.get_ydata()) > 0 for line in axis.lines
        ):
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        figure.legend(
            handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=min(len(labels), 4), fontsize=9
        )
    figure.suptitle(title or f"{stack} {kind}-attention, per layer", y=0.995, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.9))
    return _save(figure, path)


def plot_signed_attention(
    components: Mapping[str, object],
    path: str,
    *,
    head: int = 0,
    sequence: int = 0,
    tokens: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    """P⁺, P⁻ and P_G of one head side by side with a diverging colormap centred at 0 (``TwoSlopeNorm``).

    ``components`` is what ``hf_gpam.analysis.diagnostics.attention_components`` returns. For a softmax module (no P⁻) only
    its map is drawn. Padding queries and keys of the chosen sequence are cut off.

    Returns:
        ``path``.

    Example:

    ```python
    >>> import torch
    >>> from hf_gpam import GpamGPT2Model
    >>> from hf_gpam.analysis.diagnostics import attention_components
    >>> from hf_gpam.analysis.plotting import plot_signed_attention
    >>> from hf_gpam.testing_utils import tiny_gpam_config
    >>> maps = attention_components(GpamGPT2Model(tiny_gpam_config("gpt2")), torch.randint(3, 90, (1, 6)))
    >>> plot_signed_attention(maps, "/tmp/maps.png", head=1)
    '/tmp/maps.png'
    ```
    """
    p_gpam = components["p_gpam"]
    num_heads = p_gpam.shape[1]
    if not 0 <= head < num_heads:
        raise ValueError(f"plot_signed_attention: head={head} is out of range; the module has {num_heads} heads")
    if not 0 <= sequence < p_gpam.shape[0]:
        raise ValueError(f"plot_signed_attention: sequence={sequence} is out of range (batch of {p_gpam.shape[0]})")
    query_mask = components.get("query_mask")
    length_q = int(query_mask[sequence].sum()) if query_mask is not None else p_gpam.shape[2]
    # keys of self-attention share the query padding; cross-attention keys are kept whole
    length_k = length_q if p_gpam.shape[2] == p_gpam.shape[3] else p_gpam.shape[3]

    panels = []
    if components.get("p_neg") is not None:
        lam_pos = float(components["lambda_pos"][head])
        lam_neg = float(components["lambda_neg"][head])
        panels = [
            ("P⁺ = softmax(Q⁺Kᵀs)", components["p_pos"]),
            ("P⁻ = softmax(Q⁻Kᵀs)", components["p_neg"]),
            (f"P_G = (1+{lam_pos:.3g})P⁺ − {lam_neg:.3g}P⁻", p_gpam),
        ]
    else:
        panels = [("P = softmax(QKᵀs)", p_gpam)]
    matrices = [
        np.asarray(m[sequence, head, :length_q, :length_k].detach().cpu().double()) for _, m in panels
    ]
    # symmetric limits: equal colour intensity means equal magnitude on both sides of 0
    limit = max(1e-6, max(float(np.abs(m).max()) for m in matrices))
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm

    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)

    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 0.8, 4.0), squeeze=False)
    image = None
    for index, (axis, (name, _), matrix) in enumerate(zip(axes[0], panels, matrices)):
        image = axis.imshow(matrix, cmap="RdBu_r", norm=norm, interpolation="nearest")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("key")
        if index == 0:
            # the panels share their rows; one label keeps it clear of the token ticks of the next panel
            axis.set_ylabel("query")
        if tokens is not None and len(tokens) >= max(length_q, length_k) and max(length_q, length_k) <= 40:
            axis.set_xticks(range(length_k), tokens[:length_k], rotation=90, fontsize=6)
            axis.set_yticks(range(length_q), tokens[:length_q], fontsize=6)
    figure.colorbar(image, ax=list(axes[0]), shrink=0.85, label="weight (0 = white)")
    figure.suptitle(title or f"head {head}", fontsize=10)
    return _save(figure, path)


def read_trainer_log(output_dir: str) -> list[dict]:
    """``log_history`` of a Trainer output folder (its ``trainer_state.json``, or the newest checkpoint's).

    Raises ``ValueError`` when the folder or the state file is missing.
    """
    if not os.path.isdir(output_dir):
        raise ValueError(f"{output_dir!r} is not a folder; pass a Trainer output_dir containing trainer_state.json")
    candidates = [os.path.join(output_dir, "trainer_state.json")]
    checkpoints = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()]
    for name in sorted(checkpoints, key=lambda d: int(d.split("-")[-1]), reverse=True):
        candidates.append(os.path.join(output_dir, name, "trainer_state.json"))
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as handle:
                return json.load(handle).get("log_history", [])
    raise ValueError(
        f"no trainer_state.json in {output_dir!r} or its checkpoint-* folders; is it a Trainer output_dir?"
    )


def plot_training_curves(
    runs: Mapping[str, list[dict]],
    path: str,
    *,
    metrics: Sequence[str] = ("loss", "eval_loss"),
    title: str | None = None,
) -> str:
    """Training-log curves (``log_history`` entries with ``step``) of several runs, one panel per metric.

    Args:
        runs: label -> log_history (a list of dicts as the Trainer writes them).
        path: the PNG to write.
        metrics: keys to plot against ``step``; a metric no run logged raises ``ValueError``.

    Example:

    ```python
    >>> from hf_gpam.analysis.plotting import plot_training_curves
    >>> log = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.5, "eval_loss": 2.7}]
    >>> plot_training_curves({"run": log}, "/tmp/train.png", metrics=("loss",))
    '/tmp/train.png'
    ```
    """
    if not runs:
        raise ValueError("plot_training_curves: no runs given")
    present = [m for m in metrics if any(m in entry for log in runs.values() for entry in log)]
    if not present:
        raise ValueError(f"plot_training_curves: none of the runs logged any of {list(metrics)}")
    figure, axes = _pyplot().subplots(1, len(present), figsize=(5.0 * len(present), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], present):
        for index, (label, log) in enumerate(runs.items()):
            points = [(e["step"], e[metric]) for e in log if metric in e and "step" in e]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="." if len(points) < 30 else None, color=f"C{index}", label=label)
        axis.set_title(metric, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path
