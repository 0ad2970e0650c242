"""The RoPE reading of Q⁻ in rotary families (``gpam_rope_variant``).

The stock attention module rotates its query and keys with the ``(cos, sin)`` of the model's rotary embedding before
the attention function sees them, so the query that reaches daGPAM is Q⁺ = RoPE(Q̃). Two readings of Q⁻:

- ``"literal"``: Q⁻ = ReLU(Q⁺) W⁻, the spec taken literally; P⁻ then sees absolute positions.
- ``"relative"``: Q⁻ = RoPE(ReLU(RoPE⁻¹(Q⁺)) W⁻), rotated with the same positions as Q⁺ and K, so P⁻ depends on
  i − j only, like P⁺. The ``(cos, sin)`` reach the attention function as the ``gpam_position_embeddings`` keyword,
  handed on by a forward pre-hook of the daGPAM module (``gpam_attention.hand_on_rotary_embeddings``).

The rotation coefficients are derived once per forward, where cos/sin are made: a forward hook on the model's rotary
embedding (``attach_rotation_coefficients``) returns its ``(cos, sin)`` as ``RotaryEmbeddings``, the same pair carrying
the coefficients, which travels with it to every layer and dies with it. Nothing is kept between forwards (no
process- or model-level cache: nothing outlives the model, an in-place change is seen by the next forward,
``inference_mode`` tensors are fine), and a ``(cos, sin)`` made anywhere else gets its coefficients derived in the call.
While ``torch.compile`` traces, the hook steps aside and the coefficients are derived in the graph, where they fuse.
"""

from __future__ import annotations

import sys

import torch
from torch.nn import functional as F


ROTARY_LAYOUTS = ("half", "interleaved")


def _rotate_pairs(x: torch.Tensor, layout: str) -> torch.Tensor:
    # "half": dims i and i + R/2 form one rotated pair (Llama, Qwen, Gemma, Phi-3, GPT-NeoX, OLMo2: every RoPE
    # family of the table); "interleaved": dims 2i and 2i + 1 do (Cohere, GPT-J)
    if layout == "half":
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    if layout == "interleaved":
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    raise ValueError(f"rotary layout {layout!r} is not one of {', '.join(map(repr, ROTARY_LAYOUTS))}")


def rotate_query(
    query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False, layout: str = "half"
) -> torch.Tensor:
    """RoPE (or its inverse) on the first R = ``cos.shape[-1]`` dims of ``query`` (B, H, T, D); the rest pass through.

    ``cos`` and ``sin`` are (B, T, R), as a stock rotary embedding returns them; R < D is partial rotary (GPT-NeoX
    ``rotary_pct``, Phi-3 ``partial_rotary_factor``). ``layout`` says which dims form a rotated pair (see
    ``ROTARY_LAYOUTS``; ``rotary_layout`` finds it for a stock attention class). RoPE scales each pair by
    a = √(cos² + sin²) (1 for plain RoPE, the attention factor of YaRN-style scalings), so the inverse rotates back
    and divides by a², which undoes the forward map exactly up to rounding.

    Example:

    ```python
    >>> query, angles = torch.randn(1, 2, 3, 8), torch.rand(1, 3, 4).repeat(1, 1, 2)
    >>> rotated = rotate_query(query, angles.cos(), angles.sin())
    >>> torch.allclose(rotate_query(rotated, angles.cos(), angles.sin(), inverse=True), query, atol=1e-6)
    True
    ```
    """
    rotary = cos.shape[-1]
    # (B, T, R) -> (B, 1, T, R): the same angles for every head
    cos, sin = cos.unsqueeze(1).to(query.dtype), sin.unsqueeze(1).to(query.dtype)
    rot, passed = query[..., :rotary], query[..., rotary:]
    if inverse:
        rotated = (rot * cos - _rotate_pairs(rot, layout) * sin) / (cos * cos + sin * sin)
    else:
        rotated = rot * cos + _rotate_pairs(rot, layout) * sin
    return rotated if rotary == query.shape[-1] else torch.cat((rotated, passed), dim=-1)


# one entry per stock attention class (a property of its modeling file's code, not of any tensor)
_ROTARY_LAYOUTS: dict[type, str | None] = {}


def rotary_layout(attention_class: type, head_dim: int) -> str | None:
    """The rotary layout (``"half"`` or ``"interleaved"``) of a stock attention class, or None if neither fits.

    Read off the ``apply_rotary_pos_emb`` of the transformers modeling file that defines the class: it rotates a
    random query with random angles laid out as each candidate layout lays them out (``cat(θ, θ)`` for "half",
    ``repeat_interleave(θ, 2)`` for "interleaved"), and the layout whose rotation ``rotate_query`` reproduces is
    the class's. None when the file has no such function, or it matches neither (the relative reading of Q⁻ cannot
    be computed then).
    """
    if attention_class in _ROTARY_LAYOUTS:
        return _ROTARY_LAYOUTS[attention_class]
    apply_rotary = None
    for base in attention_class.__mro__:
        if base.__module__.startswith("transformers."):
            apply_rotary = getattr(sys.modules.get(base.__module__), "apply_rotary_pos_emb", None)
            if apply_rotary is not None:
                break
    found = None
    if apply_rotary is not None and head_dim % 2 == 0:
        generator = torch.Generator().manual_seed(0)
        # (1, 1, T, D) query, T = 3 positions with distinct angles per pair; on the CPU explicitly, since models are
        # often built under a meta-device context (from_pretrained)
        query = torch.randn(1, 1, 3, head_dim, generator=generator, dtype=torch.float64, device="cpu")
        angles = torch.rand(1, 3, head_dim // 2, generator=generator, dtype=torch.float64, device="cpu") * 6.0
        for layout in ROTARY_LAYOUTS:
            spread = torch.cat((angles, angles), -1) if layout == "half" else angles.repeat_interleave(2, -1)
            cos, sin = spread.cos(), spread.sin()
            try:
                rotated = apply_rotary(query, query, cos, sin)[0]
            except Exception:  # a signature this probe does not know: no layout, 'relative' is refused
                break
            if rotated.shape == query.shape and torch.allclose(rotated, rotate_query(query, cos, sin, layout=layout)):
                found = layout
                break
    _ROTARY_LAYOUTS[attention_class] = found
    return found


def negative_query(
    module: torch.nn.Module,
    query: torch.Tensor,
    upcast: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Q⁻, (B, H, Tq, D), of an attention module, through the module call so that wrappers (PEFT's LoRA) take part.

    Without ``position_embeddings``: Q⁻ = ReLU(Q⁺) W⁻ from the query as it enters the softmax (the spec, and
    ``gpam_rope_variant="literal"`` in RoPE families). With the ``(cos, sin)`` the stock forward rotated the query
    with (``gpam_rope_variant="relative"``): Q̃ = RoPE⁻¹(Q⁺) is the query before rotation, and
    Q⁻ = RoPE(ReLU(Q̃) W⁻) is rotated with the same positions as Q⁺ and K, so P⁻ depends on i − j only, like P⁺.

    With ``upcast`` (GPT-2's ``reorder_and_upcast_attn``) the projection runs outside autocast in the weight's
    precision: Q⁻ feeds the negative map's scores, which that option computes in float32. (The pure-tensor form with
    W⁻ given as a weight is ``gpam_ops.negative_query_from_weight``.)
    """
    if position_embeddings is not None:
        cos, sin = position_embeddings
        layout = getattr(module, "gpam_rotary_layout", "half")
        # the rotations in at least float32: in bf16 the inverse alone adds about 1 % relative error to Q⁻
        work = torch.promote_types(query.dtype, torch.float32)
        if layout == "half":
            rotation = getattr(position_embeddings, "gpam_rotation", None)
            return relative_negative_query(module, query, cos, sin, work, rotation)
        unrotated = rotate_query(query.to(work), cos.to(work), sin.to(work), inverse=True, layout=layout)
        projected = project_negative(module, F.relu(unrotated).to(query.dtype))
        return rotate_query(projected.to(work), cos.to(work), sin.to(work), layout=layout).to(query.dtype)
    if not upcast:
        return project_negative(module, F.relu(query))
    with torch.autocast(query.device.type, enabled=False):
        return module.gpam_q_neg(F.relu(query).to(module.gpam_q_neg.weight.dtype))


def half_rotation_coefficients(cos: torch.Tensor, sin: torch.Tensor, work: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``(c, s, c_inv, s_inv)``, each (B, 1, T, R), for the "half" rotary layout in dtype ``work``.

    With r = ``roll(x, R/2)`` (the two halves of the rotated dims swapped), RoPE is ``x·c + r·s`` and its inverse
    ``x·c_inv + r·s_inv``: ``rotate_half(x)·sin`` = ``r·s`` with s = [−sin₁; sin₂], and the inverse divides by
    a² = cos² + sin² as ``rotate_query(inverse=True)`` does.
    """
    c, s = cos.to(work).unsqueeze(1), sin.to(work).unsqueeze(1)
    half = c.shape[-1] // 2
    s_signed = torch.cat((-s[..., :half], s[..., half:]), dim=-1)
    inverse_scale = torch.reciprocal(c * c + s * s)
    return c, s_signed, c * inverse_scale, -s_signed * inverse_scale


class RotaryEmbeddings(tuple):
    """A rotary embedding's ``(cos, sin)``, unpacked as the stock forwards unpack it, with the "half" layout's
    rotation coefficients of this pair (``gpam_rotation``: the working dtype, then ``half_rotation_coefficients``),
    derived once for every layer of the forward that made the pair."""

    def __new__(cls, pair):
        # one iterable argument, as tuple takes it: accelerate's hooks rebuild tuples as type(pair)(moved items), and
        # the coefficients of the moved pair are derived again
        pair = super().__new__(cls, pair)
        cos, sin = pair
        work = torch.promote_types(cos.dtype, torch.float32)
        pair.gpam_rotation = (work, *half_rotation_coefficients(cos, sin, work))
        return pair

    def __reduce__(self):
        # copies and pickles are plain pairs: the coefficients are derived again where they are needed
        return tuple, (tuple(self),)


def attach_rotation_coefficients(module: torch.nn.Module, args: tuple, output):
    """Forward hook of a rotary embedding: its ``(cos, sin)`` as ``RotaryEmbeddings``, or None to leave an output of
    another shape (or one made while ``torch.compile`` traces) as it is."""
    if torch.compiler.is_compiling() or type(output) is not tuple or len(output) != 2:
        return None
    cos, sin = output
    if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)) or cos.shape != sin.shape:
        return None
    if cos.dim() != 3 or cos.shape[-1] % 2:
        return None
    return RotaryEmbeddings(output)


def register_rotation_coefficients(model: torch.nn.Module) -> None:
    """Hook ``attach_rotation_coefficients`` on the rotary embeddings of ``model`` whose relative-RoPE daGPAM modules
    read the "half" layout (once per rotary embedding module, flagged ``gpam_rotation_hooked``; a model without any
    is left alone)."""
    if not any(
        getattr(m, "gpam_rope_variant", None) == "relative" and getattr(m, "gpam_rotary_layout", None) == "half"
        for m in model.modules()
    ):
        return
    for module in model.modules():
        # a flag rather than the hook's handle, which would point copies of the model at this module's hooks (a second
        # hook would be harmless anyway: it finds the pair wrapped and leaves it, RotaryEmbeddings not being a tuple)
        if type(module).__name__.endswith("RotaryEmbedding") and not getattr(module, "gpam_rotation_hooked", False):
            module.register_forward_hook(attach_rotation_coefficients)
            module.gpam_rotation_hooked = True


def relative_negative_query(
    module: torch.nn.Module,
    query: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    work: torch.dtype,
    rotation: tuple | None = None,
) -> torch.Tensor:
    """Q⁻ = RoPE(ReLU(RoPE⁻¹(Q⁺)) W⁻) for the "half" rotary layout, in few ops: each rotation is one ``roll`` and one
    ``addcmul`` over the query (``half_rotation_coefficients``); partial rotary dims (R < D) pass through.

    ``rotation`` is the ``gpam_rotation`` of a ``RotaryEmbeddings`` pair (derived once per forward); without it, or
    in another working dtype, the coefficients are derived here. Written flat, without helpers or no-op casts: in a
    decode step every op and Python call costs about as much as the arithmetic, once per layer and token.
    """
    if rotation is not None and rotation[0] == work:
        c, s, c_inv, s_inv = rotation[1:]
    else:
        c, s, c_inv, s_inv = half_rotation_coefficients(cos, sin, work)
    rotary, half = c.shape[-1], c.shape[-1] // 2
    partial = rotary != query.shape[-1]
    x = query if query.dtype == work else query.to(work)
    part = x[..., :rotary] if partial else x
    unrotated = torch.addcmul(part * c_inv, part.roll(half, dims=-1), s_inv)
    if partial:
        unrotated = torch.cat((unrotated, x[..., rotary:]), dim=-1)
    activations = F.relu(unrotated)
    projected = project_negative(module, activations if query.dtype == work else activations.to(query.dtype))
    y = projected if projected.dtype == work else projected.to(work)
    part = y[..., :rotary] if partial else y
    rotated = torch.addcmul(part * c, part.roll(half, dims=-1), s)
    if partial:
        rotated = torch.cat((rotated, y[..., rotary:]), dim=-1)
    return rotated if rotated.dtype == query.dtype else rotated.to(query.dtype)


def project_negative(module: torch.nn.Module, activations: torch.Tensor) -> torch.Tensor:
    """``module.gpam_q_neg(activations)``: W⁻ applied through the module call, whatever dtype W⁻ is kept in.

    W⁻ may be kept in another dtype than the activations: float32 next to a quantized base loaded in half precision,
    or after peft.prepare_model_for_kbit_training; outside autocast the input follows W⁻ and the result comes back.
    """
    weight = getattr(module.gpam_q_neg, "weight", None)
    if weight is None or weight.dtype == activations.dtype or torch.is_autocast_enabled(activations.device.type):
        return module.gpam_q_neg(activations)
    return module.gpam_q_neg(activations.to(weight.dtype)).to(activations.dtype)


def relative_position_embeddings(module: torch.nn.Module, applied: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(cos, sin)`` that Q⁻ must be rotated with, or None for Q⁻ = ReLU(Q⁺) W⁻.

    On a RoPE family's module (``gpam_rotary``) with ``gpam_rope_variant="relative"``, a forward pre-hook
    (``gpam_attention.hand_on_rotary_embeddings``) hands them on as ``gpam_position_embeddings``; families without
    RoPE ignore the variant.
    """
    if getattr(module, "gpam_rope_variant", "literal") != "relative" or not getattr(module, "gpam_rotary", False):
        return None
    position_embeddings = applied.get("gpam_position_embeddings")
    if position_embeddings is None:
        raise ValueError(
            f"gpam_rope_variant='relative' needs the rotary embeddings (cos, sin) the stock {type(module).__name__} "
            "rotates the query with, and none reached the attention function (the module was called without "
            "position_embeddings, or its class does not hand them on). Pass position_embeddings, or use "
            "gpam_rope_variant='literal'."
        )
    return position_embeddings
