"""The ``gpam_*`` configuration fields, declared once and mixed into the three GPAM config classes.

Validation happens in ``check_gpam_fields`` (called on construction and again when a model is built from the
config) and raises ``ValueError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field


GPAM_MODES = ("dagpam", "softmax")
GPAM_NEGATIVE_INITS = ("neg_identity", "normal")
GPAM_ATTENTION_TYPES = ("self", "cross")
GPAM_ROPE_VARIANTS = ("relative", "literal")
# λ⁺ and λ⁻ outside this range are accepted with a warning, not refused: the maths is defined for any finite λ.
# Below -1, (1 + λ⁺) < 0 puts the ordinary map in with a negative weight (the roles of the two maps swap); above 10,
# P_G = (1 + λ⁺)P⁺ − λ⁻P⁻ is a difference of two large multiples of nearly equal maps, so outputs and gradients grow
# with λ and half-precision rounding is multiplied by it. The defaults are 0.5 (new models) and 0.0 (patching); a
# value far outside the range is far more likely a typo (1e9 for 1e-9) than a choice.
GPAM_LAMBDA_SENSIBLE_RANGE = (-1.0, 10.0)


def finite_float(name: str, value) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` unless it is a finite int or float (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number (float)")
    return float(value)


@dataclass(kw_only=True)
class GpamConfigFields:
    """daGPAM hyper-parameters shared by ``GpamGPT2Config``, ``GpamBartConfig`` and ``GpamMarianConfig``.

    Placed first in the bases (``class GpamGPT2Config(GpamConfigFields, GPT2Config)``) so that its
    ``__post_init__`` validates the fields after the stock config has initialised.
    """

    gpam_mode: str = field(
        default="dagpam",
        metadata={"help": "'dagpam' for dual-attention GPAM, 'softmax' for stock attention in the same classes."},
    )
    gpam_lambda_init: float = field(
        default=0.5,
        metadata={"help": "Initial λ (λ⁺, and λ⁻ when tied). patch_model defaults it to 0.0 (identity at conversion)."},
    )
    gpam_lambda_neg_init: float | None = field(
        default=None, metadata={"help": "Initial λ⁻ when untied; None means the same as gpam_lambda_init."}
    )
    gpam_tie_lambda: bool = field(
        default=True, metadata={"help": "Tie λ⁺ = λ⁻ so that every row of the attention map sums to exactly 1."}
    )
    gpam_lambda_trainable: bool = field(
        default=True, metadata={"help": "Learn λ (the paper's best variant) or keep it fixed at its initial value."}
    )
    gpam_negative_init: str = field(
        default="neg_identity",
        metadata={"help": "Initial W⁻: 'neg_identity' (W⁻ = −I) or 'normal' (std = the model's initializer range)."},
    )
    gpam_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Layer indices that use daGPAM (None = all). For encoder-decoder models index i selects "
            "encoder layer i and decoder layer i."
        },
    )
    gpam_attention_types: list[str] = field(
        default_factory=lambda: list(GPAM_ATTENTION_TYPES),
        metadata={"help": "Which attention kinds use daGPAM: a non-empty subset of ['self', 'cross']."},
    )
    gpam_rope_variant: str = field(
        default="relative",
        metadata={
            "help": "Where Q⁻ meets rotary position embeddings (RoPE), in families that have them. 'relative': "
            "Q⁻ = RoPE(ReLU(Q̃)W⁻), built from the query Q̃ before rotation and rotated with the same positions, so "
            "P⁻, like P⁺, depends on positions only through i − j. 'literal': the spec read literally, "
            "Q⁻ = ReLU(Q⁺)W⁻ from the rotated query Q⁺ = RoPE(Q̃), so P⁻ also depends on absolute positions. "
            "Partial rotary (GPT-NeoX rotary_pct, Phi-3 partial_rotary_factor) rotates only the rotary dims, as "
            "stock does. Ignored by families without RoPE (GPT-2, BART, Marian, OPT). See docs/rope.md for the "
            "measurement behind the default."
        },
    )

    def __post_init__(self, **kwargs):
        # a stock config.json read into a GPAM config carries the stock model_type; the class's own must win, or
        # the saved config would point the Auto classes back at the stock model
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        self.check_gpam_fields()
        # the stock validators (architecture, token ids) that @strict would run on the parent config class
        self.validate()

    def gpam_num_layers(self) -> int:
        """Number of layer indices ``gpam_layers`` may name."""
        if getattr(self, "is_encoder_decoder", False):
            return max(self.encoder_layers, self.decoder_layers)
        return self.num_hidden_layers

    def check_gpam_fields(self) -> None:
        """Raise ``ValueError`` for any invalid ``gpam_*`` value; normalise numbers to float."""
        if self.gpam_mode not in GPAM_MODES:
            raise ValueError(f"gpam_mode={self.gpam_mode!r} is not one of {', '.join(map(repr, GPAM_MODES))}")
        for name in ("gpam_lambda_init", "gpam_lambda_neg_init"):
            value = getattr(self, name)
            if value is None and name == "gpam_lambda_neg_init":
                continue
            setattr(self, name, finite_float(name, value))
            low, high = GPAM_LAMBDA_SENSIBLE_RANGE
            if not low <= getattr(self, name) <= high:
                warnings.warn(
                    f"{name}={value!r} is outside the sensible range [{low:g}, {high:g}] of λ (gpam_config_fields."
                    "GPAM_LAMBDA_SENSIBLE_RANGE says why): the attention map P_G = (1+λ⁺)P⁺ − λ⁻P⁻ then swaps the "
                    "roles of its two maps or scales outputs and gradients by λ. Defaults: 0.5 (new models), 0.0 (patching).",
                    UserWarning,
                    stacklevel=3,
                )
        for name in ("gpam_tie_lambda", "gpam_lambda_trainable"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if (
            self.gpam_tie_lambda
            and self.gpam_lambda_neg_init is not None
            and self.gpam_lambda_neg_init != self.gpam_lambda_init
        ):
            raise ValueError(
                f"gpam_lambda_neg_init={self.gpam_lambda_neg_init} differs from gpam_lambda_init="
                f"{self.gpam_lambda_init} but gpam_tie_lambda=True; set gpam_tie_lambda=False for two coefficients"
            )
        if self.gpam_negative_init not in GPAM_NEGATIVE_INITS:
            raise ValueError(
                f"gpam_negative_init={self.gpam_negative_init!r} is not one of "
                f"{', '.join(map(repr, GPAM_NEGATIVE_INITS))}"
            )
        if self.gpam_rope_variant not in GPAM_ROPE_VARIANTS:
            raise ValueError(
                f"gpam_rope_variant={self.gpam_rope_variant!r} is not one of "
                f"{', '.join(map(repr, GPAM_ROPE_VARIANTS))}"
            )
        self._check_gpam_layers()
        types = self.gpam_attention_types
        if isinstance(types, str) or not isinstance(types, (list, tuple)) or len(types) == 0:
            raise ValueError(
                f"gpam_attention_types={types!r} must be a non-empty list drawn from ['self', 'cross'] "
                "(use gpam_mode='softmax' for no daGPAM at all)"
            )
        unknown = [t for t in types if t not in GPAM_ATTENTION_TYPES]
        if unknown or len(set(types)) != len(types):
            raise ValueError(
                f"gpam_attention_types={list(types)!r} must list distinct values from ['self', 'cross']"
            )
        self.gpam_attention_types = list(types)

    def _check_gpam_layers(self) -> None:
        layers = self.gpam_layers
        if layers is None:
            return
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)):
            raise ValueError(f"gpam_layers={layers!r} must be None (all layers) or a list of layer indices")
        num_layers = self.gpam_num_layers()
        for index in layers:
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num_layers:
                raise ValueError(
                    f"gpam_layers={list(layers)!r} contains {index!r}; layer indices must be integers in "
                    f"0..{num_layers - 1} (the model has {num_layers} layers)"
                )
        if len(set(layers)) != len(layers):
            raise ValueError(f"gpam_layers={list(layers)!r} lists a layer more than once")
        self.gpam_layers = sorted(layers)

    def gpam_layer_enabled(self, layer_idx: int, attention_type: str) -> bool:
        """Whether the attention module of kind ``attention_type`` in layer ``layer_idx`` uses daGPAM."""
        return (
            self.gpam_mode == "dagpam"
            and attention_type in self.gpam_attention_types
            and (self.gpam_layers is None or layer_idx in self.gpam_layers)
        )
