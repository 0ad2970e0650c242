"""Which fused layout for causal daGPAM: two SDPA calls, or one call over 2H query heads sharing H KV heads?

    python benchmarks/fused_layouts.py [--repetitions 5] [--length 1024]

Times the attention kernel alone (forward + backward, fp32, causal, B=4 H=12 D=64), stock SDPA against the two
layouts of (1+λ)·SDPA(Q⁺,K,V) − λ·SDPA(Q⁻,K,V), alternating the three in each repetition, and prints the medians
and the ratios to stock. The grouped-query layout interleaves the heads as [h0⁺, h0⁻, h1⁺, ...] so that query
heads 2h and 2h+1 read key/value head h (``enable_gqa=True``). Both layouts compute the same numbers; the one that
measures faster is what ``sdpa_gpam_attention`` uses for causal inputs.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def stock(query, query_neg, key, value):
    return F.scaled_dot_product_attention(query, key, value, is_causal=True)


def two_calls(query, query_neg, key, value):
    positive = F.scaled_dot_product_attention(query, key, value, is_causal=True)
    negative = F.scaled_dot_product_attention(query_neg, key, value, is_causal=True)
    return 1.5 * positive - 0.5 * negative


def grouped_query(query, query_neg, key, value):
    b, h, t, d = query.shape
    # (B, H, 2, T, D) -> (B, 2H, T, D): query heads 2h and 2h+1 share key/value head h
    stacked = torch.stack([query, query_neg], dim=2).reshape(b, 2 * h, t, d)
    out = F.scaled_dot_product_attention(stacked, key, value, is_causal=True, enable_gqa=True).view(b, h, 2, t, d)
    return 1.5 * out[:, :, 0] - 0.5 * out[:, :, 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()
    shape = (4, 12, args.length, 64)
    layouts = {"stock": stock, "two_calls": two_calls, "grouped_query_2H": grouped_query}

    def inputs():
        return [torch.randn(shape, requires_grad=True) for _ in range(4)]

    reference = inputs()
    torch.testing.assert_close(two_calls(*reference), grouped_query(*reference))
    for layout in layouts.values():
        layout(*inputs()).sum().backward()
    times = {name: [] for name in layouts}
    for _ in range(args.repetitions):
        for name, layout in layouts.items():
            tensors = inputs()
            start = time.perf_counter()
            layout(*tensors).sum().backward()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape (B, H, T, D) = {shape}, causal fwd+bwd")
    for name, median in medians.items():
        print(f"{name:>18}: {median * 1000:8.1f} ms   {median / medians['stock']:.3f}x stock")


if __name__ == "__main__":
    main()
