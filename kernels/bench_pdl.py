"""What programmatic dependent launch (PDL) saves in a batch-1 decode step's chain of kernels.

    python -m kernels.bench_pdl [--shape llama3-8b] [--layers 32]

A decode step at batch 1 is ~11 kernels a layer: four GEMVs that stream a weight each, and
small one-program kernels (norms, rotary, KV store, attention, activation) that read a few
KiB. Inside a CUDA graph each boundary still drains one grid before the next one's programs
start: the weights' bandwidth sits idle through every small kernel and every launch. With
PDL (Hopper+), a kernel launched with the programmatic-serialization attribute may start
while its predecessor runs; it must `griddepcontrol.wait` before reading what that one
wrote, but work that does not depend on it (fetching its own weight) can go first.

This builds that chain from stand-ins (the real GEMV; a one-program "link" kernel per small
kernel, an RMSNorm of the GEMV's output) over distinct weights per layer, so no read hits L2
by reuse, and times graph replays of each variant against the weight bytes / copy bandwidth:

- no PDL;
- PDL: every kernel waits at its top, then lets its dependents launch;
- PDL + the GEMV loads its first weight tile into registers before it waits;
- PDL + the GEMV prefetches the start of its weight slice into L2 before it waits;
- the GEMVs alone, without the links, with and without PDL.

Every variant's output is checked bit for bit against the no-PDL chain's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from bench.gpu_engine import copy_bandwidth
from bench.shapes import SHAPES
from kernels.bench_attention import time_graph
from kernels.bench_gemv import projections
from kernels.triton_gemv import default_launch

_NO_PDL, _PDL, _PDL_FIRST_TILE, _PDL_L2 = 0, 1, 2, 3


@triton.jit(do_not_specialize=["M"])
def _gemv_pdl_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    MODE: tl.constexpr, PREFETCH_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = tl.arange(0, 16)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    first_k = tl.arange(0, BLOCK_K)
    if MODE == 3:
        # One prefetch per 128-byte line of the first PREFETCH_K columns of this program's rows.
        for p0 in tl.static_range(0, PREFETCH_K, 1024):
            lines = tl.minimum(p0 + tl.arange(0, 16) * 64, K - 64)
            tl.inline_asm_elementwise(
                "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [w_rows + lines[None, :]],
                dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip
    if MODE == 2:
        w_first = tl.load(w_rows + first_k[None, :], mask=col_ok[:, None] & (first_k < K)[None, :], other=0.0)
    if MODE >= 1:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    k_start = 0
    if MODE == 2:
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + first_k[None, :],
            mask=row_ok[:, None] & (first_k < K)[None, :],
            other=0.0,
        )
        acc = tl.dot(x, tl.trans(w_first), acc)
        k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


@triton.jit
def _link_kernel(src_ptr, weight_ptr, dst_ptr, n_cols, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """One program: dst = rmsnorm(src[:n_cols]) * weight, standing for a small kernel."""
    if MODE >= 1:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(src_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=0) / n_cols
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + cols, (x * tl.rsqrt(variance + 1e-5) * w).to(dst_ptr.dtype.element_ty), mask=mask)


@dataclass
class Layer:
    weights: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


def _prefetch_k(n: int, k: int, budget_bytes: int) -> int:
    """Columns to prefetch per row: the whole grid prefetches at most budget_bytes."""
    columns = budget_bytes // (2 * n)
    columns = max(1024, min(k, columns)) // 1024 * 1024
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--budgets-mib", default="4,16")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    shapes = projections(args.shape)
    bandwidth = copy_bandwidth(device)
    names = ["qkv", "o_proj", "gate_up", "down"]
    layers = []
    weight_bytes = 0
    for _ in range(args.layers):
        weights = {n: torch.randn(*shapes[n], device=device, dtype=torch.bfloat16) * 0.02 for n in names}
        weight_bytes += sum(w.numel() * 2 for w in weights.values())
        outputs = {n: torch.empty(1, shapes[n][0], device=device, dtype=torch.bfloat16) for n in names}
        layers.append(Layer(weights, outputs))
    hidden = shapes["o_proj"][0]
    widest = max(k for _, k in shapes.values())
    norm_weight = torch.rand(widest, device=device, dtype=torch.bfloat16) + 0.5
    x_in = torch.randn(1, hidden, device=device, dtype=torch.bfloat16)
    scratch = [torch.empty(1, widest, device=device, dtype=torch.bfloat16) for _ in range(2)]
    floor_ms = weight_bytes / bandwidth * 1e3
    print(
        f"{torch.cuda.get_device_name(device)}: copy {bandwidth / 1e12:.2f} TB/s; {args.layers} layers, "
        f"weights {weight_bytes / 1e9:.2f} GB, floor {floor_ms:.3f} ms"
    )

    def gemv(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, mode: int, budget: int) -> None:
        n, k = w.shape
        o = default_launch(n, k)
        _gemv_pdl_kernel[(triton.cdiv(n, o["block_n"]),)](
            x, w, y, 1, n, k, x.stride(0), w.stride(0), y.stride(0),
            MODE=mode, PREFETCH_K=_prefetch_k(n, k, budget), BLOCK_N=o["block_n"], BLOCK_K=o["block_k"],
            num_warps=o["num_warps"], num_stages=o["num_stages"], launch_pdl=mode >= 1,
        )  # fmt: skip

    def link(src: torch.Tensor, dst: torch.Tensor, n_cols: int, mode: int) -> None:
        block = triton.next_power_of_2(n_cols)
        _link_kernel[(1,)](
            src, norm_weight, dst, n_cols, MODE=mode, BLOCK=block,
            num_warps=8 if block >= 8192 else 4, launch_pdl=mode >= 1,
        )  # fmt: skip

    def chain(mode: int, links: bool, budget: int) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            x = x_in
            for layer in layers:
                w, out = layer.weights, layer.outputs
                if links:
                    link(x, scratch[0], hidden, mode)  # input norm
                    x = scratch[0]
                gemv(x, w["qkv"], out["qkv"], mode, budget)
                x = out["qkv"]
                if links:
                    for _ in range(4):  # rotary, store, attention, reduce
                        link(x, scratch[1], hidden, mode)
                        x = scratch[1]
                gemv(x, w["o_proj"], out["o_proj"], mode, budget)
                x = out["o_proj"]
                if links:
                    link(x, scratch[0], hidden, mode)  # post-attention norm
                    x = scratch[0]
                gemv(x, w["gate_up"], out["gate_up"], mode, budget)
                x = out["gate_up"]
                inner = shapes["down"][1]
                link(x, scratch[1], inner, mode) if links else None  # activation
                x = scratch[1] if links else out["gate_up"][:, :inner]
                gemv(x, w["down"], out["down"], mode, budget)
                x = out["down"]
            return x

        return step

    variants = [
        ("no PDL", _NO_PDL, True, 0),
        ("PDL", _PDL, True, 0),
        ("PDL + first tile", _PDL_FIRST_TILE, True, 0),
    ]
    for mib in (int(b) for b in args.budgets_mib.split(",")):
        variants.append((f"PDL + L2 prefetch {mib} MiB", _PDL_L2, True, mib << 20))
    variants += [("GEMVs alone, no PDL", _NO_PDL, False, 0), ("GEMVs alone, PDL", _PDL, False, 0)]
    variants.append(("GEMVs alone, PDL + L2 16 MiB", _PDL_L2, False, 16 << 20))
    reference: dict[bool, torch.Tensor] = {}
    print("| variant | kernels | ms per step | x floor | us per boundary saved vs no PDL |")
    print("|---|---:|---:|---:|---:|")
    base: dict[bool, float] = {}
    for label, mode, links, budget in variants:
        step = chain(mode, links, budget)
        out = step().clone()
        torch.cuda.synchronize()
        if mode == _NO_PDL:
            reference[links] = out
        elif not torch.equal(out, reference[links]):
            print(
                f"  {label}: OUTPUT DIFFERS from no PDL (max {(out - reference[links]).abs().max().item()})"
            )
        ms = time_graph([step], replays=20) * 1e3
        kernels = args.layers * (10 if links else 4)
        if mode == _NO_PDL:
            base[links] = ms
        saved = (base[links] - ms) * 1e3 / kernels
        print(f"| {label} | {kernels} | {ms:.3f} | {ms / floor_ms:.3f} | {saved:.2f} |")


if __name__ == "__main__":
    main()
