"""Weight decay for daGPAM models: which parameters decay, for any Trainer or plain PyTorch loop.

transformers' ``Trainer`` decays every parameter except biases and LayerNorm weights. On a daGPAM model that
includes the two parameters GPAM adds to each attention module, and decay is wrong for both:

- ``gpam_lambda`` (λ per head): decay pulls λ toward 0, i.e. toward plain softmax attention. λ is a mixing
  weight, like a gate or a LayerNorm gain, not a feature matrix, so it is **never** decayed here.
- ``gpam_q_neg`` (W⁻, with Q⁻ = ReLU(Q⁺)W⁻): decay pulls W⁻ from its initial −I toward 0. At W⁻ = 0, Q⁻ = 0
  and the negative map P⁻ = softmax(0·Kᵀ + M) is uniform over the visible tokens: the negative branch stops
  looking at the keys at all. W⁻ = −I is also the point the paper's analysis is made at. So W⁻ is **not** decayed
  by default; ``gpam_weight_decay=True`` decays it like the other weight matrices.

With PEFT, the adapters on ``gpam_q_neg`` and the trained copies of ``gpam_lambda`` (``modules_to_save``) follow
the same rule: parameters are recognised by a ``gpam_q_neg`` / ``gpam_lambda`` component in their name, so the
helpers work on PEFT-wrapped models, on models loaded with ``trust_remote_code`` and on any model patched by
``hf_gpam.patch_model``. This module depends on torch and transformers only.

The training recipes use these helpers through a ``Trainer`` subclass (``--gpam_weight_decay``), and
``benchmarks/paper_study.py`` builds its AdamW groups with ``gpam_optimizer_groups``: both train the same model.
"""

from __future__ import annotations

import re

from torch import nn


__all__ = ["gpam_decay_parameter_names", "gpam_optimizer_groups"]

# a whole dotted-name component, so "gpam_lambda" matches "...attn.gpam_lambda.weight" and PEFT's
# "...gpam_lambda.modules_to_save.default.weight", but not a hypothetical "my_gpam_lambda_scale"
_LAMBDA_NAME = re.compile(r"(?:^|\.)gpam_lambda(?:\.|$)")
_W_NEG_NAME = re.compile(r"(?:^|\.)gpam_q_neg(?:\.|$)")


def _stock_decay_parameter_names(model: nn.Module) -> list[str]:
    # transformers' own rule (biases, LayerNorm layers and *norm* names are excluded), taken from the Trainer so
    # that it follows the installed release instead of a copy of its patterns; the method does not use `self`
    from transformers import Trainer

    return Trainer.get_decay_parameter_names(None, model)


def gpam_decay_parameter_names(model: nn.Module, gpam_weight_decay: bool = False) -> list[str]:
    """The names of the parameters that weight decay applies to, with daGPAM's rule on top of transformers'.

    Same contract as ``Trainer.get_decay_parameter_names``: the names returned are the ones that **do** decay.
    Starting from transformers' rule (no decay for biases and norms), every ``gpam_lambda`` parameter is removed,
    and every ``gpam_q_neg`` parameter (W⁻, or its LoRA adapters) is removed unless ``gpam_weight_decay`` is True.

    Why W⁻ does not decay by default: decay pulls W⁻ from −I (the paper's analysis point and the default
    initialisation) toward 0, where Q⁻ = 0 and the negative map P⁻ is uniform over the visible tokens.

    Args:
        model: any ``nn.Module``, e.g. a GPAM model, a patched stock model or a ``peft.PeftModel`` around one.
        gpam_weight_decay: decay W⁻ (``gpam_q_neg``) like the other weight matrices. λ is never decayed.

    Returns:
        Parameter names as ``model.named_parameters()`` spells them, in that order.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from hf_gpam.testing_utils import tiny_gpam_config
    >>> from hf_gpam.training import gpam_decay_parameter_names
    >>> model = AutoModelForCausalLM.from_config(tiny_gpam_config("gpt2"))
    >>> names = gpam_decay_parameter_names(model)
    >>> any("gpam_" in name for name in names), "transformer.h.0.attn.c_attn.weight" in names
    (False, True)
    >>> any("gpam_q_neg" in name for name in gpam_decay_parameter_names(model, gpam_weight_decay=True))
    True
    ```
    """
    decayed = set(_stock_decay_parameter_names(model))

    def decays(name: str) -> bool:
        if name not in decayed or _LAMBDA_NAME.search(name):
            return False
        return gpam_weight_decay or not _W_NEG_NAME.search(name)

    return [name for name, _ in model.named_parameters() if decays(name)]


def gpam_optimizer_groups(model: nn.Module, weight_decay: float, gpam_weight_decay: bool = False) -> list[dict]:
    """The two optimizer parameter groups of a daGPAM model: ``weight_decay`` for the parameters named by
    ``gpam_decay_parameter_names``, 0.0 for the others (biases, norms, λ and, by default, W⁻).

    Only parameters with ``requires_grad`` are included (a frozen base under LoRA, a fixed λ). Pass the result
    to any ``torch.optim`` optimizer.

    Args:
        model: the model to optimise.
        weight_decay: the decay of the first group.
        gpam_weight_decay: decay W⁻ (``gpam_q_neg``) too; see ``gpam_decay_parameter_names``.

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]``.

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM
    >>> from hf_gpam.testing_utils import tiny_gpam_config
    >>> from hf_gpam.training import gpam_optimizer_groups
    >>> model = AutoModelForCausalLM.from_config(tiny_gpam_config("gpt2"))
    >>> optimizer = torch.optim.AdamW(gpam_optimizer_groups(model, weight_decay=0.01), lr=1e-3)
    >>> [group["weight_decay"] for group in optimizer.param_groups]
    [0.01, 0.0]
    ```
    """
    decay_names = set(gpam_decay_parameter_names(model, gpam_weight_decay=gpam_weight_decay))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for name, p in trainable if name in decay_names], "weight_decay": weight_decay},
        {"params": [p for name, p in trainable if name not in decay_names], "weight_decay": 0.0},
    ]
