"""Skinny matmuls on a GPU: the Triton GEMV's launch options against cuBLAS, per weight shape.

    python -m kernels.bench_gemv [--shape llama3-8b]

For each projection of the shape and each row count, prints cuBLAS's time (F.linear) and the
best GEMV launch (past 16 rows, `--rows 32,64,128`: the same kernel with block_m-row tiles),
in us per call and as a share of the copy bandwidth measured in the same run.
Weights rotate through copies (at least two, and 4x the L2 cache in all), as 32 layers do in a decode
step, so no timing reads from L2. Every launch is checked against F.linear first.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from bench.gpu_engine import copy_bandwidth
from bench.shapes import SHAPES, hf_config
from engine.model_config import ModelConfig
from kernels.triton_common import next_power_of_two
from kernels.triton_gemv import GEMV_MAX_ROWS, gemv, graph_time_us

CONFIGS = [
    {"block_n": n, "block_k": k, "num_warps": w, "num_stages": s}
    for n, k, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4))
]


def configs(rows: int) -> list[dict[str, int]]:
    """The GEMV's launches for up to 16 rows; past that, skinny-GEMM tiles of block_m rows."""
    if rows <= GEMV_MAX_ROWS:
        return CONFIGS
    block_m = next_power_of_two(rows)
    return [
        {"block_m": block_m, "block_n": n, "block_k": k, "num_warps": w, "num_stages": s}
        for n, k, w, s in itertools.product((64, 128, 256), (64, 128), (4, 8), (3, 4))
    ]


def projections(shape: str) -> dict[str, tuple[int, int]]:
    c = ModelConfig.from_hf(hf_config(shape))
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    return {
        "qkv": (qkv, c.hidden_size),
        "o_proj": (c.hidden_size, c.num_heads * c.head_dim),
        "gate_up": (2 * c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
        "lm_head": (c.vocab_size, c.hidden_size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--rows", default="1,2,4,8,16")
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    print(f"{torch.cuda.get_device_name(device)}: copy {bandwidth / 1e12:.2f} TB/s, L2 {l2 >> 20} MiB")
    torch.manual_seed(0)
    for name, (n, k) in projections(args.shape).items():
        size = n * k * 2
        copies = max(2, -(-4 * l2 // size))  # at least two: a weight never follows itself
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        floor_us = size / bandwidth * 1e6
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            cublas = graph_time_us(lambda w, a=x: F.linear(a, w), weights)
            reference = F.linear(x.float(), weights[0].float())
            best: tuple[float, dict[str, int]] | None = None
            for config in configs(m):
                try:
                    y = gemv(x, weights[0], launch=config).float()
                except OutOfResources:
                    continue  # more shared memory than the device has
                error = ((y - reference).abs().max() / reference.abs().max()).item()
                if error > 1e-2:
                    raise AssertionError(f"{name} m={m} {config}: relative error {error:.2e}")
                us = graph_time_us(lambda w, a=x, c=config: gemv(a, w, launch=c), weights)
                if best is None or us < best[0]:
                    best = (us, config)
            assert best is not None
            print(
                f"{name:8} {n:>6} x {k:<6} m={m:<2} floor {floor_us:7.1f} us | cuBLAS {cublas:7.1f} us "
                f"({floor_us / cublas:4.0%}) | gemv {best[0]:7.1f} us ({floor_us / best[0]:4.0%}) "
                f"{best[1]} | {cublas / best[0]:.2f}x"
            )
        del weights


if __name__ == "__main__":
    main()
