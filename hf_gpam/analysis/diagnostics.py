"""Measurements behind the paper's claim: rank collapse of token representations, gradients into the query/key
weights, and the shape of the (signed) attention maps, per layer, for any architecture of ``hf_gpam.ARCHITECTURES``
(GPT-2, BART, Marian and the decoder families: Llama, Mistral, Qwen2/3, Gemma2/3, Phi-3, GPT-NeoX, OPT, OLMo2).

Stock models, hf_gpam models and checkpoints loaded with ``trust_remote_code=True`` are all handled the same way:
the blocks, attention modules and query / key weights are found by the attribute names of the model's row in the
architecture table (``block_stacks``, ``attention_modules``, ``query_key_weights``), and daGPAM modules are
recognised by duck typing (an attention module with ``gpam_lambda`` and ``gpam_q_neg``), never by ``isinstance``.

Metrics (per sequence over its non-padding tokens, then averaged over the batch):

- ``rank_collapse_residual``: ‖X − 1·x̄ᵀ‖_F / ‖X‖_F with x̄ the mean token. The mean is the exact minimiser of
  the Frobenius residual, so this is the relative distance of X to the nearest rank-one "all tokens equal" matrix.
- ``rank_collapse_residual_l1inf``: the composite norm of Dong et al. (2021), ‖M‖_{1,∞} = sqrt(‖M‖_1 ‖M‖_∞)
  (max column abs-sum times max row abs-sum), of res = X − 1xᵀ relative to ‖X‖_{1,∞}. Dong et al. take x as
  the minimiser. The objective is not convex in x, so here x is the best point found among the column mean, the
  column median (the exact minimiser of the ‖·‖_1 factor) and a short subgradient (Adam) refinement started
  from the better of the two: the reported value is an upper bound on the exact minimum, equal to it in the
  cases the tests check by brute force.
- ``mean_pairwise_cosine``: mean of cos(x_i, x_j) over ordered pairs i ≠ j of tokens.
- ``attention_entropy``: −Σ_j p̃_ij log p̃_ij per query row with p̃ = |P| / Σ_j |P_ij|. For softmax maps p̃ = P
  (the usual entropy; uniform over T keys gives log T); for signed daGPAM maps it is the entropy of the absolute
  weights, since the entropy of a signed map is undefined.
- ``negative_mass``: Σ_j max(−P_ij, 0) / Σ_j |P_ij| per query row (0 for softmax).
- gradient norms ‖∂L/∂W_Q‖_F, ‖∂L/∂W_K‖_F and ‖∂L/∂W⁻‖_F for ``gpam_q_neg``, after one backward pass of the
  model's loss. W_Q and W_K are the query / key blocks of fused projections where the family fuses them (GPT-2's
  ``c_attn``, Phi-3's ``qkv_proj``, GPT-NeoX's per-head ``query_key_value``; see ``QueryKeyWeights``); with
  grouped-query attention W_K has ``num_key_value_heads · d_head`` outputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from transformers.integrations.sdpa_attention import repeat_kv
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import Conv1D

from ..architectures import ARCHITECTURES, GPAM_MODEL_TYPES, QueryKeyWeights, architecture_of
from ..modeling.gpam_interface import negative_query, relative_position_embeddings
from ..modeling.gpam_ops import reference_gpam_attention


# stock and GPAM model types diagnostics accept: every row of the architecture table
SUPPORTED_MODEL_TYPES = (*ARCHITECTURES, *GPAM_MODEL_TYPES)
HIDDEN_METRICS = ("residual_fro", "residual_l1inf", "mean_cosine")
ATTENTION_METRICS = ("entropy", "negative_mass", "query_grad_norm", "key_grad_norm", "q_neg_grad_norm")


# --------------------------------------------------------------------------------------------------------------
# Metrics on tensors. ``hidden``: (N, T, d); ``mask``: (N, T) bool, True for real tokens (None = all real).
# --------------------------------------------------------------------------------------------------------------


def _token_mask(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(hidden.shape[:2])}")
    mask = mask.to(device=hidden.device, dtype=torch.bool)
    if not bool(mask.any(-1).all()):
        raise ValueError("every sequence needs at least one non-padding token")
    return mask


def rank_collapse_residual(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """‖X − 1·x̄ᵀ‖_F / ‖X‖_F per sequence, x̄ the mean of the sequence's real tokens.

    0 when every token is the same vector (rank one), 1 when the tokens have zero mean.

    Args:
        hidden: (N, T, d) token vectors, or (T, d) for one sequence.
        mask: (N, T) bool, True for real tokens; padding is left out of the mean and both norms.

    Returns:
        (N,) float64 tensor (a 0-d tensor for a (T, d) input).

    Example:

    ```python
    >>> import torch
    >>> from hf_gpam.analysis.diagnostics import rank_collapse_residual
    >>> rank_collapse_residual(torch.ones(5, 3) * torch.tensor([1.0, 2.0, 3.0])).item()
    0.0
    ```
    """
    single = hidden.dim() == 2
    x = hidden[None] if single else hidden
    mask = _token_mask(x, mask[None] if single and mask is not None else mask)
    x = x.to(torch.float64) * mask[..., None]
    counts = mask.sum(-1, keepdim=True).to(torch.float64)  # (N, 1)
    mean = x.sum(1) / counts  # (N, d)
    residual = (x - mean[:, None]) * mask[..., None]
    ratio = residual.flatten(1).norm(dim=-1) / x.flatten(1).norm(dim=-1).clamp_min(1e-300)
    return ratio[0] if single else ratio


def l1_inf_norm(matrix: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dong et al.'s composite norm sqrt(‖M‖_1 ‖M‖_∞) of (…, T, d) matrices, rows with mask False ignored.

    ‖M‖_1 is the largest column sum of |M| and ‖M‖_∞ the largest row sum (the induced 1- and ∞-norms).

    Example:

    ```python
    >>> import torch
    >>> from hf_gpam.analysis.diagnostics import l1_inf_norm
    >>> round(l1_inf_norm(torch.tensor([[1.0, -2.0], [3.0, 0.0]])).item(), 4)  # sqrt(max(4, 2) * max(3, 3))
    3.4641
    ```
    """
    absolute = matrix.abs()
    if mask is not None:
        absolute = absolute * mask[..., None].to(absolute.dtype)
    return (absolute.sum(-2).amax(-1) * absolute.sum(-1).amax(-1)).sqrt()


def rank_collapse_residual_l1inf(
    hidden: torch.Tensor, mask: torch.Tensor | None = None, *, refine_steps: int = 150
) -> torch.Tensor:
    """‖X − 1xᵀ‖_{1,∞} / ‖X‖_{1,∞} per sequence, x ≈ argmin_x ‖X − 1xᵀ‖_{1,∞} (Dong et al., 2021).

    x is the best of: the column mean, the column median (exact minimiser of the ‖·‖_1 factor) and
    ``refine_steps`` Adam steps on the exact (non-smooth) objective started from the better of the two; the best
    value seen is kept, so the result is an upper bound on the exact minimum that never exceeds either closed-form
    candidate. See the module docstring for why an exact minimiser is not computed.

    Args:
        hidden: (N, T, d) or (T, d). mask: (N, T) bool, True for real tokens.
        refine_steps: 0 keeps the best closed-form candidate.

    Returns:
        (N,) float64 tensor (0-d for a (T, d) input).

    Example:

    ```python
    >>> import torch
    >>> from hf_gpam.analysis.diagnostics import rank_collapse_residual_l1inf
    >>> # one feature: f(x) = sqrt(Σ|X_i − x| · max|X_i − x|) is smallest at x = 1.5 (not the median 0, not
    >>> # the mean 1): sqrt(4.5 · 1.5) / ‖X‖_{1,∞} = sqrt(6.75) / 3
    >>> x = torch.tensor([[0.0], [0.0], [3.0]])
    >>> round(rank_collapse_residual_l1inf(x).item(), 4)
    0.866
    ```
    """
    single = hidden.dim() == 2
    x = hidden[None] if single else hidden
    mask = _token_mask(x, mask[None] if single and mask is not None else mask)
    x = x.detach().to(torch.float64)
    weights = mask[..., None].to(torch.float64)  # (N, T, 1)

    def objective(center: torch.Tensor) -> torch.Tensor:  # center (N, d) -> (N,)
        return l1_inf_norm(x - center[:, None], mask)

    mean = (x * weights).sum(1) / weights.sum(1)
    median = torch.where(mask[..., None], x, torch.full_like(x, float("nan"))).nanmedian(dim=1).values
    candidates = torch.stack([objective(mean), objective(median)])  # (2, N)
    best_value, choice = candidates.min(0)
    best_center = torch.where((choice == 0)[:, None], mean, median)

    if refine_steps > 0:
        # step size in the units of the data: its spread around the starting point
        spread = ((x - best_center[:, None]).abs() * weights).sum((1, 2)) / (weights.sum((1, 2)) * x.shape[-1])
        base_lr = 0.1 * spread.clamp_min(1e-12)[:, None]
        center = best_center.clone()
        with torch.enable_grad():
            for step in range(refine_steps + 1):
                center.requires_grad_(True)
                value = objective(center)
                # NaN-safe comparison: sqrt has no finite gradient at 0 (an exactly collapsed sequence)
                improved = value.detach() < best_value
                best_value = torch.where(improved, value.detach(), best_value)
                best_center = torch.where(improved[:, None], center.detach(), best_center)
                if step == refine_steps:
                    break
                (grad,) = torch.autograd.grad(value.sum(), center)
                grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
                # normalised subgradient steps with a decaying length: robust for a max-type objective
                direction = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-300) * math.sqrt(x.shape[-1])
                lr = base_lr * 0.5 * (1 + math.cos(math.pi * step / refine_steps))
                center = center.detach() - lr * direction

    ratio = best_value / l1_inf_norm(x, mask).clamp_min(1e-300)
    return ratio[0] if single else ratio


def mean_pairwise_cosine(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine similarity over ordered pairs (i ≠ j) of real tokens, per sequence.

    Uses Σ_{i≠j} u_iᵀu_j = ‖Σ_i u_i‖² − n for unit vectors u_i. A sequence with one token gives NaN.

    Example:

    ```python
    >>> import torch
    >>> from hf_gpam.analysis.diagnostics import mean_pairwise_cosine
    >>> mean_pairwise_cosine(torch.eye(3)).item()  # orthogonal tokens
    0.0
    ```
    """
    single = hidden.dim() == 2
    x = hidden[None] if single else hidden
    mask = _token_mask(x, mask[None] if single and mask is not None else mask)
    units = torch.nn.functional.normalize(x.to(torch.float64), dim=-1) * mask[..., None]
    n = mask.sum(-1).to(torch.float64)
    total = units.sum(1).pow(2).sum(-1)
    cosine = (total - n) / (n * (n - 1))
    return cosine[0] if single else cosine


def _mean_over_rows(per_row: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
    # (N, H, Tq) -> (H,): mean over the real query rows of every sequence
    weights = torch.ones_like(per_row)
    if query_mask is not None:
        weights = weights * query_mask[:, None, :].to(device=per_row.device, dtype=per_row.dtype)
    return (per_row * weights).sum((0, 2)) / weights.sum((0, 2)).clamp_min(1)


def attention_entropy(probs: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head mean entropy of the rows of attention maps (N, H, Tq, Tk), over real query rows.

    Rows are normalised by their absolute sum first, so signed daGPAM maps are measured by the entropy of |P|.

    Args:
        probs: (N, H, Tq, Tk) attention maps (masked keys carry 0).
        query_mask: (N, Tq) bool, True for real query tokens.

    Returns:
        (H,) float64: the mean entropy of each head in nats.

    Example:

    ```python
    >>> import torch
    >>> from hf_gpam.analysis.diagnostics import attention_entropy
    >>> attention_entropy(torch.full((1, 1, 4, 4), 0.25))  # uniform over 4 keys: log 4
    tensor([1.3863], dtype=torch.float64)
    ```
    """
    absolute = probs.to(torch.float64).abs()
    normalised = absolute / absolute.sum(-1, keepdim=True).clamp_min(1e-300)
    per_row = -torch.special.xlogy(normalised, normalised).sum(-1)  # (N, H, Tq)
    return _mean_over_rows(per_row, query_mask)


def negative_mass(probs: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head mean share of negative weight Σ max(−P, 0) / Σ |P| in the rows of (N, H, Tq, Tk) maps.

    Example:

    ```python
    >>> import torch
    >>> from hf_gpam.analysis.diagnostics import negative_mass
    >>> negative_mass(torch.tensor([[[[1.5, -0.5]]]]))  # 0.5 of a total absolute mass of 2
    tensor([0.2500], dtype=torch.float64)
    ```
    """
    values = probs.to(torch.float64)
    per_row = values.clamp_max(0).abs().sum(-1) / values.abs().sum(-1).clamp_min(1e-300)
    return _mean_over_rows(per_row, query_mask)


# --------------------------------------------------------------------------------------------------------------
# Where things are inside the supported architectures (attribute names, duck-typed)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionSite:
    """One attention module: ``stack`` ("decoder" for decoder-only models, "encoder"/"decoder" for BART/Marian),
    ``layer``, ``kind`` ("self"/"cross"), the module itself, and where its W_Q and W_K are."""

    stack: str
    layer: int
    kind: str
    module: nn.Module
    weights: QueryKeyWeights = QueryKeyWeights()

    @property
    def name(self) -> str:
        return f"{self.stack}.{self.layer}.{self.kind}"


def model_family(model: nn.Module) -> str:
    """``"seq2seq"`` for an encoder-decoder model, ``"decoder"`` for a decoder-only one; raises ``ValueError`` for a
    model whose ``model_type`` is not in the architecture table."""
    architecture_of(unwrap_peft(model))
    return "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "decoder"


def is_gpam_attention(module: nn.Module) -> bool:
    """True for a daGPAM attention module, from hf_gpam or from a checkpoint's remote code."""
    return hasattr(module, "gpam_lambda") and hasattr(module, "gpam_q_neg")


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` (adapters stay injected in it), else ``model`` itself."""
    # duck-typed so that peft stays optional; a PeftModel's own ``base_model`` is the tuner, not the model's body
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


def _attribute_path(root: nn.Module, path: str):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def block_stacks(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The transformer blocks of each stack in order: ``{"decoder": [...]}`` for decoder-only models, encoder and
    decoder for BART/Marian; the paths come from the row's ``block_stacks``."""
    model = unwrap_peft(model)
    body = model.base_model
    return {stack: list(_attribute_path(body, path)) for stack, path in architecture_of(model).block_stacks.items()}


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every attention module of the model with its stack, layer index and kind.

    Example:

    ```python
    >>> from hf_gpam import GpamBartModel
    >>> from hf_gpam.analysis.diagnostics import attention_sites
    >>> from hf_gpam.testing_utils import tiny_gpam_config
    >>> [site.name for site in attention_sites(GpamBartModel(tiny_gpam_config("bart")))][:3]
    ['encoder.0.self', 'encoder.1.self', 'decoder.0.self']
    ```
    """
    architecture = architecture_of(unwrap_peft(model))
    sites = []
    for stack, blocks in block_stacks(model).items():
        for layer, block in enumerate(blocks):
            for kind, attribute in architecture.attention_modules.items():
                # BART's encoder blocks and GPT-2 blocks without add_cross_attention have no cross-attention
                module = getattr(block, attribute, None)
                if module is not None:
                    sites.append(AttentionSite(stack, layer, kind, module, architecture.query_key_weights[kind]))
    return sites


def _grad_norm(tensor: torch.Tensor | None) -> float | None:
    return None if tensor is None else float(tensor.detach().to(torch.float64).norm())


def _head_counts(config) -> tuple[int, int]:
    # (query heads, key/value heads); GPT-2's n_head and the decoder families' num_attention_heads alike
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def _projection_block(site: AttentionSite, role: str, config) -> torch.Tensor | None:
    # the gradient of W_Q (role "query") or W_K ("key") as an (outputs, inputs) matrix, None before any backward
    weights = site.weights
    projection = getattr(site.module, getattr(weights, role))
    grad = projection.weight.grad
    if grad is None:
        return None
    # Conv1D (GPT-2) stores its weight as (in, out)
    grad = grad.T if isinstance(projection, Conv1D) else grad
    if role not in weights.fused:
        return grad
    heads, kv_heads = _head_counts(config)
    if weights.per_head:
        # (H·parts·D, in) -> (H, parts, D, in): every head holds one block of each part
        per_head = grad.view(heads, len(weights.fused), -1, grad.shape[-1])
        return per_head[:, weights.fused.index(role)].reshape(-1, grad.shape[-1])
    # stacked blocks: the query block has H heads, key and value blocks H_kv heads, of d_head outputs each
    widths = [heads if part == "query" else kv_heads for part in weights.fused]
    head_dim = grad.shape[0] // sum(widths)
    sizes = [width * head_dim for width in widths]
    return grad.split(sizes, dim=0)[weights.fused.index(role)]


def query_key_gradients(site: AttentionSite, config) -> dict[str, torch.Tensor | None]:
    """The gradients currently stored for the site's query weight, key weight and W⁻ (None where absent).

    W_Q and W_K are read where the row's ``QueryKeyWeights`` says: separate projections (``q_proj`` / ``k_proj``),
    or their blocks of a fused projection (GPT-2's ``c_attn`` Conv1D, Phi-3's stacked ``qkv_proj``, GPT-NeoX's
    per-head ``query_key_value``), returned as (outputs, inputs) matrices. ``config`` gives the head counts.
    """
    module = site.module
    q_neg = module.gpam_q_neg.weight.grad if is_gpam_attention(module) else None
    return {
        "query": _projection_block(site, "query", config),
        "key": _projection_block(site, "key", config),
        "q_neg": q_neg,
    }


# --------------------------------------------------------------------------------------------------------------
# Whole-model diagnostics
# --------------------------------------------------------------------------------------------------------------


@dataclass
class HiddenStateStats:
    """Token-representation statistics at one depth of one stack (depth 0 = input of the first block)."""

    stack: str
    depth: int
    residual_fro: float
    residual_l1inf: float
    mean_cosine: float


@dataclass
class AttentionStats:
    """Statistics of one attention module. ``lambda_pos``/``lambda_neg`` are per head (None for softmax)."""

    stack: str
    layer: int
    kind: str
    is_gpam: bool
    entropy: float | None = None
    entropy_per_head: list[float] | None = None
    negative_mass: float | None = None
    query_grad_norm: float | None = None
    key_grad_norm: float | None = None
    q_neg_grad_norm: float | None = None
    lambda_pos: list[float] | None = None
    lambda_neg: list[float] | None = None


@dataclass
class ModelDiagnostics:
    """Everything ``diagnose_model`` measured; ``to_dict()`` is JSON-serialisable."""

    name: str
    model_type: str
    is_gpam: bool
    num_sequences: int
    num_tokens: int
    loss: float | None
    loss_source: str
    hidden_states: list[HiddenStateStats] = field(default_factory=list)
    attention: list[AttentionStats] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelDiagnostics:
        data = dict(data)
        data["hidden_states"] = [HiddenStateStats(**h) for h in data.get("hidden_states", [])]
        data["attention"] = [AttentionStats(**a) for a in data.get("attention", [])]
        return cls(**data)

    def stacks(self) -> list[str]:
        return list(dict.fromkeys(h.stack for h in self.hidden_states))

    def curve(self, metric: str, stack: str = "decoder", kind: str = "self") -> list[float | None]:
        """One metric along depth: a hidden-state metric (``HIDDEN_METRICS``, one value per depth, embeddings
        first) or an attention metric (``ATTENTION_METRICS``, or ``"lambda"`` = mean λ⁺ over heads, one value per
        layer of attention modules of ``kind``)."""
        if metric in HIDDEN_METRICS:
            return [getattr(h, metric) for h in self.hidden_states if h.stack == stack]
        if metric in ATTENTION_METRICS or metric == "lambda":
            rows = [a for a in self.attention if a.stack == stack and a.kind == kind]
            if metric == "lambda":
                return [None if a.lambda_pos is None else sum(a.lambda_pos) / len(a.lambda_pos) for a in rows]
            return [getattr(a, metric) for a in rows]
        raise ValueError(
            f"unknown metric {metric!r}; allowed: {', '.join(HIDDEN_METRICS + ATTENTION_METRICS + ('lambda',))}"
        )


@contextmanager
def attn_implementation(model: nn.Module, implementation: str) -> Iterator[None]:
    """Temporarily switch the model's attention backend (``eager`` returns the attention maps)."""
    previous = model.config._attn_implementation
    if previous != implementation:
        model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        if previous != implementation:
            model.set_attn_implementation(previous)


@contextmanager
def _record_block_io(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    # depth 0 = what enters the first block (embeddings after dropout / layernorm_embedding), depth i = output of
    # block i, before any final layer norm (GPT-2's ln_f), so every depth is measured the same way
    records: dict[str, list[torch.Tensor]] = {}
    handles = []

    def first_input(stack):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            records[stack].insert(0, hidden.detach())

        return hook

    def output(stack):
        def hook(module, args, result):
            records[stack].append((result[0] if isinstance(result, tuple) else result).detach())

        return hook

    for stack, blocks in block_stacks(model).items():
        records[stack] = []
        handles.append(blocks[0].register_forward_pre_hook(first_input(stack), with_kwargs=True))
        handles.extend(block.register_forward_hook(output(stack)) for block in blocks)
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _prepare_inputs(model, input_ids, attention_mask, labels, pad_token_id):
    family = model_family(model)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length > 0, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(input_ids.device)
    if not bool(attention_mask.bool().any(-1).all()):
        raise ValueError("every sequence needs at least one non-padding token (attention_mask is all 0 in a row)")
    limit = max_positions(model.config)
    if limit is not None and input_ids.shape[1] > limit:
        raise ValueError(
            f"input length {input_ids.shape[1]} exceeds the model's maximum of {limit} positions; shorten the input"
        )
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family == "seq2seq":
        if labels.shape[1] > (limit or labels.shape[1]):
            raise ValueError(f"label length {labels.shape[1]} exceeds the model's maximum of {limit} positions")
        if not hasattr(model, "lm_head"):
            from transformers.models.bart.modeling_bart import shift_tokens_right

            start = model.config.decoder_start_token_id
            kwargs["decoder_input_ids"] = shift_tokens_right(labels, pad_token_id, start)
        masks = {"encoder": attention_mask.bool(), "decoder": labels != -100}
    else:
        masks = {"decoder": attention_mask.bool()}
    if hasattr(model, "lm_head"):
        kwargs["labels"] = labels
    return kwargs, masks


def max_positions(config) -> int | None:
    """The longest input the model's position embeddings allow (None when the config does not say)."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def diagnose_model(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    name: str | None = None,
    l1inf_refine_steps: int = 150,
) -> ModelDiagnostics:
    """Measure rank collapse, gradients and attention maps of ``model`` on one batch, per layer.

    One forward pass runs with the ``eager`` backend (temporarily, the model's own backend is restored) with
    ``output_attentions=True`` — for daGPAM modules the returned maps are the signed P_G — and hooks on the blocks
    for the hidden states; then the loss is back-propagated once to read the query / key / W⁻ gradients. The model
    is put in eval mode (no dropout) for the measurement and its previous mode and gradients are restored.

    Loss: the model's own loss with ``labels`` (default: ``input_ids`` with padding set to -100; for BART/Marian
    this is a reconstruction loss of the input, enough to send gradients into every query weight). Models without
    an LM head (``GPT2Model``, ``BartModel``) get the surrogate 0.5·mean‖h‖² of the last hidden state
    (``loss_source="surrogate"``).

    Args:
        model: a model of any architecture in ``hf_gpam.ARCHITECTURES``, stock, hf_gpam or remote code
            (``model_type`` decides).
        input_ids: (N, T) token ids; attention_mask: (N, T), 0 for padding (excluded from every statistic).
        labels: (N, T') targets, -100 to ignore (for BART/Marian the decoder side; its -100 positions are
            excluded from the decoder statistics).
        name: recorded in the result.
        l1inf_refine_steps: optimisation steps for the ℓ1,∞ residual's centre
            (see ``rank_collapse_residual_l1inf``).

    Example:

    ```python
    >>> import torch
    >>> from hf_gpam import GpamGPT2LMHeadModel
    >>> from hf_gpam.analysis.diagnostics import diagnose_model
    >>> from hf_gpam.testing_utils import tiny_gpam_config
    >>> model = GpamGPT2LMHeadModel(tiny_gpam_config("gpt2"))
    >>> result = diagnose_model(model, torch.randint(3, 90, (2, 10)))
    >>> len(result.curve("residual_fro")), len(result.curve("lambda"))
    (3, 2)
    ```
    """
    family = model_family(model)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    pad_token_id = getattr(model.config, "pad_token_id", None)
    pad_token_id = 0 if pad_token_id is None else pad_token_id
    kwargs, masks = _prepare_inputs(model, input_ids, attention_mask, labels, pad_token_id)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    masks = {k: v.to(device) for k, v in masks.items()}
    sites = attention_sites(model)

    was_training = model.training
    saved_grads = {p: p.grad for p in model.parameters()}
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        with attn_implementation(model, "eager"), _record_block_io(model) as records, torch.enable_grad():
            outputs = model(**kwargs, output_attentions=True, use_cache=False)
            if getattr(outputs, "loss", None) is not None:
                loss, loss_source = outputs.loss, "model"
            else:
                last = outputs.last_hidden_state
                loss, loss_source = 0.5 * last.float().pow(2).sum(-1).mean(), "surrogate"
            loss.backward()
        gradients = {site.name: query_key_gradients(site, model.config) for site in sites}
        maps = _attention_maps(outputs, family)
    finally:
        for parameter, grad in saved_grads.items():
            parameter.grad = grad
        model.train(was_training)

    result = ModelDiagnostics(
        name=name or getattr(model.config, "name_or_path", "") or type(model).__name__,
        model_type=model.config.model_type,
        is_gpam=any(is_gpam_attention(site.module) for site in sites),
        num_sequences=int(input_ids.shape[0]),
        num_tokens=int(masks[next(iter(masks))].sum()),
        loss=float(loss.detach()),
        loss_source=loss_source,
    )
    for stack, hiddens in records.items():
        mask = masks[stack]
        for depth, hidden in enumerate(hiddens):
            result.hidden_states.append(
                HiddenStateStats(
                    stack=stack,
                    depth=depth,
                    residual_fro=float(rank_collapse_residual(hidden, mask).mean()),
                    residual_l1inf=float(
                        rank_collapse_residual_l1inf(hidden, mask, refine_steps=l1inf_refine_steps).mean()
                    ),
                    mean_cosine=float(mean_pairwise_cosine(hidden, mask).nanmean()),
                )
            )
    for site in sites:
        probs = maps.get((site.stack, site.kind), [None] * (site.layer + 1))[site.layer]
        grads = gradients[site.name]
        stats = AttentionStats(
            stack=site.stack,
            layer=site.layer,
            kind=site.kind,
            is_gpam=is_gpam_attention(site.module),
            query_grad_norm=_grad_norm(grads["query"]),
            key_grad_norm=_grad_norm(grads["key"]),
            q_neg_grad_norm=_grad_norm(grads["q_neg"]),
        )
        if probs is not None:
            query_mask = masks["decoder" if site.stack == "decoder" else "encoder"]
            per_head = attention_entropy(probs.detach(), query_mask)
            stats.entropy = float(per_head.mean())
            stats.entropy_per_head = [float(v) for v in per_head]
            stats.negative_mass = float(negative_mass(probs.detach(), query_mask).mean())
        if stats.is_gpam:
            weight = site.module.gpam_lambda.weight.detach().float()
            pos, neg = (weight, weight) if weight.dim() == 1 else (weight[0], weight[1])
            stats.lambda_pos, stats.lambda_neg = pos.tolist(), neg.tolist()
        result.attention.append(stats)
    return result


def _attention_maps(outputs, family: str) -> dict[tuple[str, str], tuple[torch.Tensor, ...]]:
    # (stack, kind) -> one (N, H, Tq, Tk) map per layer, under transformers' output names
    if family == "decoder":
        names = {("decoder", "self"): "attentions", ("decoder", "cross"): "cross_attentions"}
    else:
        names = {
            ("encoder", "self"): "encoder_attentions",
            ("decoder", "self"): "decoder_attentions",
            ("decoder", "cross"): "cross_attentions",
        }
    maps = {}
    for key, attribute in names.items():
        value = getattr(outputs, attribute, None)
        if value:
            maps[key] = value
    return maps


# --------------------------------------------------------------------------------------------------------------
# The two maps of one daGPAM module, recomputed from its inputs
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def capture_attention_call(module: nn.Module) -> Iterator[dict]:
    """Record what ``module`` hands to its attention function during the forward passes run inside the block.

    Every attention module of the table's families (and of remote code, which imports the same object) gets its
    attention function from ``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` right after its projections, q/k norms,
    rotary embeddings and cache update. Wrapping that lookup for the duration of the block captures the query (Q⁺
    exactly as it enters the softmax), key, value, mask, scaling and keywords of ``module``'s call, whatever the
    family does before it: fused projections, grouped-query heads, partial rotary, q/k norms. Nothing is re-projected
    by hand, so the recomputation cannot drift from the module. Calls of other modules pass through untouched.

    Yields a dict filled with ``query``, ``key``, ``value``, ``attention_mask``, ``scaling`` and ``kwargs`` of the
    last call (query (N, H, Tq, D), key and value (N, H_kv, Tk, D)).
    """
    captured: dict = {}
    lookup = ALL_ATTENTION_FUNCTIONS.get_interface

    def capturing_lookup(attn_implementation, default):
        function = lookup(attn_implementation, default)

        def attention(called_module, query, key, value, attention_mask, *args, **kwargs):
            if called_module is module:
                scaling = kwargs.get("scaling", args[1] if len(args) > 1 else None)
                captured.update(
                    query=query, key=key, value=value, attention_mask=attention_mask, scaling=scaling,
                    kwargs={k: v for k, v in kwargs.items() if k not in ("dropout", "scaling")},
                )
            return function(called_module, query, key, value, attention_mask, *args, **kwargs)

        return attention

    # an instance attribute shadows the method for this object only, and deleting it restores the method
    ALL_ATTENTION_FUNCTIONS.get_interface = capturing_lookup
    try:
        yield captured
    finally:
        del ALL_ATTENTION_FUNCTIONS.get_interface


@torch.no_grad()
def attention_components(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    stack: str = "decoder",
    layer: int = 0,
    kind: str = "self",
) -> dict[str, torch.Tensor | None]:
    """P⁺, P⁻ and P_G of one attention module, recomputed in float64 from the inputs the module received.

    One forward pass runs on the eager backend (so the mask is the full one) with ``capture_attention_call``
    recording the query, key, value, mask and keywords the module hands to its attention function: Q⁺ and K are
    the module's own, after its projections (fused or not), q/k norms and rotary embeddings, with its K/V heads
    (grouped-query attention: repeated to the query heads here, as the eager functions do). Q⁻ is computed by the
    attention function's own ``negative_query`` from that Q⁺ and the same keywords (``gpam_rope_variant``: RoPE
    applied to ReLU(Q̃)W⁻ or not), through ``gpam_q_neg``, so adapters on W⁻ (PEFT LoRA) are included. The two
    softmax maps are computed in float64 by ``reference_gpam_attention``'s rules, with the module's scaling and
    soft-capping. A PEFT-wrapped model can be passed as is. For a softmax module ``p_neg`` is None and ``p_gpam``
    equals ``p_pos``.

    Returns:
        ``{"p_pos", "p_neg", "p_gpam"}`` of shape (N, H, Tq, Tk), plus ``"lambda_pos"``/``"lambda_neg"`` (H,)
        (None for softmax) and ``"query_mask"`` (N, Tq) bool.

    Example:

    ```python
    >>> import torch
    >>> from hf_gpam import GpamGPT2Model
    >>> from hf_gpam.analysis.diagnostics import attention_components
    >>> from hf_gpam.testing_utils import tiny_gpam_config
    >>> maps = attention_components(GpamGPT2Model(tiny_gpam_config("gpt2")), torch.randint(3, 90, (1, 6)), layer=1)
    >>> maps["p_gpam"].shape, bool(torch.allclose(maps["p_gpam"].sum(-1), torch.ones(1, 4, 6, dtype=torch.float64)))
    (torch.Size([1, 4, 6, 6]), True)
    ```
    """
    matches = [s for s in attention_sites(model) if (s.stack, s.layer, s.kind) == (stack, layer, kind)]
    if not matches:
        available = ", ".join(s.name for s in attention_sites(model))
        raise ValueError(f"no attention module {stack}.{layer}.{kind}; available: {available}")
    site = matches[0]
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    pad_token_id = getattr(model.config, "pad_token_id", None) or 0
    kwargs, masks = _prepare_inputs(model, input_ids, attention_mask, labels, pad_token_id)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    module = site.module
    was_training = model.training
    model.eval()
    try:
        with attn_implementation(model, "eager"), capture_attention_call(module) as captured:
            model(**kwargs, use_cache=False)
    finally:
        model.train(was_training)
    if not captured:
        raise ValueError(
            f"{site.name}: {type(module).__name__} did not call transformers' attention interface in the forward "
            "pass (e.g. GPT-2 with reorder_and_upcast_attn on the stock eager backend), so its maps cannot be captured"
        )

    query, key, value = captured["query"], captured["key"], captured["value"]
    # grouped-query attention: H query heads share H_kv key/value heads, repeated as eager attention does
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # transformers hands eager a full mask; causality is added only if it did not (as the modules do)
    mask = captured["attention_mask"]
    is_causal = captured["kwargs"].get("is_causal")
    is_causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    is_causal = bool(is_causal) and mask is None and query.shape[-2] > 1
    scaling = query.shape[-1] ** -0.5 if captured["scaling"] is None else captured["scaling"]
    softcap = captured["kwargs"].get("softcap")

    def softmax_map(queries: torch.Tensor) -> torch.Tensor:
        # the float64 reference with λ = 0 is exactly one softmax map under the modules' mask conventions
        no_lambda = torch.zeros(queries.shape[1], device=queries.device)
        unused_weight = torch.zeros(queries.shape[-1], queries.shape[-1], device=queries.device)
        return reference_gpam_attention(
            queries, key, value, unused_weight, no_lambda, no_lambda,
            scaling=scaling, attention_mask=mask, is_causal=is_causal, softcap=softcap,
        )["p_pos"]

    p_pos = softmax_map(query)
    if not is_gpam_attention(module):
        return {"p_pos": p_pos, "p_neg": None, "p_gpam": p_pos, "lambda_pos": None, "lambda_neg": None,
                "query_mask": masks[stack]}
    # Q⁻ as the attention function computes it, through the module: a LoRA on gpam_q_neg is part of W⁻
    position_embeddings = relative_position_embeddings(module, captured["kwargs"])
    p_neg = softmax_map(negative_query(module, query, position_embeddings=position_embeddings))
    weight = module.gpam_lambda.weight.detach()
    lambda_pos, lambda_neg = (weight, weight) if weight.dim() == 1 else (weight[0], weight[1])
    # (H,) -> (1, H, 1, 1) against the (N, H, Tq, Tk) maps
    lam_pos, lam_neg = (lam.to(torch.float64).view(1, -1, 1, 1) for lam in (lambda_pos, lambda_neg))
    return {
        "p_pos": p_pos,
        "p_neg": p_neg,
        "p_gpam": (1 + lam_pos) * p_pos - lam_neg * p_neg,
        "lambda_pos": lambda_pos.float().cpu(),
        "lambda_neg": lambda_neg.float().cpu(),
        "query_mask": masks[stack],
    }
