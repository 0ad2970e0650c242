"""Speed and memory of daGPAM against stock attention: one command, one table, one JSON file.

Every row compares the same transformers model (same shapes, same weights, same ``attn_implementation``) unpatched
("stock") and converted with ``hf_gpam.patch_model(model, gpam_lambda_init=0.5)`` ("gpam"), in the same process.
Timed repetitions are interleaved stock/gpam/gpam/stock/... so that load drift on a shared machine hits both
alike; each row reports the medians after warm-up, their ratio, and the spread of the per-pair ratios.

The cost floor (what no implementation can beat)
------------------------------------------------
daGPAM computes two score maps (Q⁺Kᵀ and Q⁻Kᵀ) and, fused, two probability-times-value products: twice the
attention-kernel FLOPs. Q⁻ = ReLU(Q⁺)W⁻ adds a D×D product per head (D = head dim), which is tiny. The projections
(QKV and output), the MLPs, embeddings and the LM head do not change, so the whole-model ratio is

    floor = (F_other + 2·F_core + F_qneg) / (F_other + F_core)

with F_core = 4·Tq·Tk·D per head (QKᵀ and PV, 2 FLOPs per MAC, the full T×T counted as the lead's estimate
does; a causal kernel that skips masked blocks halves both F_core terms and moves the floor towards 1). Per token
and layer: F_proj = 2·4·d², F_mlp = 2·2·d·d_ff, LM head 2·d·V. Example, one GPT-2 attention module, B=4, H=12,
T=1024, D=64: F_proj = 8·768² = 4.7 MFLOP and F_core = 4·1024·768 = 3.1 MFLOP per token, so the floor is
(4.7 + 6.3) / (4.7 + 3.1) ≈ 1.41. ``--quick`` and the full run print this floor next to every timed row.

The measured floor
------------------
The FLOP floor says nothing about kernel efficiency at two calls instead of one. So every timed row also times the
stock model whose attention modules (at the places daGPAM converts) call their backend's stock attention function
twice on the same inputs and average the outputs (``floor_attention_function``): the stock module plus one extra
kernel call of the same shape. daGPAM / floor is what this implementation adds beyond that second call; targets:
1.05 for attention modules, 1.03 for training steps.

K and V are shared by both maps, so the KV cache is the stock one and a decode step adds only a second
attention read over the cache: decoding is dominated by MLPs and the LM head. Nothing T×T exists on the fused
path, so the fused forward's peak memory adds at most a few (B, H, T, D) tensors.

Usage::

    python benchmarks/run_benchmarks.py --output benchmarks/results/cpu_full.json
    python benchmarks/run_benchmarks.py --quick            # small shapes, about a minute
    python benchmarks/run_benchmarks.py --only module_sdpa module_eager

Memory is measured in a fresh subprocess per model with ``MALLOC_MMAP_THRESHOLD_=65536`` (so freed buffers go
back to the kernel and RSS follows the live tensors instead of glibc heap fragmentation): the peak RSS is reset
through ``/proc/self/clear_refs`` just before the forward and read back from ``VmHWM``; the current RSS at the
reset is the baseline, so the number is the forward's own peak (activations and workspaces).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, MarianConfig, MarianMTModel  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention  # noqa: E402

import hf_gpam  # noqa: E402


try:
    from hf_gpam.modeling.gpam_interface import gpam_attn_implementation
except ImportError:
    # release 0.1 (for before/after runs against it): its attention classes dispatched on the stock names themselves
    def gpam_attn_implementation(name):
        return name


GPAM_OPTIONS = dict(gpam_lambda_init=0.5)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One line of the results table."""

    name: str
    description: str
    stock: float
    gpam: float
    unit: str
    target: float | None = None
    # the FLOP floor (module docstring): gpam/stock FLOPs
    floor: float | None = None
    ratio_spread: tuple[float, float] | None = None
    repetitions: int = 0
    extra: dict = field(default_factory=dict)
    # the measured floor: the stock model whose attention makes one extra stock kernel call of the same shape
    # (floor_attention_function), timed in the same interleaved run; and the target for daGPAM against it
    measured_floor: float | None = None
    floor_target: float | None = None
    floor_ratio_spread: tuple[float, float] | None = None

    @property
    def ratio(self) -> float | None:
        return self.gpam / self.stock if self.stock else None

    @property
    def floor_ratio(self) -> float | None:
        return self.gpam / self.measured_floor if self.measured_floor else None

    @property
    def meets_target(self) -> bool | None:
        checks = []
        if self.target is not None:
            checks.append(self.ratio <= self.target)
        if self.floor_target is not None and self.floor_ratio is not None:
            checks.append(self.floor_ratio <= self.floor_target)
        return all(checks) if checks else None


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
CLOCK = "cpu"


def interleaved_timings(*steps, warmup: int, repetitions: int):
    """Seconds per call of each callable, in an order that rotates every repetition (A B C, B C A, C A B, ...) after
    ``warmup`` calls of each.

    Returns ``{clock: [times of steps[0], times of steps[1], ...]}`` for both clocks: ``cpu`` is the process CPU time
    (all threads), which a shared, oversubscribed machine disturbs far less than ``wall``; the table uses ``CLOCK``.
    """
    for _ in range(warmup):
        for step in steps:
            step()
    times = {clock: [[] for _ in steps] for clock in CLOCKS}
    for rep in range(repetitions):
        shift = rep % len(steps)
        for which in [*range(shift, len(steps)), *range(shift)]:
            gc.collect()
            start = {clock: read() for clock, read in CLOCKS.items()}
            steps[which]()
            for clock, read in CLOCKS.items():
                times[clock][which].append(read() - start[clock])
    return times


def _spread(numerators, denominators) -> tuple[float, float]:
    # the middle 80 % of the per-repetition ratios: the run-to-run spread, without the single worst outlier
    ratios = sorted(n / d for n, d in zip(numerators, denominators))
    trim = len(ratios) // 10
    return ratios[trim], ratios[-1 - trim]


def timed_row(name, description, step_stock, step_gpam, *, warmup, repetitions, target, floor, unit="ms",
              step_floor=None, floor_target=None) -> Row:
    steps = (step_stock, step_gpam) if step_floor is None else (step_stock, step_gpam, step_floor)
    all_times = interleaved_timings(*steps, warmup=warmup, repetitions=repetitions)
    stock_times, gpam_times = all_times[CLOCK][:2]
    scale = 1e3 if unit == "ms" else 1.0
    extra = {"clock": CLOCK}
    for clock, variants in all_times.items():
        stock_all, gpam_all = variants[:2]
        extra[clock] = {
            "stock_median": statistics.median(stock_all) * scale, "gpam_median": statistics.median(gpam_all) * scale,
            "ratio": statistics.median(gpam_all) / statistics.median(stock_all),
            "stock_all": [t * scale for t in stock_all], "gpam_all": [t * scale for t in gpam_all],
        }
        if step_floor is not None:
            extra[clock]["floor_median"] = statistics.median(variants[2]) * scale
            extra[clock]["floor_all"] = [t * scale for t in variants[2]]
    measured_floor, floor_spread = None, None
    if step_floor is not None:
        floor_times = all_times[CLOCK][2]
        measured_floor, floor_spread = statistics.median(floor_times) * scale, _spread(gpam_times, floor_times)
    return Row(
        name, description, statistics.median(stock_times) * scale, statistics.median(gpam_times) * scale, unit,
        target=target, floor=floor, ratio_spread=_spread(gpam_times, stock_times), repetitions=repetitions,
        extra=extra, measured_floor=measured_floor, floor_target=floor_target, floor_ratio_spread=floor_spread,
    )


# --- the measured floor ------------------------------------------------------------------------------------------

FLOOR_PREFIX = "benchmark_floor_"


def floor_attention_function(stock_name: str):
    """The stock attention function of ``stock_name`` called twice on the same inputs, outputs averaged.

    What daGPAM cannot do without: a second attention kernel call of the same shape (P⁻·V beside P⁺·V), forward and
    backward (``lerp`` keeps both calls in the graph), and one elementwise combination of the two outputs. Everything
    else daGPAM adds (Q⁻ = ReLU(Q⁺)W⁻, RoPE handling, the λ arithmetic, layout copies) is overhead against this floor.
    """

    from hf_gpam.modeling.gpam_interface import stock_attention_function

    def floor_forward(module, query, key, value, attention_mask, **kwargs):
        stock = stock_attention_function(stock_name, module)
        output, weights = stock(module, query, key, value, attention_mask, **kwargs)
        extra, _ = stock(module, query, key, value, attention_mask, **kwargs)
        return torch.lerp(output, extra, 0.5), weights

    return floor_forward


class FloorConfig:
    """A stock attention module's config as the floor module reads it: every attribute is the model config's, except
    ``_attn_implementation``, which names the floor function of the model's backend."""

    def __init__(self, config):
        self.__dict__["floor_model_config"] = config

    @property
    def _attn_implementation(self) -> str:
        stock_name = self.floor_model_config._attn_implementation
        name = FLOOR_PREFIX + stock_name
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, floor_attention_function(stock_name))
        return name

    def __getattr__(self, name: str):
        if name == "floor_model_config":
            raise AttributeError(name)
        return getattr(self.floor_model_config, name)


def floor_module(stock_module):
    """A deep copy of one stock attention module that runs the floor function of its backend."""
    floor = copy.deepcopy(stock_module)
    floor.config = FloorConfig(floor.config)
    return floor


def floor_model(stock_model, gpam_model):
    """A deep copy of ``stock_model`` whose attention modules at the daGPAM modules' places run the floor function."""
    from hf_gpam.modeling.gpam_interface import is_gpam_attention_module

    floor = copy.deepcopy(stock_model)
    places = [name for name, module in gpam_model.named_modules() if is_gpam_attention_module(module)]
    assert places, "no daGPAM attention module in the converted model"
    for name in places:
        module = floor.get_submodule(name)
        module.config = FloorConfig(module.config)
    return floor


def gpt2_config(*, n_layer, n_embd, n_head, n_positions, vocab_size, attn_implementation, **overrides) -> GPT2Config:
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_size=vocab_size,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, **overrides,
    )
    config._attn_implementation = attn_implementation
    return config


def stock_and_gpam(stock_model):
    """The stock model and a deep copy converted with ``patch_model`` (same weights apart from the new ones)."""
    gpam_model = hf_gpam.patch_model(copy.deepcopy(stock_model), **GPAM_OPTIONS)
    return stock_model, gpam_model


def training_step(model, **batch):
    """A closure running one fwd+bwd+AdamW step of ``model`` on ``batch`` (the timed unit of the training rows)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def run():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def greedy_decode_step(model, ids, new_tokens: int):
    """A closure generating exactly ``new_tokens`` greedy tokens with the KV cache (the timed unit of the decode rows)."""

    @torch.no_grad()
    def run():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert out.shape[-1] == ids.shape[-1] + new_tokens

    return run


def lm_floor(*, tokens_q, t_k, d, d_ff, n_layer, vocab, cross_layers=0, enc_tokens=0, enc_layers=0, heads=1):
    """FLOP floor of a whole model (see the module docstring); returns gpam/stock."""
    head_dim = d // heads
    per_layer_other = 2 * 4 * d * d + 2 * 2 * d * d_ff
    core = 4 * t_k * d
    qneg = 2 * head_dim * d
    stock = tokens_q * (n_layer * (per_layer_other + core) + 2 * d * vocab)
    gpam = stock + tokens_q * n_layer * (core + qneg)
    if enc_layers:
        enc = enc_tokens * enc_layers * (per_layer_other + 4 * enc_tokens * d)
        cross = tokens_q * cross_layers * (2 * 2 * d * d + 4 * enc_tokens * d)
        stock += enc + cross
        gpam += enc + cross + enc_tokens * enc_layers * (4 * enc_tokens * d + qneg)
        gpam += tokens_q * cross_layers * (4 * enc_tokens * d + qneg)
    return gpam / stock


def gpam_attention_copy(stock_module, architecture, config, implementation: str):
    """A deep copy of one stock attention module converted to daGPAM (patch_model converts whole models; a lone
    module takes the same per-module helper), its config naming the registered daGPAM backend."""
    from hf_gpam.modeling.gpam_attention import convert_attention_module
    from hf_gpam.patching import gpam_config_from_stock

    gpam_class = next(iter(architecture.model_classes.values())).gpam_attention_class
    gpam_config = gpam_config_from_stock(config, **GPAM_OPTIONS)
    gpam_config._attn_implementation = gpam_attn_implementation(implementation)
    gpam = copy.deepcopy(stock_module)
    convert_attention_module(gpam, gpam_class, gpam_config)
    gpam.config = gpam_config
    return gpam


def bench_module(implementation: str, shape: dict, *, warmup, repetitions, target, floor_target=None) -> Row:
    """One GPT-2 attention module (QKV projection, attention, output projection), forward + backward."""
    batch, heads, seq, head_dim = shape["B"], shape["H"], shape["T"], shape["D"]
    config = gpt2_config(
        n_layer=1, n_embd=heads * head_dim, n_head=heads, n_positions=seq, vocab_size=8,
        attn_implementation=implementation, attn_pdrop=0.0, resid_pdrop=0.0,
    )
    torch.manual_seed(0)
    stock = GPT2Attention(config, layer_idx=0)
    gpam = gpam_attention_copy(stock, hf_gpam.ARCHITECTURES["gpt2"], config, implementation)
    lower = floor_module(stock)
    hidden = torch.randn(batch, seq, heads * head_dim, requires_grad=True)
    mask = None
    if implementation == "eager":
        # what transformers hands the eager path: a full additive causal mask (B, 1, T, T)
        blocked = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        mask = torch.zeros(batch, 1, seq, seq).masked_fill_(blocked, torch.finfo(torch.float32).min)

    def step(module):
        def run():
            module(hidden, attention_mask=mask)[0].sum().backward()
            hidden.grad = None
            module.zero_grad(set_to_none=True)

        return run

    d = heads * head_dim
    floor = (8 * d * d + 2 * 4 * seq * d + 2 * head_dim * d) / (8 * d * d + 4 * seq * d)
    return timed_row(
        f"module_{implementation}",
        f"GPT-2 attention module fwd+bwd ({implementation}), B={batch} H={heads} T={seq} D={head_dim}, causal",
        step(stock), step(gpam), warmup=warmup, repetitions=repetitions, target=target, floor=floor,
        step_floor=step(lower), floor_target=floor_target,
    )


def bench_training_gpt2(shape: dict, *, warmup, repetitions, target, floor_target=None) -> Row:
    """GPT-2 LM training step: forward, backward, AdamW step (sdpa, attention dropout off)."""
    config = gpt2_config(
        n_layer=shape["layers"], n_embd=shape["d"], n_head=shape["heads"], n_positions=shape["T"],
        vocab_size=shape["vocab"], attn_implementation="sdpa", attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    stock, gpam = stock_and_gpam(GPT2LMHeadModel(config))
    lower = floor_model(stock, gpam)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["T"]))

    def step(model):
        return training_step(model, input_ids=ids, labels=ids)

    floor = lm_floor(
        tokens_q=shape["T"], t_k=shape["T"], d=shape["d"], d_ff=4 * shape["d"], n_layer=shape["layers"],
        vocab=shape["vocab"], heads=shape["heads"],
    )
    return timed_row(
        "train_gpt2",
        f"GPT-2 training step (fwd+bwd+AdamW, sdpa), {shape['layers']} layers d={shape['d']} "
        f"{shape['heads']} heads vocab={shape['vocab']}, batch {shape['batch']} T={shape['T']}",
        step(stock), step(gpam), warmup=warmup, repetitions=repetitions, target=target, floor=floor,
        step_floor=step(lower), floor_target=floor_target,
    )


def bench_decode(shape: dict, *, warmup, repetitions, target, floor_target=None) -> Row:
    """Greedy decoding with the KV cache (sdpa), a fixed number of new tokens."""
    new_tokens, prompt = shape["new_tokens"], shape["prompt"]
    config = gpt2_config(
        n_layer=shape["layers"], n_embd=shape["d"], n_head=shape["heads"], n_positions=prompt + new_tokens,
        vocab_size=shape["vocab"], attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    stock, gpam = stock_and_gpam(GPT2LMHeadModel(config).eval())
    lower = floor_model(stock, gpam)
    ids = torch.randint(1, shape["vocab"], (1, prompt))

    def step(model):
        return greedy_decode_step(model, ids, new_tokens)

    return timed_row(
        "decode_gpt2",
        f"GPT-2 greedy decode with KV cache (sdpa), {shape['layers']} layers d={shape['d']}, "
        f"prompt {prompt}, {new_tokens} new tokens",
        step(stock), step(gpam), warmup=warmup, repetitions=repetitions, target=target, floor=None,
        step_floor=step(lower), floor_target=floor_target,
    )


def bench_training_marian(shape: dict, *, warmup, repetitions, target, floor_target=None) -> Row:
    """Marian translation training step (encoder self, decoder self and cross attention all daGPAM)."""
    config = MarianConfig(
        encoder_layers=shape["layers"], decoder_layers=shape["layers"], d_model=shape["d"],
        encoder_attention_heads=shape["heads"], decoder_attention_heads=shape["heads"],
        encoder_ffn_dim=4 * shape["d"], decoder_ffn_dim=4 * shape["d"], vocab_size=shape["vocab"],
        max_position_embeddings=max(shape["src"], shape["tgt"]), pad_token_id=shape["vocab"] - 1,
        decoder_start_token_id=shape["vocab"] - 1, eos_token_id=0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    stock, gpam = stock_and_gpam(MarianMTModel(config))
    lower = floor_model(stock, gpam)
    src = torch.randint(1, shape["vocab"] - 1, (shape["batch"], shape["src"]))
    tgt = torch.randint(1, shape["vocab"] - 1, (shape["batch"], shape["tgt"]))

    def step(model):
        return training_step(model, input_ids=src, labels=tgt)

    floor = lm_floor(
        tokens_q=shape["tgt"], t_k=shape["tgt"], d=shape["d"], d_ff=4 * shape["d"], n_layer=shape["layers"],
        vocab=shape["vocab"], cross_layers=shape["layers"], enc_tokens=shape["src"], enc_layers=shape["layers"],
        heads=shape["heads"],
    )
    return timed_row(
        "train_marian",
        f"Marian training step (fwd+bwd+AdamW, sdpa), {shape['layers']}+{shape['layers']} layers d={shape['d']} "
        f"{shape['heads']} heads vocab={shape['vocab']}, batch {shape['batch']} src/tgt {shape['src']}/{shape['tgt']}",
        step(stock), step(gpam), warmup=warmup, repetitions=repetitions, target=target, floor=floor,
        step_floor=step(lower), floor_target=floor_target,
    )


def smollm_config(shape: dict, **overrides):
    """A Llama config with SmolLM2-135M's shape (random weights): 30 layers, d=576, 9 query / 3 K/V heads of 64."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=shape["layers"], hidden_size=shape["d"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["d"] // shape["heads"],
        intermediate_size=shape["d_ff"], vocab_size=shape["vocab"], max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0, **overrides,
    )
    config._attn_implementation = "sdpa"
    return config


def bench_module_llama(shape: dict, *, warmup, repetitions, target, floor_target=None) -> Row:
    """One Llama attention module with SmolLM2-135M's shape (GQA 9/3 heads, RoPE), forward + backward, sdpa."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = smollm_config(shape)
    torch.manual_seed(0)
    stock = LlamaAttention(config, layer_idx=0)
    gpam = gpam_attention_copy(stock, hf_gpam.ARCHITECTURES["llama"], config, "sdpa")
    lower = floor_module(stock)
    batch, seq = shape["batch"], shape["T"]
    hidden = torch.randn(batch, seq, shape["d"], requires_grad=True)
    position_ids = torch.arange(seq)[None].expand(batch, seq)
    position_embeddings = LlamaRotaryEmbedding(config)(hidden, position_ids)

    def step(module):
        def run():
            module(hidden, position_embeddings=position_embeddings, attention_mask=None)[0].sum().backward()
            hidden.grad = None
            module.zero_grad(set_to_none=True)

        return run

    d, head_dim = shape["d"], shape["d"] // shape["heads"]
    kv_width = shape["kv_heads"] * head_dim
    # projections: Q and O (d×d), K and V (d×kv_width); core and Q⁻ as in the GPT-2 row
    proj = 2 * (2 * d * d + 2 * d * kv_width)
    floor = (proj + 2 * 4 * seq * d + 2 * head_dim * d) / (proj + 4 * seq * d)
    return timed_row(
        "module_llama_smollm",
        f"Llama attention module fwd+bwd (sdpa, RoPE, GQA {shape['heads']}/{shape['kv_heads']} heads, D={head_dim}), "
        f"SmolLM2-135M shape, B={batch} T={seq}, causal",
        step(stock), step(gpam), warmup=warmup, repetitions=repetitions, target=target, floor=floor,
        step_floor=step(lower), floor_target=floor_target,
    )


def bench_training_llama(shape: dict, *, warmup, repetitions, target, floor_target=None) -> Row:
    """Training step of a Llama with SmolLM2-135M's shape (random weights): fwd, bwd, AdamW (sdpa)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    stock, gpam = stock_and_gpam(LlamaForCausalLM(smollm_config(shape)))
    lower = floor_model(stock, gpam)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["T"]))

    def step(model):
        return training_step(model, input_ids=ids, labels=ids)

    return timed_row(
        "train_llama_smollm",
        f"Llama training step (fwd+bwd+AdamW, sdpa), SmolLM2-135M shape ({shape['layers']} layers d={shape['d']}, "
        f"GQA {shape['heads']}/{shape['kv_heads']}), batch {shape['batch']} T={shape['T']}",
        step(stock), step(gpam), warmup=warmup, repetitions=repetitions, target=target, floor=None,
        step_floor=step(lower), floor_target=floor_target,
    )


def bench_decode_llama(shape: dict, *, warmup, repetitions, target, floor_target=None) -> Row:
    """Greedy decoding with the KV cache of a Llama with SmolLM2-135M's shape (sdpa)."""
    from transformers import LlamaForCausalLM

    new_tokens, prompt = shape["new_tokens"], shape["prompt"]
    torch.manual_seed(0)
    stock, gpam = stock_and_gpam(LlamaForCausalLM(smollm_config(shape)).eval())
    lower = floor_model(stock, gpam)
    ids = torch.randint(1, shape["vocab"], (1, prompt))

    def step(model):
        return greedy_decode_step(model, ids, new_tokens)

    return timed_row(
        "decode_llama_smollm",
        f"Llama greedy decode with KV cache (sdpa), SmolLM2-135M shape ({shape['layers']} layers), prompt {prompt}, "
        f"{new_tokens} new tokens",
        step(stock), step(gpam), warmup=warmup, repetitions=repetitions, target=target, floor=None,
        step_floor=step(lower), floor_target=floor_target,
    )


def bench_decode_gqa_padded(shape: dict, *, warmup, repetitions, target, floor_target=None) -> Row:
    """Decode steps of a padded batch on a grouped-query Llama (sdpa), the prompt already in the KV cache.

    One row of the batch is left-padded, so every step carries a (B, 1, 1, Tk) padding mask: SDPA's GQA mode would
    take its math path there, and release 0.2 copied the whole cache per step with repeat_kv to serve it. Only the
    decode steps are timed: the prompt is prefilled once, and the cache is cropped back to it after each run.
    """
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    batch, prompt, steps = shape["batch"], shape["prompt"], shape["steps"]
    config = LlamaConfig(
        num_hidden_layers=shape["layers"], hidden_size=shape["d"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["d"] // shape["heads"], intermediate_size=shape["d_ff"],
        vocab_size=shape["vocab"], max_position_embeddings=prompt + steps + 8, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    stock, gpam = stock_and_gpam(LlamaForCausalLM(config).eval())
    lower = floor_model(stock, gpam)
    ids = torch.randint(1, shape["vocab"], (batch, prompt))
    mask = torch.ones(batch, prompt + steps, dtype=torch.long)
    # the last row: half of its prompt is left padding
    mask[-1, : prompt // 2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def step(model):
        cache = DynamicCache(config=config)
        with torch.no_grad():
            model(ids, attention_mask=mask[:, :prompt], position_ids=positions[:, :prompt], past_key_values=cache)
        next_ids = ids[:, -1:]

        @torch.no_grad()
        def run():
            for index in range(prompt, prompt + steps):
                model(next_ids, attention_mask=mask[:, : index + 1], position_ids=positions[:, index : index + 1],
                      past_key_values=cache)
            # drop the tokens this run appended (a negative count: the stock crop keeps the rest)
            cache.crop(-steps)

        return run

    return timed_row(
        "decode_gqa_padded",
        f"padded batched decode, GQA: Llama {shape['heads']}/{shape['kv_heads']} heads of "
        f"{shape['d'] // shape['heads']}, {shape['layers']} layers, B={batch}, {prompt} cached tokens (one row half "
        f"padding), {steps} decode steps (sdpa)",
        step(stock), step(gpam), warmup=warmup, repetitions=repetitions, target=target, floor=None,
        step_floor=step(lower), floor_target=floor_target,
    )


def bench_patch_model(shape: dict, *, repetitions, target) -> Row:
    """Wall time of ``patch_model`` on a GPT-2 LM, and the parameter overhead it adds."""
    config = gpt2_config(
        n_layer=shape["layers"], n_embd=shape["d"], n_head=shape["heads"], n_positions=1024,
        vocab_size=shape["vocab"], attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config)
    stock_params = sum(p.numel() for p in base.parameters())
    times, gpam_params = [], None
    for _ in range(repetitions):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        hf_gpam.patch_model(model, **GPAM_OPTIONS)
        times.append(time.perf_counter() - start)
        gpam_params = sum(p.numel() for p in model.parameters())
    return Row(
        "patch_model",
        f"patch_model on GPT-2 ({shape['layers']} layers d={shape['d']}): parameters (ratio) and seconds (extra)",
        float(stock_params), float(gpam_params), "params", target=target, repetitions=repetitions,
        extra={"seconds_median": statistics.median(times), "seconds_max": max(times), "seconds_target": 1.0},
    )


MEMORY_CHILD_FLAG = "--_memory-child"


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


def memory_child(variant: str, shape: dict) -> None:
    """Run in a fresh process: peak RSS of one no-grad forward, printed as JSON.

    The GPT-2 body on one unpadded sequence, or (``shape["model"] == "bart_encoder"``) a BART encoder on a batch of
    two whose second row is half padding: the padding mask reaches the fused path as an expanded (B, 1, T, T) view,
    which must not become a dense copy.
    """
    torch.manual_seed(0)
    if shape.get("model") == "bart_encoder":
        from transformers import BartConfig, BartModel

        config = BartConfig(
            encoder_layers=shape["layers"], decoder_layers=1, d_model=shape["d"], encoder_attention_heads=shape["heads"],
            decoder_attention_heads=shape["heads"], encoder_ffn_dim=4 * shape["d"], decoder_ffn_dim=4 * shape["d"],
            max_position_embeddings=shape["T"], vocab_size=shape["vocab"],
        )
        config._attn_implementation = "sdpa"
        model = BartModel(config).eval()
        if variant == "gpam":
            hf_gpam.patch_model(model, **GPAM_OPTIONS)
        encoder = model.get_encoder()
        ids = torch.randint(3, shape["vocab"], (2, shape["T"]))
        mask = torch.ones_like(ids)
        mask[1, shape["T"] // 2 :] = 0
        with torch.no_grad():
            encoder(input_ids=ids, attention_mask=mask)
            gc.collect()
            baseline = _rss_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
            encoder(input_ids=ids, attention_mask=mask)
            peak = _rss_kib("VmHWM")
        print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "forward_peak_mib": (peak - baseline) / 1024}))
        return
    config = gpt2_config(
        n_layer=shape["layers"], n_embd=shape["d"], n_head=shape["heads"], n_positions=shape["T"],
        vocab_size=shape["vocab"], attn_implementation="sdpa",
    )
    model = GPT2Model(config).eval()
    if variant == "gpam":
        hf_gpam.patch_model(model, **GPAM_OPTIONS)
    ids = torch.randint(0, shape["vocab"], (1, shape["T"]))
    use_cache = shape.get("use_cache", True)
    with torch.no_grad():
        # one warm-up forward so one-time allocations (thread pools, caches) are not counted
        model(input_ids=ids, use_cache=use_cache)
        gc.collect()
        baseline = _rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        model(input_ids=ids, use_cache=use_cache)
        peak = _rss_kib("VmHWM")
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "forward_peak_mib": (peak - baseline) / 1024}))


def bench_memory(shape: dict, *, repetitions, target, name: str = "memory_forward") -> Row:
    """Peak memory of a fused (sdpa) no-grad forward (see ``memory_child``), each run in its own process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    results = {"stock": [], "gpam": []}
    for rep in range(repetitions):
        for variant in (("stock", "gpam") if rep % 2 == 0 else ("gpam", "stock")):
            command = [sys.executable, __file__, MEMORY_CHILD_FLAG, variant, json.dumps(shape)]
            completed = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results[variant].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    stock_peaks = [r["forward_peak_mib"] for r in results["stock"]]
    gpam_peaks = [r["forward_peak_mib"] for r in results["gpam"]]
    stock_total = statistics.median(r["peak_kib"] for r in results["stock"]) / 1024
    gpam_total = statistics.median(r["peak_kib"] for r in results["gpam"]) / 1024
    if shape.get("model") == "bart_encoder":
        description = (
            f"peak RSS of a no-grad sdpa forward (activations, above the resident model), BART encoder "
            f"{shape['layers']} layers d={shape['d']}, batch 2 with the second row half padding, T={shape['T']}"
        )
    else:
        description = (
            f"peak RSS of a no-grad sdpa forward (activations, above the resident model), GPT-2 body "
            f"{shape['layers']} layers d={shape['d']}, batch 1, T={shape['T']}"
        )
    return Row(
        name,
        description,
        statistics.median(stock_peaks), statistics.median(gpam_peaks), "MiB", target=target,
        ratio_spread=(min(g / s for s, g in zip(stock_peaks, gpam_peaks)), max(g / s for s, g in zip(stock_peaks, gpam_peaks))),
        repetitions=repetitions,
        extra={
            "stock_all": stock_peaks, "gpam_all": gpam_peaks,
            "whole_process_peak_mib": {"stock": stock_total, "gpam": gpam_total, "ratio": gpam_total / stock_total},
        },
    )


def check_compile(*, steps: int = 2) -> Row:
    """torch.compile(fullgraph=True) of a tiny GPAM GPT-2 training step; the losses must match eager mode."""
    from hf_gpam.testing_utils import tiny_gpam_config

    losses = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = hf_gpam.GpamGPT2LMHeadModel(tiny_gpam_config("gpt2", attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, model.config.vocab_size, (2, 16))

        def loss_fn(input_ids):
            return model(input_ids=input_ids, labels=input_ids).loss

        fn = torch.compile(loss_fn, fullgraph=True) if mode == "compiled" else loss_fn
        start = time.perf_counter()
        values = []
        for _ in range(steps):
            loss = fn(ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            values.append(loss.item())
        losses[mode] = (values, time.perf_counter() - start)
    diff = max(abs(a - b) for a, b in zip(losses["eager"][0], losses["compiled"][0]))
    return Row(
        "compile", "torch.compile(fullgraph=True) training steps of a tiny GPAM GPT-2: max abs loss difference to eager mode",
        0.0, diff, "abs", target=None, repetitions=steps,
        extra={"eager_losses": losses["eager"][0], "compiled_losses": losses["compiled"][0],
               "compile_seconds": losses["compiled"][1], "max_abs_loss_diff": diff, "ok": diff < 1e-4},
    )


SHAPES = {
    "full": {
        "module": {"B": 4, "H": 12, "T": 1024, "D": 64},
        "memory": {"layers": 12, "d": 768, "heads": 12, "vocab": 50257, "T": 4096},
        "memory_padded": {"model": "bart_encoder", "layers": 2, "d": 512, "heads": 8, "vocab": 1000, "T": 4096},
        "train_gpt2": {"layers": 12, "d": 768, "heads": 12, "vocab": 50257, "T": 512, "batch": 2},
        "decode": {"layers": 12, "d": 768, "heads": 12, "vocab": 50257, "prompt": 32, "new_tokens": 128},
        "train_marian": {"layers": 6, "d": 512, "heads": 8, "vocab": 32000, "src": 64, "tgt": 64, "batch": 8},
        "patch": {"layers": 12, "d": 768, "heads": 12, "vocab": 50257},
        "smollm_module": {"layers": 30, "d": 576, "heads": 9, "kv_heads": 3, "d_ff": 1536, "vocab": 49152,
                          "batch": 1, "T": 1024},
        "smollm_train": {"layers": 30, "d": 576, "heads": 9, "kv_heads": 3, "d_ff": 1536, "vocab": 49152,
                         "batch": 1, "T": 512},
        "smollm_decode": {"layers": 30, "d": 576, "heads": 9, "kv_heads": 3, "d_ff": 1536, "vocab": 49152,
                          "prompt": 32, "new_tokens": 64},
        # the review's shape (Llama-7B attention: 32/8 heads of 128, B=4, 4,096 cached tokens), 2 layers
        "decode_gqa_padded": {"layers": 2, "d": 4096, "heads": 32, "kv_heads": 8, "d_ff": 4096, "vocab": 1000,
                              "batch": 4, "prompt": 4096, "steps": 8},
    },
    "quick": {
        "module": {"B": 2, "H": 12, "T": 256, "D": 64},
        "memory": {"layers": 2, "d": 768, "heads": 12, "vocab": 1000, "T": 1024},
        "memory_padded": {"model": "bart_encoder", "layers": 1, "d": 256, "heads": 4, "vocab": 1000, "T": 1024},
        "train_gpt2": {"layers": 2, "d": 256, "heads": 4, "vocab": 1000, "T": 128, "batch": 2},
        "decode": {"layers": 2, "d": 256, "heads": 4, "vocab": 1000, "prompt": 16, "new_tokens": 16},
        "train_marian": {"layers": 2, "d": 256, "heads": 4, "vocab": 1000, "src": 32, "tgt": 32, "batch": 4},
        "patch": {"layers": 12, "d": 768, "heads": 12, "vocab": 50257},
        "smollm_module": {"layers": 2, "d": 576, "heads": 9, "kv_heads": 3, "d_ff": 1536, "vocab": 1000,
                          "batch": 1, "T": 256},
        "smollm_train": {"layers": 2, "d": 576, "heads": 9, "kv_heads": 3, "d_ff": 1536, "vocab": 1000,
                         "batch": 1, "T": 128},
        "smollm_decode": {"layers": 2, "d": 576, "heads": 9, "kv_heads": 3, "d_ff": 1536, "vocab": 1000,
                          "prompt": 16, "new_tokens": 16},
        "decode_gqa_padded": {"layers": 1, "d": 1024, "heads": 16, "kv_heads": 4, "d_ff": 1024, "vocab": 1000,
                              "batch": 4, "prompt": 512, "steps": 4},
    },
}

TARGETS = {
    "module_sdpa": 1.55, "module_eager": 1.35, "memory_forward": 1.05, "memory_padded_encoder": 1.05, "train_gpt2": 1.12, "decode_gpt2": 1.06,
    "train_marian": 1.10, "patch_model": 1.01,
    "module_llama_smollm": 1.55, "train_llama_smollm": 1.15, "decode_llama_smollm": 1.06, "decode_gqa_padded": 1.10,
}

# daGPAM against the measured floor (issue 14): attention modules within 5 %, training steps within 3 %. Decode rows
# keep their targets against stock (TARGETS) and report the floor beside them.
FLOOR_TARGETS = {
    "module_sdpa": 1.05, "module_eager": 1.05, "module_llama_smollm": 1.05,
    "train_gpt2": 1.03, "train_marian": 1.03, "train_llama_smollm": 1.03,
}

ALL_BENCHMARKS = ("module_sdpa", "module_eager", "memory_forward", "memory_padded_encoder", "train_gpt2", "decode_gpt2", "train_marian",
                  "patch_model", "compile", "module_llama_smollm", "train_llama_smollm", "decode_llama_smollm",
                  "decode_gqa_padded")


# timed rows: name -> (function, shape key); each takes the shape and warmup / repetitions / targets
TIMED_ROWS = {
    "module_sdpa": (lambda shape, **kw: bench_module("sdpa", shape, **kw), "module"),
    "module_eager": (lambda shape, **kw: bench_module("eager", shape, **kw), "module"),
    "module_llama_smollm": (lambda shape, **kw: bench_module_llama(shape, **kw), "smollm_module"),
    "train_llama_smollm": (lambda shape, **kw: bench_training_llama(shape, **kw), "smollm_train"),
    "decode_llama_smollm": (lambda shape, **kw: bench_decode_llama(shape, **kw), "smollm_decode"),
    "decode_gqa_padded": (lambda shape, **kw: bench_decode_gqa_padded(shape, **kw), "decode_gqa_padded"),
    "train_gpt2": (lambda shape, **kw: bench_training_gpt2(shape, **kw), "train_gpt2"),
    "decode_gpt2": (lambda shape, **kw: bench_decode(shape, **kw), "decode"),
    "train_marian": (lambda shape, **kw: bench_training_marian(shape, **kw), "train_marian"),
}


def run_all(quick: bool, only: list[str], repetitions: int | None) -> list[Row]:
    shapes = SHAPES["quick" if quick else "full"]
    reps = repetitions or (4 if quick else 8)
    warmup = 1
    rows = []
    for name in only:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        if name in TIMED_ROWS:
            function, shape = TIMED_ROWS[name]
            row = function(shapes[shape], warmup=warmup, repetitions=reps, target=TARGETS[name],
                           floor_target=FLOOR_TARGETS.get(name))
        elif name == "memory_forward":
            row = bench_memory(shapes["memory"], repetitions=max(2, reps // 4), target=TARGETS[name])
        elif name == "memory_padded_encoder":
            row = bench_memory(shapes["memory_padded"], repetitions=max(2, reps // 4), target=TARGETS[name], name=name)
        elif name == "patch_model":
            row = bench_patch_model(shapes["patch"], repetitions=3, target=TARGETS[name])
        elif name == "compile":
            row = check_compile()
        else:
            raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(ALL_BENCHMARKS)}")
        print(format_row(row), file=sys.stderr, flush=True)
        rows.append(row)
        gc.collect()
    return rows


def format_row(row: Row) -> str:
    if row.name == "compile":
        ok = row.extra["ok"]
        return f"{row.name:<15} {'ok' if ok else 'MISMATCH':>10}  max|Δloss|={row.gpam:.2e}  {row.description}"
    spread = f"[{row.ratio_spread[0]:.3f}, {row.ratio_spread[1]:.3f}]" if row.ratio_spread else ""
    floor = f"{row.floor:.3f}" if row.floor else "-"
    target = f"≤{row.target:.2f}" if row.target else "-"
    status = {True: "met", False: "MISSED", None: ""}[row.meets_target]
    if row.name == "patch_model" and row.extra["seconds_median"] >= row.extra["seconds_target"]:
        status = "MISSED (time)"
    values = f"{row.stock:>10.1f} {row.gpam:>10.1f} {row.unit:<6}"
    if row.unit == "params":
        values = f"{row.stock / 1e6:>9.2f}M {row.gpam / 1e6:>9.2f}M {row.extra['seconds_median']:.3f}s"
    measured = "-" * 3
    if row.measured_floor:
        floor_target = f"≤{row.floor_target:.2f}" if row.floor_target else "-"
        low, high = row.floor_ratio_spread
        measured = f"{row.measured_floor:>9.1f} {row.floor_ratio:>6.3f} [{low:.3f}, {high:.3f}] {floor_target}"
    return f"{row.name:<15} {values} {row.ratio:>7.3f} {spread:>17} {floor:>6} {target:>6} | {measured} {status}"


def markdown_table(paths: list[Path]) -> str:
    """A markdown table of saved results; a row in a later file replaces the same row of an earlier one."""
    rows, sources = {}, {}
    for path in paths:
        payload = json.loads(Path(path).read_text())
        for row in payload["rows"]:
            rows[row["name"]] = row
            sources[row["name"]] = Path(path).name
    lines = [
        "| row | workload | stock | daGPAM | ratio | pair ratios (p10-p90) | FLOP floor | target | measured floor "
        "| daGPAM / floor (p10-p90) | floor target | met | reps | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if name == "compile":
            extra = row["extra"]
            lines.append(
                f"| compile | {row['description']} | loss {extra['eager_losses'][-1]:.5f} | "
                f"loss {extra['compiled_losses'][-1]:.5f} | max abs Δ {row['gpam']:.1e} | | | equal | | | | "
                f"{'yes' if extra['ok'] else 'NO'} | {row['repetitions']} | {sources[name]} |"
            )
            continue
        if row["unit"] == "params":
            stock, gpam = f"{row['stock'] / 1e6:.2f} M params", f"{row['gpam'] / 1e6:.2f} M params"
            met = row["meets_target"] and row["extra"]["seconds_median"] < row["extra"]["seconds_target"]
            ratio = f"{row['ratio']:.4f} ({row['extra']['seconds_median'] * 1e3:.1f} ms)"
        else:
            stock, gpam = f"{row['stock']:.1f} {row['unit']}", f"{row['gpam']:.1f} {row['unit']}"
            met, ratio = row["meets_target"], f"**{row['ratio']:.3f}**"
        spread = f"{row['ratio_spread'][0]:.3f}-{row['ratio_spread'][1]:.3f}" if row.get("ratio_spread") else ""
        floor = f"{row['floor']:.3f}" if row.get("floor") else ""
        target = f"≤ {row['target']:.2f}" if row.get("target") else ""
        measured, against, floor_target = "", "", ""
        if row.get("measured_floor"):
            low, high = row["floor_ratio_spread"]
            measured = f"{row['measured_floor']:.1f} {row['unit']}"
            against = f"**{row['floor_ratio']:.3f}** ({low:.3f}-{high:.3f})"
            floor_target = f"≤ {row['floor_target']:.2f}" if row.get("floor_target") else ""
        lines.append(
            f"| {name} | {row['description']} | {stock} | {gpam} | {ratio} | {spread} | {floor} | {target} | "
            f"{measured} | {against} | {floor_target} | {'yes' if met else 'NO'} | {row['repetitions']} | "
            f"{sources[name]} |"
        )
    return "\n".join(lines)


def environment() -> dict:
    return {
        "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
        "cpu_model": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "hf_gpam": getattr(hf_gpam, "__version__", "unknown"),
        "cuda_available": torch.cuda.is_available(),
        "load_average_at_start": os.getloadavg(), "clock": CLOCK,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == MEMORY_CHILD_FLAG:
        memory_child(argv[1], json.loads(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (about a minute)")
    parser.add_argument(
        "--gpam_rope_variant", choices=("relative", "literal"), default=None,
        help="the RoPE reading of Q⁻ for the Llama rows (default: the config's default)",
    )
    parser.add_argument("--only", nargs="+", choices=ALL_BENCHMARKS, default=list(ALL_BENCHMARKS))
    parser.add_argument("--repetitions", type=int, default=None, help="timed pairs per row (default 8, quick 4)")
    parser.add_argument("--render", type=Path, nargs="+", default=None, metavar="JSON",
                        help="print a markdown table of saved results (later files override rows) and exit")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: reproducible on a shared machine; 0 = torch default)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                        help="clock of the table: process CPU time (default) or wall time; both go to the JSON")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results path (default benchmarks/results/<quick|full>_<timestamp>.json)")
    args = parser.parse_args(argv)
    if args.render:
        print(markdown_table(args.render))
        return 0
    global CLOCK
    CLOCK = args.clock
    if args.gpam_rope_variant is not None:
        GPAM_OPTIONS["gpam_rope_variant"] = args.gpam_rope_variant
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = environment()
    started = time.time()
    rows = run_all(args.quick, args.only, args.repetitions)
    header = (f"{'benchmark':<15} {'stock':>10} {'gpam':>10} {'unit':<6} {'ratio':>7} {'pair ratios':>17} "
              f"{'FLOPs':>6} {'target':>6} | {'floor':>9} {'/floor':>6} {'spread':>16} target")
    print(f"# {env['cpu_model']}, {env['torch_threads']} threads, torch {env['torch']}, "
          f"transformers {env['transformers']}, clock {CLOCK}, load at start {env['load_average_at_start']}")
    print(header)
    for row in rows:
        print(format_row(row))
    output = args.output or RESULTS_DIR / f"{'quick' if args.quick else 'full'}_{time.strftime('%Y%m%dT%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "mode": "quick" if args.quick else "full", "environment": env, "seconds": time.time() - started,
        "load_average_at_end": os.getloadavg(),
        "rows": [
            {**asdict(row), "ratio": row.ratio, "floor_ratio": row.floor_ratio, "meets_target": row.meets_target}
            for row in rows
        ],
    }
    output.write_text(json.dumps(payload, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
