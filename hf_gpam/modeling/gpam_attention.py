"""daGPAM attention modules: the new parameters and their initialisation.

``GpamAttentionMixin`` is placed in front of transformers' own attention classes
(``GpamBartAttention(GpamAttentionMixin, BartAttention)``) and adds only parameters: the ``forward`` is the stock
one, which calls the attention function its config names. A converted module reads its model's config through
``GpamAttentionConfig``, which names the daGPAM function registered in ``gpam_interface`` for the model's backend;
the model's config itself keeps the stock name. A stock module is converted in place by
``convert_attention_module``, which is how both new models and ``patch_model`` get their daGPAM layers.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import initialization as init

from .gpam_config_fields import finite_float
from .gpam_interface import gpam_attn_implementation
from .gpam_rope import ROTARY_LAYOUTS, rotary_layout


class GpamLambda(nn.Module):
    """The per-head mixing coefficients λ of one attention module, kept in float32.

    ``weight`` has shape ``(H,)`` when λ⁺ and λ⁻ are tied (rows of P_G sum to exactly 1) or ``(2, H)`` as
    ``[λ⁺; λ⁻]`` when untied. It is a module rather than a bare parameter so that PEFT's ``modules_to_save`` can
    train and save it. A fixed λ is a persistent buffer rather than a frozen parameter: the checkpoint key is the
    same (``gpam_lambda.weight``), it stays fixed across ``from_pretrained`` (which re-creates parameters as
    trainable), and optimisers and DDP never see it.
    """

    def __init__(self, num_heads: int, *, tied: bool, trainable: bool = True, device=None):
        super().__init__()
        shape = (num_heads,) if tied else (2, num_heads)
        weight = torch.zeros(shape, dtype=torch.float32, device=device)
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    @property
    def trainable(self) -> bool:
        return isinstance(self.weight, nn.Parameter)

    @property
    def tied(self) -> bool:
        return self.weight.dim() == 1

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(λ⁺, λ⁻)``, each of shape (H,).

        A forward call rather than a plain attribute read, so that wrappers such as PEFT's ``modules_to_save``
        (which route ``forward`` to the trained copy) are honoured.
        """
        if self.tied:
            return self.weight, self.weight
        return self.weight[0], self.weight[1]

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .bfloat16() follow the model's device but not its dtype: λ stays float32, so that
        # small updates are not rounded away (from_pretrained(dtype=...) keeps it too: _keep_in_fp32_modules_strict).
        # The float tensor is moved, never cast down and back up.
        def keep_float32(tensor):
            moved = fn(tensor)
            if tensor.is_floating_point() and moved.dtype != tensor.dtype:
                return tensor.to(device=moved.device)
            return moved

        return super()._apply(keep_float32, recurse)

    def extra_repr(self) -> str:
        return f"num_heads={self.weight.shape[-1]}, tied={self.tied}, trainable={self.trainable}"


class GpamAttentionConfig:
    """The model's config as a daGPAM attention module reads it.

    Every attribute is the model config's (read and written through to it), except ``_attn_implementation``: the
    stock forward looks its attention function up by that name, and here it names the daGPAM function for the
    model's backend (``"sdpa"`` -> ``"gpam_sdpa"``, ``"flex_attention"`` -> ``"gpam_flex_attention"``, ...; see
    ``gpam_interface.gpam_attn_implementation``). The model config keeps the stock name, so transformers' own checks on
    it (continuous batching, ``output_attentions``, masks) see a stock model, and switching the backend
    (``set_attn_implementation``, or writing the name into the config) switches the daGPAM modules with it.
    """

    def __init__(self, config):
        self.__dict__["gpam_model_config"] = config

    @property
    def _attn_implementation(self) -> str:
        return gpam_attn_implementation(self.gpam_model_config._attn_implementation)

    def __getattr__(self, name: str):
        if name == "gpam_model_config":
            # not set yet (an object under construction by copy or pickle)
            raise AttributeError(name)
        return getattr(self.gpam_model_config, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.gpam_model_config, name, value)

    def __getstate__(self) -> dict:
        return {"gpam_model_config": self.gpam_model_config}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"GpamAttentionConfig({type(self.gpam_model_config).__name__}, backend {self._attn_implementation!r})"


def model_config_of(config):
    """The model config behind ``config`` (a ``GpamAttentionConfig`` or the config itself)."""
    return config.__dict__.get("gpam_model_config", config) if config is not None else None


def hand_on_rotary_embeddings(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of RoPE-family daGPAM modules: under ``gpam_rope_variant="relative"``, add the stock forward's
    ``position_embeddings=(cos, sin)`` as the ``gpam_position_embeddings`` keyword.

    The stock forward passes its other keywords on to the attention function, which builds Q⁻ from the unrotated
    query with them (``gpam_rope.negative_query``). A keyword rather than state kept on the module: nothing
    outlives the call, so the KV cache, gradient checkpointing's recomputation and ``torch.compile`` see a plain
    function of the inputs, and the stock forward is not copied.
    """
    if getattr(module, "gpam_rope_variant", None) != "relative":
        return None
    position_embeddings = kwargs.get("position_embeddings")
    if position_embeddings is None:
        # every family in the table passes it by keyword; a positional caller is found through the signature
        position = list(inspect.signature(type(module).forward).parameters).index("position_embeddings") - 1
        position_embeddings = args[position] if len(args) > position else None
    return args, {**kwargs, "gpam_position_embeddings": position_embeddings}


def query_head_count(module: nn.Module) -> int:
    """The number of query heads H of a transformers attention module (attribute names differ by family)."""
    for name in ("num_heads", "num_attention_heads"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    return module.config.num_attention_heads


class GpamAttentionMixin:
    """The daGPAM parameters of an attention module: ``gpam_q_neg`` (W⁻ᵀ) and ``gpam_lambda`` (λ).

    Nothing else: the stock ``forward`` runs unchanged and reaches the daGPAM map through the attention interface
    (``gpam_interface``). The host module must provide ``head_dim`` and the number of query heads (``num_heads``
    or ``config.num_attention_heads``).
    """

    def add_gpam_parameters(
        self,
        *,
        lambda_init: float,
        lambda_neg_init: float | None,
        tie_lambda: bool,
        lambda_trainable: bool,
        negative_init: str,
        initializer_range: float,
        device: torch.device,
        dtype: torch.dtype,
        rope_variant: str,
    ) -> None:
        """Create and initialise ``gpam_q_neg`` (on ``device`` in ``dtype``) and ``gpam_lambda`` (float32).

        ``rope_variant`` (``gpam_rope_variant``) is kept on the module for the attention function; modules whose
        family has no rotary embeddings never read it.
        """
        if negative_init not in ("neg_identity", "normal"):
            raise ValueError(f"gpam_negative_init={negative_init!r} is not one of 'neg_identity', 'normal'")
        if rope_variant not in ("relative", "literal"):
            raise ValueError(f"gpam_rope_variant={rope_variant!r} is not one of 'relative', 'literal'")
        self.gpam_rope_variant = rope_variant
        # a RoPE family: the stock forward rotates Q̃ and K with position_embeddings=(cos, sin)
        self.gpam_rotary = "position_embeddings" in inspect.signature(type(self).forward).parameters
        if self.gpam_rotary:
            self.register_forward_pre_hook(hand_on_rotary_embeddings, with_kwargs=True)
            # which dims the stock RoPE rotates together: the relative reading undoes and redoes that rotation
            self.gpam_rotary_layout = rotary_layout(type(self), self.head_dim)
            if rope_variant == "relative" and self.gpam_rotary_layout is None:
                raise ValueError(
                    f"gpam_rope_variant='relative' needs the rotary layout of {type(self).__name__}, and its modeling "
                    "file's apply_rotary_pos_emb matches none of the layouts daGPAM can undo "
                    f"({', '.join(map(repr, ROTARY_LAYOUTS))}: pairs (i, i + D/2) or (2i, 2i + 1)). Use "
                    "gpam_rope_variant='literal' (Q⁻ from the rotated query), which needs no inverse rotation."
                )
        self.gpam_lambda_pos_init = finite_float("gpam_lambda_init", lambda_init)
        self.gpam_lambda_neg_init = (
            self.gpam_lambda_pos_init
            if lambda_neg_init is None
            else finite_float("gpam_lambda_neg_init", lambda_neg_init)
        )
        if tie_lambda and self.gpam_lambda_neg_init != self.gpam_lambda_pos_init:
            raise ValueError(
                "gpam_lambda_neg_init differs from gpam_lambda_init but gpam_tie_lambda=True; "
                "set gpam_tie_lambda=False to use two coefficients"
            )
        self.gpam_negative_init = negative_init
        self.gpam_initializer_range = initializer_range
        self.gpam_q_neg = nn.Linear(self.head_dim, self.head_dim, bias=False, device=device, dtype=dtype)
        self.gpam_lambda = GpamLambda(
            query_head_count(self), tied=tie_lambda, trainable=lambda_trainable, device=device
        )
        self.reset_gpam_parameters()

    @torch.no_grad()
    def reset_gpam_parameters(self) -> None:
        """(Re)initialise the daGPAM parameters from the stored init settings.

        Uses transformers' guarded init functions, so tensors already loaded from a checkpoint (flagged
        ``_is_hf_initialized``) are left alone; this is what ``initialize_weights`` relies on.
        """
        weight = self.gpam_q_neg.weight
        if self.gpam_negative_init == "neg_identity":
            # W⁻ = −I: Q⁻ = −ReLU(Q⁺), the paper's analysis point
            init.copy_(weight, -torch.eye(self.head_dim, dtype=weight.dtype, device=weight.device))
        else:
            init.normal_(weight, mean=0.0, std=self.gpam_initializer_range)
        lam = self.gpam_lambda.weight
        if self.gpam_lambda.tied:
            init.constant_(lam, self.gpam_lambda_pos_init)
        else:
            values = torch.tensor([self.gpam_lambda_pos_init, self.gpam_lambda_neg_init], dtype=lam.dtype)
            init.copy_(lam, values.to(lam.device)[:, None].expand_as(lam))


def compute_dtype(module: nn.Module, config) -> torch.dtype:
    """The dtype a (possibly quantized) attention module computes in: what W⁻ is created in."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    for submodule in module.modules():
        # bitsandbytes' Linear4bit keeps it here
        dtype = getattr(submodule, "compute_dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.get_default_dtype()


def convert_attention_module(module: nn.Module, gpam_class: type, config) -> None:
    """Turn a stock attention module into ``gpam_class`` in place, adding its daGPAM parameters.

    Existing weights are untouched; the new ones are created on the module's device, W⁻ in its compute dtype and λ
    in float32, and initialised from the ``gpam_*`` fields of ``config``. The compute dtype is the dtype of the
    module's floating-point weights; in a quantized module (bitsandbytes stores integers) the dtype its quantized
    layers compute in, else the config's ``dtype``.
    """
    reference = next(module.parameters())
    dtype = compute_dtype(module, config)
    if getattr(module, "config", None) is None:
        raise ValueError(
            f"{type(module).__name__} keeps no config; daGPAM routes a module to its attention function through the "
            "config the stock forward reads _attn_implementation from"
        )
    module.__class__ = gpam_class
    # the module looks its attention function up through this view (see GpamAttentionConfig)
    module.config = GpamAttentionConfig(model_config_of(module.config))
    module.add_gpam_parameters(
        lambda_init=config.gpam_lambda_init,
        lambda_neg_init=config.gpam_lambda_neg_init,
        tie_lambda=config.gpam_tie_lambda,
        lambda_trainable=config.gpam_lambda_trainable,
        negative_init=config.gpam_negative_init,
        initializer_range=config.initializer_range if hasattr(config, "initializer_range") else config.init_std,
        device=reference.device,
        dtype=dtype,
        rope_variant=config.gpam_rope_variant,
    )
