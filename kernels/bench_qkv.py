"""The fused qkv kernel at one row, its heads cut in 2, 4 or 8 parts per half, on a GPU.

    python -m kernels.bench_qkv [--layers 8]

With two parts a program (Llama-3.1-8B: 48 heads, 96 programs) leaves 36 of an H200's 132
SMs idle while it streams the 50 MB weight. Times `qkv_rotary_store` per call in CUDA graphs
over `--layers` copies of the weight (read in turn, past the L2), for each part count and a
few K steps, beside cuBLAS's projection alone and the weight's bytes over the copy bandwidth
measured here.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

from bench.gpu_engine import copy_bandwidth
from kernels.triton_gemv import graph_time_us
from kernels.triton_qkv import qkv_rotary_store

SHAPES = {"llama3-8b": (32, 8, 128, 4096), "qwen2.5-1.5b": (12, 2, 128, 1536)}


def bench_shape(shape: str, layers: int, bandwidth: float) -> None:
    heads, kv_heads, head_dim, hidden = SHAPES[shape]
    device = torch.device("cuda")
    n = (heads + 2 * kv_heads) * head_dim
    weights = [torch.randn(n, hidden, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    x = torch.randn(1, hidden, device=device, dtype=torch.bfloat16)
    angles = torch.outer(torch.arange(4096.0), torch.ones(head_dim // 2))
    rotary = {
        "positions": torch.tensor([7], device=device),
        "cos": torch.cat((angles, angles), -1).cos().to(device),
        "sin": torch.cat((angles, angles), -1).sin().to(device),
        "kv_cache": torch.zeros((2, 2, 16, kv_heads, head_dim), device=device, dtype=torch.bfloat16),
        "slot_mapping": torch.tensor([5], device=device),
    }
    floor = n * hidden * 2 / bandwidth * 1e6
    cublas = graph_time_us(functools.partial(F.linear, x), weights)
    print(f"\n{shape}: qkv {n} x {hidden}, floor {floor:.1f} us, cuBLAS projection alone {cublas:.1f} us")
    print("| parts | programs | block_k | us | over floor |")
    print("|---:|---:|---:|---:|---:|")
    for parts in (2, 4, 8):
        for block_k in (None, 128, 256, 512):
            if head_dim // parts < 16:
                continue
            label = f"| {parts} | {parts * (heads + 2 * kv_heads)} | {block_k or 'default'} |"

            def fused(weight: torch.Tensor, parts: int = parts, block_k: int | None = block_k) -> None:
                qkv_rotary_store(
                    x,
                    weight,
                    None,
                    **rotary,
                    num_heads=heads,
                    num_kv_heads=kv_heads,
                    parts=parts,
                    block_k=block_k,
                )

            try:
                took = graph_time_us(fused, weights)
            except Exception as err:  # a launch that does not fit (shared memory): say so
                print(f"{label} {type(err).__name__} | |")
                continue
            print(f"{label} {took:.2f} | {took / floor:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    bandwidth = copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for shape in SHAPES:
        bench_shape(shape, args.layers, bandwidth)


if __name__ == "__main__":
    main()
