"""Skinny matmuls (a few rows against a weight matrix) that stream the weight at full bandwidth.

A decode step at small batch is a chain of GEMVs: y[M, N] = x[M, K] @ W[N, K]^T with M of
1-16, bound by reading W once. Each program owns BLOCK_N rows of W and walks K in BLOCK_K
steps with several loads in flight, multiplying with `tl.dot` on the x rows padded to 16
(the MMA's smallest M), so W is read exactly once whatever M is. Timed inside CUDA graphs on an
H200 with weights rotating past the L2 (`python -m kernels.bench_gemv`), it reads 3-12% faster
than cuBLAS on an 8B model's o_proj, down and LM head and ties on qkv and gate_up; which of the
two runs is measured per weight shape on the device (`choose_gemv`), so a card where cuBLAS
wins keeps cuBLAS.

`SILU_MUL` folds the MLP's activation into the down projection's loads: x is then the gate_up
output [M, 2K] and the kernel multiplies silu(gate) * up, rounded where the separate kernel
rounds (kernels/triton_elementwise.py), saving a launch per layer. At one row it computes the
activation on that row only (computing it on all 16 padded rows is what made the fold lose
to the separate kernel at batch 1 before).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.elementwise import NormInput
from kernels.triton_pdl import pdl_prologue, use_pdl

# Rows up to this take the GEMV (one 16-row MMA tile); more rows are a real GEMM.
GEMV_MAX_ROWS = 16


@triton.jit
def fold_norm_tile(
    x, sumsq, res_ptr, norm_w_ptr, sum_ptr, rows, ks, x_mask, k_ok, stride_rm, stride_sm, write_sum,
    HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """One K step of an RMSNorm folded into a matmul's loads: x (+ the residual, rounded like a
    torch add, and written back as the new residual stream where `write_sum`) times the norm's
    weight, and the rows' running sum of squares. The caller scales its accumulator by
    rsqrt(sumsq / K + eps) at the end: the norm is linear in x up to that per-row factor, so no
    pass over the row is needed before the first weight tile. (The rounding of x * rstd before
    the weight multiplies, which the separate kernel does, is the one thing not reproduced.)"""
    if HAS_RESIDUAL:
        residual = tl.load(res_ptr + rows[:, None] * stride_rm + ks[None, :], mask=x_mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + rows[:, None] * stride_sm + ks[None, :], x, mask=x_mask & write_sum)
    x32 = x.to(tl.float32)
    sumsq += tl.sum(x32 * x32, axis=1)
    weight = tl.load(norm_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    return (x32 * weight[None, :]).to(x.dtype), sumsq


# M is not specialised: a graph bucket per batch size would each compile a variant (~1 s).
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, res_ptr, norm_w_ptr, sum_ptr, M, N, K,
    stride_xm, stride_wn, stride_ym, stride_rm, stride_sm, eps,
    HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, ONE_ROW: tl.constexpr, NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    rows = tl.arange(0, 16)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    dtype = y_ptr.dtype.element_ty
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    sumsq = tl.zeros((16,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x_mask = row_ok[:, None] & k_ok[None, :]
        x_at = x_ptr + rows[:, None] * stride_xm + ks[None, :]
        if SILU_MUL and ONE_ROW:
            # One real row: the activation's exponentials on it alone, not on 16 padded rows.
            gate = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + ks, mask=k_ok, other=0.0).to(tl.float32)
            activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            x = tl.where((rows == 0)[:, None], (activated * up).to(dtype)[None, :], 0.0).to(dtype)
        elif SILU_MUL:
            gate = tl.load(x_at, mask=x_mask, other=0.0).to(tl.float32)
            up = tl.load(x_at + K, mask=x_mask, other=0.0).to(tl.float32)
            activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            x = (activated * up).to(dtype)
        else:
            x = tl.load(x_at, mask=x_mask, other=0.0)
            if NORM:
                x, sumsq = fold_norm_tile(
                    x, sumsq, res_ptr, norm_w_ptr, sum_ptr, rows, ks, x_mask, k_ok, stride_rm, stride_sm,
                    pid == 0, HAS_RESIDUAL,
                )  # fmt: skip
        w = tl.load(
            w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(x, tl.trans(w), acc)
    if NORM:
        acc = acc * tl.rsqrt(sumsq / K + eps)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + cols[None, :],
        acc.to(dtype),
        mask=row_ok[:, None] & col_ok[None, :],
    )


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
) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias) for M <= GEMV_MAX_ROWS, in x's dtype.

    With `silu_mul`, x is [M, 2K] (gate, then up) and silu(gate) * up is what multiplies.
    """
    rows, width = x.shape
    n, k = weight.shape
    if rows > GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes at most {GEMV_MAX_ROWS} rows, got {rows}")
    if width != (2 * k if silu_mul else k) or weight.stride(1) != 1:
        raise ValueError(f"x [{rows}, {width}] does not fit a weight [{n}, {k}] with contiguous rows")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows:
        _launch(x, weight, bias, y, None, launch, silu_mul=silu_mul)
    return y


def gemv_rms_norm(
    x: torch.Tensor, norm: NormInput, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) @ weight^T (+ bias), x + residual), M <= GEMV_MAX_ROWS: the norm
    folded into the GEMV's loads (kernels/elementwise_ref.py's rms_norm_ref then F.linear, but for
    where x * rstd rounds: see fold_norm_tile)."""
    rows, k = x.shape
    n = weight.shape[0]
    if rows > GEMV_MAX_ROWS or weight.shape[1] != k or weight.stride(1) != 1 or norm.weight.shape != (k,):
        raise ValueError(f"x [{rows}, {k}], weight {tuple(weight.shape)}: no folded norm for these")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    summed = x if norm.residual is None else torch.empty_like(x)
    if rows:
        _launch(x, weight, bias, y, (norm, summed), None)
    return y, summed


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    folded: tuple[NormInput, torch.Tensor] | None,
    launch: dict[str, int] | None,
    silu_mul: bool = False,
) -> None:
    rows = x.shape[0]
    n, k = weight.shape
    options = launch or default_launch(n, k)
    pdl = use_pdl(x.device)
    norm, summed = folded if folded is not None else (None, y)
    residual = norm.residual if norm is not None and norm.residual is not None else x
    _gemv_kernel[(triton.cdiv(n, options["block_n"]),)](
        x, weight, bias if bias is not None else weight, y, residual,
        norm.weight if norm is not None else weight, summed, rows, n, k,
        x.stride(0), weight.stride(0), y.stride(0), residual.stride(0), summed.stride(0),
        norm.eps if norm is not None else 0.0,
        HAS_BIAS=bias is not None, SILU_MUL=silu_mul, ONE_ROW=silu_mul and rows == 1,
        NORM=norm is not None, HAS_RESIDUAL=norm is not None and norm.residual is not None,
        BLOCK_N=options["block_n"], BLOCK_K=options["block_k"], USE_PDL=pdl,
        num_warps=options["num_warps"], num_stages=options["num_stages"], launch_pdl=pdl,
    )  # fmt: skip


def graph_time_us(
    fn: Callable[[torch.Tensor], object], weights: Sequence[torch.Tensor], reps: int = 24
) -> float:
    """GPU time per call of fn(weight), captured in a CUDA graph over rotating weights (timing
    eager launches of a few-us kernel would time the host's launch rate instead)."""
    for weight in weights[:2]:
        fn(weight)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
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


def fastest_kernel(weights: Sequence[torch.Tensor], has_bias: bool, before: str | None = None) -> str:
    """Which kernel reads these weights (several layers' copies of one shape, in turn) fastest
    at one row: "cublas", "gemv", or the GEMV with what comes `before` the matmul folded into
    its loads: "gemv_fused" for "activation" (a down projection: SiLU-and-mul of the gate_up
    output), "gemv_norm" for "norm" (the RMSNorm, with its residual add, before gate_up). Without
    the fold, that kernel's time is counted with the matmul's."""
    from kernels.triton_elementwise import rms_norm_triton, silu_and_mul_triton

    n, k = weights[0].shape
    device, dtype = weights[0].device, weights[0].dtype
    x = torch.randn(1, 2 * k if before == "activation" else k, device=device, dtype=dtype)
    bias = torch.zeros(n, device=device, dtype=dtype) if has_bias else None
    residual = torch.randn(1, k, device=device, dtype=dtype)
    norm = NormInput(residual, torch.ones(k, device=device, dtype=dtype), 1e-5)

    def first(rows: torch.Tensor) -> torch.Tensor:
        if before == "activation":
            return silu_and_mul_triton(rows)
        if before == "norm":
            return rms_norm_triton(rows, norm.weight, norm.eps, residual)[0]
        return rows

    candidates: dict[str, Callable[[torch.Tensor], object]] = {
        "cublas": lambda weight: F.linear(first(x), weight, bias),
        "gemv": lambda weight: gemv(first(x), weight, bias),
    }
    if before == "activation":
        candidates["gemv_fused"] = lambda weight: gemv(x, weight, bias, silu_mul=True)
    if before == "norm":
        candidates["gemv_norm"] = lambda weight: gemv_rms_norm(x, norm, weight, bias)
    times = {name: graph_time_us(fn, weights) for name, fn in candidates.items()}
    return min(times, key=times.__getitem__)
