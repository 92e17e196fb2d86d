"""A decoder layer's whole MLP at a few rows in two kernels: norm, gate_up, SiLU-and-mul, down, residual.

The folded decode path (engine/models/decoder.py) runs the MLP as two GEMVs: gate_up, then
down with the activation folded into its loads (kernels/triton_gemv.py). Here one program owns
COLUMNS of the intermediate: it computes those columns of gate and up (2 x COLUMNS rows of the
gate_up weight), their activation, and then their whole contribution to the output, a
[rows, hidden] product with the matching COLUMNS of the down weight. The down projection is
thus split along its K, each program's slice being what it computed itself, so no program
waits for another between the two matmuls, and every weight is read once by
cdiv(intermediate, COLUMNS) programs. That matters where the down GEMV has few output columns
to share out: Qwen2.5-1.5B's (1,536 of them: 48 programs on 132 SMs) ran its MLP at 2.05x the
weights' bandwidth floor as two GEMVs and 1.42x here; Llama-3.1-8B's was near its floor
already (1.09x), and ties here (kernels/NOTES.md, v17). engine/skinny.py times both.

A second, small kernel adds the partial products up in a fixed order (deterministic, unlike
atomics), one program per 32 output columns, adds the residual stream, rounds, and leaves the
rows' sums of squares for the next layer's norm (kernels/matmul_ref.py, row statistics). A
grid barrier in place of that second launch (an arrival counter; every program resident)
measured no faster, so there is none.

The input norm is folded as in kernels/triton_gemv.py: the o_proj kernel before this one left
its output rows' sums of squares, the norm's weight is multiplied into the gate_up weight, and
the accumulator rows are scaled by rsqrt(mean + eps). Every rounding is where the unfused chain
rounds (gate_up output, activation, product); only the down projection's float32 sum runs in
another order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.matmul_ref import ROW_STATS_COLUMNS
from kernels.triton_gemv import GEMV_MAX_ROWS, check_row_stats, load_row_stats, norm_partials
from kernels.triton_pdl import pdl_prologue, use_pdl

_STATS_COLUMNS = tl.constexpr(ROW_STATS_COLUMNS)


# M is not specialised: a graph bucket per batch size would each compile a variant.
@triton.jit(do_not_specialize=["M"])
def _mlp_partials_kernel(
    x_ptr, gate_up_ptr, down_ptr, stats_ptr, partial_ptr, M, H, FFN, stride_xm, norm_eps,
    COLUMNS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    PARTIALS: tl.constexpr, USE_PDL: tl.constexpr, BLOCK_M: tl.constexpr = 16,
):  # fmt: skip
    """partials[program, m, :] = act(rmsnorm(x) @ W_gate_up^T)[m, columns] @ W_down[:, columns]^T."""
    pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dtype = x_ptr.dtype.element_ty
    sum_squares = load_row_stats(stats_ptr, rows, row_ok, H, BLOCK_M, PARTIALS)
    # COLUMNS of the intermediate per program, in a tile of CHUNK (the next power of two).
    js = pid * COLUMNS + tl.arange(0, CHUNK)
    j_ok = (tl.arange(0, CHUNK) < COLUMNS) & (js < FFN)
    gate = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
    gate_rows = gate_up_ptr + js[:, None].to(tl.int64) * H
    up_rows = gate_up_ptr + (FFN + js)[:, None].to(tl.int64) * H
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        w_mask = j_ok[:, None] & k_ok[None, :]
        gate = tl.dot(x, tl.trans(tl.load(gate_rows + ks[None, :], mask=w_mask, other=0.0)), gate)
        up = tl.dot(x, tl.trans(tl.load(up_rows + ks[None, :], mask=w_mask, other=0.0)), up)
    scale = tl.rsqrt(sum_squares / H + norm_eps)[:, None]
    # Rounded where the unfused chain rounds: the gate_up output, silu(gate), the product.
    gate = (gate * scale).to(dtype).to(tl.float32)
    up = (up * scale).to(dtype).to(tl.float32)
    activated = ((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up).to(dtype)
    partial_rows = partial_ptr + pid * M * H + rows[:, None] * H
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        w = tl.load(
            down_ptr + hs[:, None].to(tl.int64) * FFN + js[None, :],
            mask=h_ok[:, None] & j_ok[None, :],
            other=0.0,
        )
        tl.store(
            partial_rows + hs[None, :], tl.dot(activated, tl.trans(w)), mask=row_ok[:, None] & h_ok[None, :]
        )


@triton.jit(do_not_specialize=["M"])
def _mlp_sum_kernel(
    x_ptr, partial_ptr, stats_ptr, y_ptr, M, H, programs, stride_xm, stride_ym,
    PROGRAMS: tl.constexpr, STATS_ROWS: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """y = x + the partials' sum over 32 output columns, and those columns' row sums of squares
    of the rounded y, for the next norm."""
    pdl_prologue(USE_PDL)
    group = tl.program_id(0)
    dtype = y_ptr.dtype.element_ty
    owners = tl.arange(0, PROGRAMS)
    cols = group * _STATS_COLUMNS + tl.arange(0, _STATS_COLUMNS)
    col_ok = cols < H
    for m in range(0, M):
        parts = tl.load(
            partial_ptr + owners[:, None] * M * H + m * H + cols[None, :],
            mask=(owners < programs)[:, None] & col_ok[None, :],
            other=0.0,
        )
        residual = tl.load(x_ptr + m * stride_xm + cols, mask=col_ok, other=0.0).to(tl.float32)
        out = (tl.sum(parts, axis=0) + residual).to(dtype)
        tl.store(y_ptr + m * stride_ym + cols, out, mask=col_ok)
        squares = out.to(tl.float32) * out.to(tl.float32)
        tl.store(stats_ptr + group * STATS_ROWS + m, tl.sum(squares, axis=0))


def mlp_programs(intermediate: int, columns: int) -> int:
    return triton.cdiv(intermediate, columns)


def fused_mlp(
    x: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    stats: torch.Tensor,
    norm_eps: float,
    *,
    columns: int = 128,
    block_k: int = 128,
    block_h: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
    only_partials: bool = False,
) -> torch.Tensor:
    """x + down(silu(g) * u) with [g, u] = rmsnorm(x) @ gate_up_weight^T, for x [M <= 16, H].

    rmsnorm has a unit weight and takes its rows' mean squares from `stats` (left by the kernel
    that wrote x); `stats` then gets the output rows' statistics for the next norm. A program
    takes `columns` of the intermediate (a multiple of 16 keeps the down weight's loads
    32-byte aligned); the default tiles measured best or within 2% for Llama-3.1-8B's and
    Qwen2.5-1.5B's shapes on an H200 (`python -m kernels.bench_mlp --sweep`).
    `only_partials` skips the sum (to time the first kernel alone; y is then left unwritten)."""
    rows, hidden = x.shape
    double, width = gate_up_weight.shape
    intermediate = double // 2
    if width != hidden or down_weight.shape != (hidden, intermediate) or double != 2 * intermediate:
        raise ValueError(
            f"weights gate_up {tuple(gate_up_weight.shape)} and down {tuple(down_weight.shape)} "
            f"do not make an MLP of x [{rows}, {hidden}]"
        )
    if rows > GEMV_MAX_ROWS:
        raise ValueError(f"fused_mlp takes at most {GEMV_MAX_ROWS} rows, got {rows}")
    if not (gate_up_weight.is_contiguous() and down_weight.is_contiguous()):
        raise ValueError("fused_mlp needs contiguous weights")
    if columns % 16:
        raise ValueError(f"columns must be a multiple of 16, got {columns}")
    check_row_stats(stats, hidden, GEMV_MAX_ROWS)
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty_like(x)
    if not rows:
        return y
    programs = mlp_programs(intermediate, columns)
    partials = torch.empty((programs, rows, hidden), dtype=torch.float32, device=x.device)
    pdl = use_pdl(x.device)
    _mlp_partials_kernel[(programs,)](
        x, gate_up_weight, down_weight, stats, partials, rows, hidden, intermediate, x.stride(0), norm_eps,
        COLUMNS=columns, CHUNK=triton.next_power_of_2(columns), BLOCK_K=block_k, BLOCK_H=block_h,
        PARTIALS=norm_partials(stats, hidden), USE_PDL=pdl, num_warps=num_warps, num_stages=num_stages,
        launch_pdl=pdl,
    )  # fmt: skip
    if not only_partials:
        _mlp_sum_kernel[(triton.cdiv(hidden, ROW_STATS_COLUMNS),)](
            x, partials, stats, y, rows, hidden, programs, x.stride(0), y.stride(0),
            PROGRAMS=triton.next_power_of_2(programs), STATS_ROWS=GEMV_MAX_ROWS, USE_PDL=pdl,
            num_warps=4, launch_pdl=pdl,
        )  # fmt: skip
    return y
