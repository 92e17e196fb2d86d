"""What warming L2 with o_proj's weight during decode attention saves in a batch-1 decode step.

    python -m kernels.bench_prefetch [--shape llama3-8b] [--layers 32] [--context 512]

Builds a decode step's chain from the real kernels over distinct weights per layer (so no
weight read hits L2 by reuse): the qkv GEMV, paged decode attention over `--context` cached
tokens (its grid sized for `--graph-context`, as the engine's decode graphs are), o_proj,
gate_up and down (activation folded in) GEMVs, PDL on where the card has it. It times graph
replays of the chain without a prefetch, and with attention prefetching o_proj's whole weight
or its first half, each way of issuing it (`--modes`), against the weight bytes / copy
bandwidth; and checks that every variant's output equals the one without, bit for bit. First,
the o_proj GEMV alone from DRAM and from L2: what a perfect prefetch could give.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

from bench.offline import copy_bandwidth
from bench.shapes import SHAPES, hf_config
from engine.model_config import ModelConfig
from kernels.bench_attention import time_graph
from kernels.triton_decode import paged_decode_triton
from kernels.triton_gemv import gemv, graph_time_us
from kernels.triton_pdl import use_pdl
from kernels.triton_prefetch import can_prefetch

BLOCK_SIZE = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--graph-context", type=int, default=8192)
    parser.add_argument("--modes", default="1,2,3", help="kernels/triton_prefetch.py prefetch_share's MODE")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = ModelConfig.from_hf(hf_config(args.shape))
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    hidden, inner = config.hidden_size, config.intermediate_size
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    on = {"device": device, "dtype": torch.bfloat16}
    bandwidth = copy_bandwidth(device)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    blocks = -(-args.context // BLOCK_SIZE)
    layers = []
    weight_bytes = 0
    for _ in range(args.layers):
        weights = {
            "qkv": torch.randn(q_size + 2 * kv_size, hidden, **on) * 0.02,
            "o_proj": torch.randn(hidden, q_size, **on) * 0.02,
            "gate_up": torch.randn(2 * inner, hidden, **on) * 0.02,
            "down": torch.randn(hidden, inner, **on) * 0.02,
        }
        weight_bytes += sum(w.numel() * w.element_size() for w in weights.values())
        cache = torch.randn(2, blocks, BLOCK_SIZE, kv_heads, head_dim, **on)
        layers.append((weights, cache))
    table = torch.arange(blocks, device=device, dtype=torch.int32)[None, :]
    seq_lens = torch.tensor([args.context], device=device, dtype=torch.int32)
    x_in = torch.randn(1, hidden, **on)
    floor_ms = weight_bytes / bandwidth * 1e3
    print(
        f"{torch.cuda.get_device_name(device)}: copy {bandwidth / 1e12:.2f} TB/s, L2 {l2 >> 20} MiB, "
        f"PDL {use_pdl(device)}, bulk prefetch {can_prefetch(device)}; {args.layers} layers, "
        f"context {args.context} (grid for {args.graph_context}), weights {weight_bytes / 1e9:.2f} GB, "
        f"floor {floor_ms:.3f} ms"
    )

    def chain(fraction: float) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            x = x_in
            for weights, cache in layers:
                qkv = gemv(x, weights["qkv"])
                query = qkv[:, :q_size].reshape(1, heads, head_dim)
                o_weight = weights["o_proj"]
                prefetch = None
                if fraction > 0:
                    rows = max(1, int(o_weight.shape[0] * fraction))
                    prefetch = o_weight[:rows]
                attn = paged_decode_triton(
                    query, cache, table, seq_lens, args.graph_context, head_dim**-0.5, prefetch=prefetch
                )
                stream = gemv(attn.reshape(1, q_size), o_weight, residual=x)
                gate_up = gemv(stream, weights["gate_up"])
                x = gemv(gate_up, weights["down"], silu_mul=True, residual=stream)
            return x

        return step

    o_weights = [weights["o_proj"] for weights, _ in layers]
    attn_in = torch.randn(1, q_size, **on)
    cold = graph_time_us(lambda w: gemv(attn_in, w), o_weights)
    hot = graph_time_us(lambda w: gemv(attn_in, w), o_weights[:1])
    print(f"o_proj GEMV alone: {cold:.2f} us from DRAM (32 weights in turn), {hot:.2f} us from L2 (one weight)")
    variants = [(0, 0.0)] + [(mode, f) for mode in (int(m) for m in args.modes.split(",")) for f in (1.0, 0.5)]
    print("| prefetch mode | o_proj prefetched | ms per step | x floor | us per layer saved |")
    print("|---:|---:|---:|---:|---:|")
    reference = None
    base = 0.0
    for mode, fraction in variants:
        os.environ["PREFIXGATE_L2_PREFETCH_MODE"] = str(mode)
        step = chain(fraction)
        out = step().clone()
        torch.cuda.synchronize()
        if reference is None:
            reference = out
        elif not torch.equal(out.nan_to_num(), reference.nan_to_num()):
            print(f"  {mode} {fraction}: OUTPUT DIFFERS")
        ms = min(time_graph([step], replays=20) for _ in range(3)) * 1e3
        if fraction == 0.0:
            base = ms
        saved = (base - ms) * 1e3 / args.layers
        print(f"| {mode} | {fraction:.2f} | {ms:.3f} | {ms / floor_ms:.3f} | {saved:.2f} |")


if __name__ == "__main__":
    main()
