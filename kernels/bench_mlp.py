"""The decoder's MLP at a few rows: the folded path's two GEMVs against kernels/triton_mlp.py, on a GPU.

    python -m kernels.bench_mlp [--layers 8] [--shapes llama3-8b,qwen2.5-1.5b] [--sweep]

Times, per layer, in CUDA graphs over `--layers` copies of the weights (read in turn, past the
L2): the folded path's chain (gate_up GEMV normalising its input, down GEMV with the activation
folded in, adding the residual and leaving row statistics), cuBLAS's chain for reference, and
the fused MLP with its default tiles (with `--sweep`, over a grid of tiles), beside the
weights' bytes over the copy bandwidth measured here; then the chain and the default fused MLP
at 1-16 rows. Each fused variant's output is checked against the chain's, and repeated calls
must give the same bits.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from bench.gpu_engine import copy_bandwidth
from kernels.matmul_ref import row_stats_buffer, write_row_stats
from kernels.triton_elementwise import silu_and_mul_triton
from kernels.triton_gemv import GEMV_MAX_ROWS, gemv, graph_time_us
from kernels.triton_mlp import fused_mlp, mlp_programs

SHAPES = {"llama3-8b": (4096, 14336), "qwen2.5-1.5b": (1536, 8960)}
EPS = 1e-5
Layer = tuple[torch.Tensor, torch.Tensor]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


def bench_shape(shape: str, layers: int, bandwidth: float, sweep: bool) -> None:
    hidden, intermediate = SHAPES[shape]
    device = torch.device("cuda")
    on = {"device": device, "dtype": torch.bfloat16}
    weights = [
        (
            torch.randn(2 * intermediate, hidden, **on) * hidden**-0.5,
            torch.randn(hidden, intermediate, **on) / 50,
        )
        for _ in range(layers)
    ]
    stats = row_stats_buffer(hidden, GEMV_MAX_ROWS, device)
    floor = 3 * hidden * intermediate * 2 / bandwidth * 1e6
    x = torch.randn(1, hidden, **on)
    write_row_stats(x, stats)
    saved = stats.clone()

    def chain(layer: Layer, x: torch.Tensor = x) -> torch.Tensor:
        gate_up = gemv(x, layer[0], norm_stats=stats, norm_eps=EPS)
        return gemv(gate_up, layer[1], silu_mul=True, residual=x, row_stats=stats)

    def cublas(layer: Layer) -> torch.Tensor:
        return F.linear(silu_and_mul_triton(F.linear(x, layer[0])), layer[1])

    reference = chain(weights[0])
    took_chain = graph_time_us(chain, weights)
    took_cublas = graph_time_us(cublas, weights)
    print(
        f"\n{shape}: hidden {hidden}, intermediate {intermediate}, floor {floor:.1f} us; "
        f"GEMV chain {took_chain:.2f} us ({took_chain / floor:.2f}x), cuBLAS chain {took_cublas:.2f} us"
    )
    print("| columns | programs | block_k | block_h | warps | stages | us | over floor | vs chain | error |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    grid = [{}]  # the defaults
    if sweep:
        widths = (96, 112, 128) if intermediate > 10000 else (64, 80, 96, 128)
        grid += [
            {"columns": c, "block_k": k, "block_h": h, "num_warps": w, "num_stages": s}
            for c, k, h, w, s in itertools.product(widths, (64, 128), (64, 128), (4, 8), (3, 4))
        ]
    best = (float("inf"), "", {})
    for options in grid:
        tiles = {"columns": 128, "block_k": 128, "block_h": 128, "num_warps": 4, "num_stages": 3, **options}
        label = (
            f"| {tiles['columns']} | {mlp_programs(intermediate, tiles['columns'])} | {tiles['block_k']} "
            f"| {tiles['block_h']} | {tiles['num_warps']} | {tiles['num_stages']} |"
        )

        def fused(layer: Layer, tiles: dict = tiles) -> torch.Tensor:
            return fused_mlp(x, layer[0], layer[1], stats, EPS, **tiles)

        try:
            stats.copy_(saved)
            out = fused(weights[0])
            error = relative_error(out, reference)
            repeatable = True
            for _ in range(20):
                stats.copy_(saved)
                repeatable &= torch.equal(fused(weights[0]), out)
            took = graph_time_us(fused, weights)
        except Exception as err:  # a tile that does not fit (shared memory): say so
            print(f"{label} {type(err).__name__} | | | |")
            continue
        flag = "" if repeatable else " NOT REPEATABLE"
        print(f"{label} {took:.2f}{flag} | {took / floor:.2f}x | {took - took_chain:+.2f} | {error:.1e} |")
        if took < best[0]:
            best = (took, label, tiles)
    partials = graph_time_us(
        lambda layer: fused_mlp(x, layer[0], layer[1], stats, EPS, only_partials=True, **best[2]), weights
    )
    print(f"best: {best[0]:.2f} us {best[1]}, its first kernel alone {partials:.2f} us")
    print("\n| rows | GEMV chain us | fused us (defaults) |\n|---:|---:|---:|")
    for rows in (1, 2, 4, 8, 16):
        rows_x = torch.randn(rows, hidden, **on)
        chain_us = graph_time_us(lambda layer, x=rows_x: chain(layer, x), weights)
        fused_us = graph_time_us(
            lambda layer, x=rows_x: fused_mlp(x, layer[0], layer[1], stats, EPS), weights
        )
        print(f"| {rows} | {chain_us:.2f} | {fused_us:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="every tile, not a few")
    args = parser.parse_args()
    bandwidth = copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for shape in args.shapes.split(","):
        bench_shape(shape, args.layers, bandwidth, args.sweep)


if __name__ == "__main__":
    main()
