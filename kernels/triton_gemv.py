"""Skinny matmuls (a few rows against a weight matrix) that stream the weight at full bandwidth.

A decode step at small batch is a chain of GEMVs: y[M, N] = x[M, K] @ W[N, K]^T with M of
1-16, bound by reading W once. Each program owns BLOCK_N rows of W and walks K in BLOCK_K
steps with several loads in flight, multiplying with `tl.dot` on the x rows padded to 16
(the MMA's smallest M), so W is read exactly once whatever M is. Timed inside CUDA graphs on an
H200 with weights rotating past the L2 (`python -m kernels.bench_gemv`), it reads 3-12% faster
than cuBLAS on an 8B model's o_proj, down and LM head and ties on qkv and gate_up; which of the
two runs is measured per weight shape on the device (`fastest_kernel`), so a card where cuBLAS
wins keeps cuBLAS.

`SILU_MUL` folds the MLP's activation into the down projection's loads: x is then the gate_up
output [M, 2K] and the kernel multiplies silu(gate) * up, rounded where the separate kernel
rounds (kernels/triton_elementwise.py), saving a launch per layer. It does so at one row only:
every column tile recomputes the activation, which at 2-16 rows (on 16 padded rows) made the
down projection ~4x slower than the activation kernel followed by the plain GEMV, so at more
rows the wrapper runs that pair.

Three more let a decode layer drop its RMSNorm kernels (engine/models/decoder.py, the folded
path): `residual` adds the residual stream in the epilogue (the o_proj and down projections
then write the stream itself); `row_stats` has that kernel also write, per 32 output columns,
the sums of squares of its rounded output rows (kernels/matmul_ref.py has the layout); and
`norm_stats` makes the next kernel the matmul of rmsnorm(x) with a unit weight: it adds those
partial sums up and scales its accumulator rows by rsqrt(mean + eps) at the end (the norm is
linear up to that per-row factor; the norm's own weight is multiplied into W once,
engine/skinny.py). Summing the squares inside the weight loop instead, from the x tiles it
loads anyway, stopped that loop's loads from pipelining: 3x slower on an H200.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.matmul_ref import ROW_STATS_COLUMNS
from kernels.triton_elementwise import silu_and_mul_triton
from kernels.triton_pdl import pdl_prologue, use_pdl

_STATS_COLUMNS = tl.constexpr(ROW_STATS_COLUMNS)  # kernels may read only constexpr globals

# Rows up to this take the GEMV (one 16-row MMA tile); more rows are a real GEMM.
GEMV_MAX_ROWS = 16
# A launch with `block_m` takes up to that many rows in one tile (python -m kernels.bench_gemv
# --rows 32,64,128 times such "skinny GEMMs" against cuBLAS; the engine does not use them yet).
SKINNY_MAX_ROWS = 128

Operand = TypeVar("Operand")  # what a timed call reads in turn: a weight, a layer


# M is not specialised: a graph bucket per batch size would each compile a variant (~1 s).
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, residual_ptr, stats_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_rm,
    stride_ym, norm_eps, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
    NORM: tl.constexpr, ROW_STATS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, BLOCK_M: tl.constexpr = 16, PARTIALS: tl.constexpr = 1,
):  # fmt: skip
    pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    dtype = y_ptr.dtype.element_ty
    if NORM:
        # Issued before the weight loop, used after it: the previous kernel's partial sums.
        sum_squares = load_row_stats(stats_ptr, rows, row_ok, K, BLOCK_M, PARTIALS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x_mask = row_ok[:, None] & k_ok[None, :]
        x_at = x_ptr + rows[:, None] * stride_xm + ks[None, :]
        if SILU_MUL:
            # x is one row's gate_up (the wrapper sees to that): the activation's exponentials
            # on that row alone, not on 16 padded rows.
            gate = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + ks, mask=k_ok, other=0.0).to(tl.float32)
            activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            x = tl.where((rows == 0)[:, None], (activated * up).to(dtype)[None, :], 0.0).to(dtype)
        else:
            x = tl.load(x_at, mask=x_mask, other=0.0)
        w = tl.load(
            w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(x, tl.trans(w), acc)
    if NORM:
        acc = acc * tl.rsqrt(sum_squares / K + norm_eps)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(
            residual_ptr + rows[:, None] * stride_rm + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
    out = acc.to(dtype)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])
    if ROW_STATS:
        # Squares of the rounded output (what the next norm reads), summed per 32 columns.
        squares = out.to(tl.float32) * out.to(tl.float32)
        GROUPS: tl.constexpr = BLOCK_N // _STATS_COLUMNS
        partial = tl.sum(tl.reshape(squares, (BLOCK_M, GROUPS, _STATS_COLUMNS)), axis=2)
        groups = pid * GROUPS + tl.arange(0, GROUPS)
        tl.store(stats_ptr + groups[None, :] * BLOCK_M + rows[:, None], partial, mask=row_ok[:, None])


@triton.jit
def load_row_stats(stats_ptr, rows, row_ok, K, BLOCK_M: tl.constexpr, PARTIALS: tl.constexpr):
    """The sums of squares of the rows of x [M, K], from the partials the kernel that wrote x
    left: cdiv(K, 32) of them per row (kernels/matmul_ref.py, ROW_STATS_COLUMNS)."""
    groups = tl.arange(0, PARTIALS)
    partials = tl.load(
        stats_ptr + groups[:, None] * BLOCK_M + rows[None, :],
        mask=(groups < tl.cdiv(K, _STATS_COLUMNS))[:, None] & row_ok[None, :],
        other=0.0,
    )
    return tl.sum(partials, axis=0)


def default_launch(n: int, k: int) -> dict[str, int]:
    """The launch `bench_gemv` found best (or within 2%) for an 8B model's shapes on an H200."""
    if n >= 65536:  # an LM head: wide tiles, short K steps
        return {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4}
    if n >= 6144 and k <= 4096:
        return {"block_n": 64, "block_k": 256, "num_warps": 4, "num_stages": 3}
    return {"block_n": 32, "block_k": 512, "num_warps": 4, "num_stages": 4}


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
    launch: dict[str, int] | None = None,
    *,
    residual: torch.Tensor | None = None,
    row_stats: torch.Tensor | None = None,
    norm_stats: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias) (+ residual) for M <= GEMV_MAX_ROWS, in x's dtype.

    With `silu_mul`, x is [M, 2K] (gate, then up) and silu(gate) * up is what multiplies.
    `residual` [M, N] is added before the one rounding. `row_stats` (a row_stats_buffer) gets
    the partial sums of squares of y's rows; with `norm_stats` (the buffer the kernel that wrote
    x filled), rmsnorm(x) with a unit weight and `norm_eps` is what multiplies.
    A `launch` with "block_m" (a power of two up to SKINNY_MAX_ROWS) takes up to that many rows.
    """
    rows, width = x.shape
    n, k = weight.shape
    block_m = (launch or {}).get("block_m", GEMV_MAX_ROWS)
    if not GEMV_MAX_ROWS <= block_m <= SKINNY_MAX_ROWS or block_m & (block_m - 1):
        raise ValueError(
            f"block_m must be a power of two from {GEMV_MAX_ROWS} to {SKINNY_MAX_ROWS}, got {block_m}"
        )
    if rows > block_m:
        raise ValueError(f"gemv takes at most {block_m} rows, got {rows}")
    if width != (2 * k if silu_mul else k) or weight.stride(1) != 1:
        raise ValueError(f"x [{rows}, {width}] does not fit a weight [{n}, {k}] with contiguous rows")
    if residual is not None and (residual.shape != (rows, n) or residual.stride(1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} is not a contiguous-row [{rows}, {n}]")
    options = launch or default_launch(n, k)
    if norm_stats is not None:
        if silu_mul or row_stats is not None:
            raise ValueError("norm_stats: the norm folds into a matmul of x itself, not of an activation")
        check_row_stats(norm_stats, k, block_m)
    if row_stats is not None:
        check_row_stats(row_stats, n, block_m)
        if options["block_n"] % ROW_STATS_COLUMNS:
            raise ValueError(f"row_stats needs column tiles of a multiple of {ROW_STATS_COLUMNS}")
    if silu_mul and rows > 1:
        # Folded in, the activation is recomputed for every column tile, on 16 padded rows
        # unless one row is real: at 2-16 rows that made the down projection ~4x slower than
        # the activation kernel and the plain GEMV (342 against ~90 us for an 8B model's MLP on
        # an H200, kernels/NOTES.md v17). The activation kernel rounds as the fold does.
        x, silu_mul = silu_and_mul_triton(x), False
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows:
        pdl = use_pdl(x.device)
        stats = norm_stats if norm_stats is not None else row_stats
        _gemv_kernel[(triton.cdiv(n, options["block_n"]),)](
            x, weight, bias if bias is not None else weight, residual if residual is not None else y,
            stats if stats is not None else y, y,
            rows, n, k, x.stride(0), weight.stride(0),
            residual.stride(0) if residual is not None else 0, y.stride(0), norm_eps,
            HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
            NORM=norm_stats is not None, ROW_STATS=row_stats is not None, HAS_RESIDUAL=residual is not None,
            BLOCK_N=options["block_n"], BLOCK_K=options["block_k"], USE_PDL=pdl, BLOCK_M=block_m,
            PARTIALS=norm_partials(norm_stats, k),
            num_warps=options["num_warps"], num_stages=options["num_stages"], launch_pdl=pdl,
        )  # fmt: skip
    return y


def norm_partials(norm_stats: torch.Tensor | None, width: int) -> int:
    """The PARTIALS constexpr: a power of two that holds the partials of a `width`-wide row, or
    1 without a norm (a constant that followed K would compile a variant per weight shape)."""
    return triton.next_power_of_2(triton.cdiv(width, ROW_STATS_COLUMNS)) if norm_stats is not None else 1


def check_row_stats(stats: torch.Tensor, width: int, block_m: int) -> None:
    """A row_stats_buffer for rows `width` wide, read or written in tiles of `block_m` rows."""
    need = (-(-width // ROW_STATS_COLUMNS), block_m)
    if stats.dtype != torch.float32 or stats.shape[0] < need[0] or stats.shape[1] != need[1]:
        raise ValueError(
            f"row stats {tuple(stats.shape)} {stats.dtype}: need float32 [>= {need[0]}, {need[1]}]"
        )
    if not stats.is_contiguous():
        raise ValueError("row stats must be contiguous")


def graph_time_us(fn: Callable[[Operand], object], weights: Sequence[Operand], reps: int = 24) -> float:
    """GPU time per call of fn(weight), captured in a CUDA graph over rotating weights (timing
    eager launches of a few-us kernel would time the host's launch rate instead). A "weight"
    may be anything whose calls read different memory: a layer, say."""
    for weight in weights[:2]:
        fn(weight)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # A stream of its own: dropping this graph clears its stream's cuBLAS workspaces
    # (engine/cuda_graphs.py, capture_stream), which must not be the engine's.
    device = weights[0].device if isinstance(weights[0], torch.Tensor) else torch.cuda.current_device()
    with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
        for i in range(reps):
            fn(weights[i % len(weights)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (3 * reps)


def fastest_kernel(weights: Sequence[torch.Tensor], has_bias: bool, activation: bool) -> str:
    """Which kernel reads these weights (several layers' copies of one shape, in turn) fastest
    at one row: "cublas", "gemv", or, for a down projection (`activation`: the SiLU-and-mul
    of the gate_up output comes first), "gemv_fused" with the activation folded into its loads.
    Without the fold, the activation kernel's time is counted with the matmul's."""
    from kernels.triton_elementwise import silu_and_mul_triton

    n, k = weights[0].shape
    device, dtype = weights[0].device, weights[0].dtype
    x = torch.randn(1, 2 * k if activation else k, device=device, dtype=dtype)
    bias = torch.zeros(n, device=device, dtype=dtype) if has_bias else None

    def first(rows: torch.Tensor) -> torch.Tensor:
        return silu_and_mul_triton(rows) if activation else rows

    candidates: dict[str, Callable[[torch.Tensor], object]] = {
        "cublas": lambda weight: F.linear(first(x), weight, bias),
        "gemv": lambda weight: gemv(first(x), weight, bias),
    }
    if activation:
        candidates["gemv_fused"] = lambda weight: gemv(x, weight, bias, silu_mul=True)
    return fastest_of(candidates, weights)


def fastest_of(candidates: dict[str, Callable[[Operand], object]], weights: Sequence[Operand]) -> str:
    """The name of the candidate whose calls over `weights` take the least GPU time (graph_time_us)."""
    times = {name: graph_time_us(fn, weights) for name, fn in candidates.items()}
    return min(times, key=times.__getitem__)
