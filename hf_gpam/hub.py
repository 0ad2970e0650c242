"""Hub-ready output folders: weights, self-contained modeling code, tokenizer and a rendered model card.

Used by the training recipes and by ``hf-gpam convert``. Everything here duck-types GPAM models (a module is a
daGPAM module when it has ``gpam_lambda``), so models loaded through ``trust_remote_code`` work too.

The card templates live in ``model_cards/`` at the repository root and ship as package data in
``hf_gpam/model_cards/`` (``string.Template`` syntax, ``${name}`` placeholders): ``gpam_model_card.md`` is the default,
``LM_TEMPLATE_PATH`` and ``TRANSLATION_TEMPLATE_PATH`` are the cards of published checkpoints; pass ``template_path``
to use one of them or your own.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch
from huggingface_hub import ModelCardData
from torch import nn


def _model_cards_dir() -> Path:
    # A wheel ships the templates inside the package (pyproject.toml maps model_cards/ to hf_gpam/model_cards/);
    # a source checkout or an editable install has them only at the repository root, the canonical place.
    package_dir = Path(__file__).resolve().parent
    for folder in (package_dir / "model_cards", package_dir.parent / "model_cards"):
        if (folder / "gpam_model_card.md").is_file():
            return folder
    return package_dir / "model_cards"


# the generic card (render_model_card's default) and the cards of published checkpoints: pass one as template_path
MODEL_CARDS_DIR = _model_cards_dir()
DEFAULT_TEMPLATE_PATH = MODEL_CARDS_DIR / "gpam_model_card.md"
LM_TEMPLATE_PATH = MODEL_CARDS_DIR / "gpam_causal_lm_card.md"
TRANSLATION_TEMPLATE_PATH = MODEL_CARDS_DIR / "gpam_translation_card.md"
MODEL_CARD_FILENAME = "README.md"
GPAM_TAGS = ("gpam", "dagpam")


def gpam_lambda_values(model: nn.Module) -> dict[str, list]:
    """λ of every daGPAM attention module as plain lists: ``{module name: [λ per head]}`` (tied) or
    ``{module name: [[λ⁺ per head], [λ⁻ per head]]}`` (untied). Works on PEFT-wrapped and remote-code models.

    Example:

    ```python
    >>> import hf_gpam
    >>> from hf_gpam.hub import gpam_lambda_values
    >>> from hf_gpam.testing_utils import tiny_gpam_config
    >>> model = hf_gpam.GpamGPT2LMHeadModel(tiny_gpam_config("gpt2", gpam_lambda_init=0.25))
    >>> gpam_lambda_values(model)["transformer.h.0.attn"]
    [0.25, 0.25, 0.25, 0.25]
    ```
    """
    values = {}
    for name, module in model.named_modules():
        lam = getattr(module, "gpam_lambda", None)
        if lam is None or not isinstance(lam, nn.Module):
            continue
        # PEFT's modules_to_save wraps λ; the trained copy is the active one
        weight = lam.weight if hasattr(lam, "weight") else None
        if weight is None:
            continue
        values[_clean_module_name(name)] = weight.detach().float().cpu().tolist()
    return values


def _clean_module_name(name: str) -> str:
    # a PEFT-wrapped model prefixes every name with base_model.model.
    return name.removeprefix("base_model.model.")


def _lambda_table(lambdas: dict[str, list]) -> str:
    if not lambdas:
        return "No attention module uses daGPAM (softmax mode): nothing was learned."
    rows = ["| attention module | mean λ⁺ | mean λ⁻ | λ per head |", "|---|---|---|---|"]
    for name, weight in lambdas.items():
        tensor = torch.tensor(weight)
        positive, negative = (tensor, tensor) if tensor.dim() == 1 else (tensor[0], tensor[1])
        heads = ", ".join(f"{v:.3f}" for v in tensor.flatten().tolist())
        rows.append(f"| `{name}` | {positive.mean():.4f} | {negative.mean():.4f} | {heads} |")
    return "\n".join(rows)


def _results_block(results: dict | None) -> str:
    if not results:
        return "No evaluation was run for this folder."
    rows = ["| metric | value |", "|---|---|"]
    # nested values (e.g. the λ lists a recipe stores in all_results.json) have their own section
    for key, value in results.items():
        if not isinstance(value, (int, float, str)):
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        rows.append(f"| {key} | {shown} |")
    return "\n".join(rows)


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    gpam = sum(p.numel() for name, p in model.named_parameters() if ".gpam_" in name or name.startswith("gpam_"))
    # fixed λ lives in buffers, count it as a daGPAM parameter as well
    gpam += sum(b.numel() for name, b in model.named_buffers() if "gpam_lambda" in name)
    return total, gpam


def _auto_class_name(model: nn.Module) -> str:
    """The Auto class that loads ``model``'s class: its ``auto_map`` entry (set by ``save_pretrained``), else the
    usual head of the architecture."""
    class_name = type(getattr(model, "get_base_model", lambda: model)()).__name__
    for auto_class, reference in (getattr(model.config, "auto_map", None) or {}).items():
        if isinstance(reference, str) and reference.rsplit(".", 1)[-1] == class_name:
            return auto_class
    if getattr(model.config, "is_encoder_decoder", False):
        return "AutoModelForSeq2SeqLM"
    return "AutoModelForCausalLM"


def render_model_card(
    model: nn.Module,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    metrics: list[str] | None = None,
    results: dict | None = None,
    command: str | None = None,
    summary: str | None = None,
    tags: list[str] | None = None,
    limitations: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> str:
    """Render the model card (``README.md`` text with YAML front matter) of a GPAM model.

    Args:
        model: the GPAM model (hf_gpam classes, remote-code classes or a PEFT wrapper around one).
        repo_id: the Hub repository the card is for (shown in the loading example; a placeholder when None).
        base_model: the checkpoint the model was converted from or fine-tuned from (front matter ``base_model``).
        datasets, metrics: front matter lists (Hub dataset ids or free names, metric names).
        results: metric name -> value, shown as a table (e.g. the contents of ``all_results.json``).
        command: the exact command that produced the folder.
        summary: a paragraph under the title.
        tags: extra tags; ``gpam``, ``dagpam`` and the architecture are always added.
        limitations: an extra limitation specific to this model (e.g. "trained for 300 steps on ...").
        template_path: a ``string.Template`` file; ``DEFAULT_TEMPLATE_PATH`` (``model_cards/gpam_model_card.md``) by
            default, ``LM_TEMPLATE_PATH`` / ``TRANSLATION_TEMPLATE_PATH`` for published checkpoints.

    Example:

    ```python
    >>> import hf_gpam
    >>> from hf_gpam.hub import render_model_card
    >>> from hf_gpam.testing_utils import tiny_gpam_config
    >>> card = render_model_card(hf_gpam.GpamGPT2LMHeadModel(tiny_gpam_config("gpt2")), results={"perplexity": 12.5})
    >>> card.splitlines()[0], "library_name: transformers" in card
    ('---', True)
    ```
    """
    template_path = Path(template_path or DEFAULT_TEMPLATE_PATH)
    if not template_path.is_file():
        raise FileNotFoundError(
            f"render_model_card: template {template_path} not found. The templates ship with hf_gpam in "
            f"hf_gpam/model_cards/ ({MODEL_CARDS_DIR} here); pass template_path= to use your own."
        )
    config = model.config
    model_type = getattr(config, "model_type", "unknown")
    architecture = model_type.removeprefix("gpam_")
    lambdas = gpam_lambda_values(model)
    total, extra = _parameter_counts(model)
    pipeline_tag = "translation" if getattr(config, "is_encoder_decoder", False) else "text-generation"
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base_model,
        tags=sorted({*GPAM_TAGS, architecture, *(tags or [])}),
        datasets=datasets or None,
        metrics=metrics or None,
        pipeline_tag=pipeline_tag,
    )
    gpam_fields = {k: v for k, v in config.to_dict().items() if k.startswith("gpam_")}
    sites = sum(1 for name, module in model.named_modules() if hasattr(module, "gpam_q_neg"))
    attention_total = sites + sum(
        1
        for name, module in model.named_modules()
        if type(module).__name__.endswith("Attention") and not hasattr(module, "gpam_q_neg")
    )
    values = {
        "front_matter": card_data.to_yaml(),
        "title": repo_id.split("/")[-1] if repo_id else f"daGPAM {architecture} ({type(model).__name__})",
        "summary": summary or f"A {architecture} model whose attention uses daGPAM, saved with hf_gpam.",
        "gpam_sites": f"{sites} of {attention_total}",
        "extra_parameters": f"{extra:,}",
        "total_parameters": f"{total:,}",
        "extra_share": f"{100.0 * extra / max(total, 1):.2f}%",
        "gpam_settings": "`" + json.dumps(gpam_fields, sort_keys=True) + "`",
        "lambda_table": _lambda_table(lambdas),
        "auto_class": _auto_class_name(model),
        "repo_id": repo_id or "<user>/<repo>",
        "command": command or "(not recorded)",
        "results": _results_block(results),
        "limitations": limitations or "Check the results above on your own data before relying on this model.",
    }
    return string.Template(template_path.read_text(encoding="utf-8")).substitute(values)


def save_hub_ready(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    results: dict | None = None,
    **card_kwargs,
) -> list[str]:
    """Write a folder that can be pushed to the Hub as is, and return the names of the files in it.

    The folder holds the weights (``model.safetensors``), ``config.json`` with ``auto_map``, the self-contained
    modeling code (so ``from_pretrained(dir, trust_remote_code=True)`` works without hf_gpam), the generation
    config, the tokenizer when one is given, ``all_results.json`` when ``results`` is given, and ``README.md``
    rendered by ``render_model_card`` (``card_kwargs`` are passed on).

    ``use_cache`` is switched back on before saving: creating a ``Trainer`` turns it off, and a checkpoint saved
    that way would generate without the KV cache.

    Example:

    ```python
    >>> import tempfile, hf_gpam
    >>> from hf_gpam.hub import save_hub_ready
    >>> from hf_gpam.testing_utils import tiny_gpam_config
    >>> files = save_hub_ready(hf_gpam.GpamGPT2LMHeadModel(tiny_gpam_config("gpt2")), tempfile.mkdtemp())
    >>> "model.safetensors" in files and "README.md" in files
    True
    ```
    """
    os.makedirs(output_dir, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    if results is not None:
        with open(os.path.join(output_dir, "all_results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=4, sort_keys=True)
    card = render_model_card(model, results=results, **card_kwargs)
    Path(output_dir, MODEL_CARD_FILENAME).write_text(card, encoding="utf-8")
    return sorted(os.listdir(output_dir))


def hub_ready_problems(output_dir: str | os.PathLike) -> list[str]:
    """What keeps ``output_dir`` from being a self-contained Hub model folder (an empty list when nothing).

    Checks the safetensors weights, ``auto_map`` in ``config.json`` and that every module file it names is present,
    and a model card with YAML front matter tagged ``gpam``.
    """
    output_dir = Path(output_dir)
    problems = []
    if not any(output_dir.glob("model*.safetensors")):
        problems.append("no model*.safetensors weights")
    config_path = output_dir / "config.json"
    if not config_path.is_file():
        return problems + ["no config.json"]
    config = json.loads(config_path.read_text(encoding="utf-8"))
    auto_map = config.get("auto_map")
    if not auto_map:
        problems.append("config.json has no auto_map (the checkpoint would need hf_gpam installed)")
    else:
        for reference in auto_map.values():
            module_file = reference.split(".")[0] + ".py"
            if not (output_dir / module_file).is_file():
                problems.append(f"auto_map names {reference} but {module_file} is missing")
    card_path = output_dir / MODEL_CARD_FILENAME
    if not card_path.is_file():
        problems.append("no README.md model card")
    else:
        card = card_path.read_text(encoding="utf-8")
        if not card.startswith("---\n") or "- gpam" not in card.split("---", 2)[1]:
            problems.append("README.md has no YAML front matter tagged gpam")
    return problems
