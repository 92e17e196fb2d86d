"""Warming L2 with the next matmul's weight while a latency-bound kernel runs.

A batch-1 decode step streams ~16 GB of weights and is bound by that; but between the qkv
projection and o_proj, attention and its reduce run for ~6.5 us a layer reading ~2 MB of KV,
and DRAM sits nearly idle. The o_proj weight (32 MiB for an 8B model) fits in an H100/H200's
50-60 MiB L2, and nothing in between reads much else. So the decode attention kernel's
programs, once their predecessor is done, issue bulk L2 prefetches of it
(`cp.async.bulk.prefetch.L2`, Hopper's TMA: one instruction per contiguous piece, no
completion to wait for, the program exits at once), and o_proj then reads it from L2.

`prefetch_share` is called from inside a kernel: each of the grid's programs issues one
share of the bytes, one piece per thread. `prefetch_launch` sizes the shares on the host.
Only NVIDIA Hopper and later have the instruction (`can_prefetch`).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# One thread issues one piece: a warp's 32 pieces go out together (4-warp programs).
PREFETCH_LANES = 128
_LANES = tl.constexpr(PREFETCH_LANES)  # kernels may read only constexpr globals
# The TMA wants 16-byte aligned addresses and sizes.
_ALIGN_BYTES = 16


@triton.jit
def prefetch_share(base_ptr, total_bytes, share_bytes, share, MODE: tl.constexpr = 1):
    """Issue this program's share (number `share`, of `share_bytes`) of an L2 prefetch of
    `total_bytes` from `base_ptr`. MODE 1: PREFETCH_LANES bulk pieces, one per thread; 2: one
    bulk prefetch of the whole share from the first thread; 3: one `prefetch.global.L2` per
    128-byte line, the threads striding over the share."""
    lanes = tl.arange(0, _LANES)
    start = share.to(tl.int64) * share_bytes
    base = base_ptr.to(tl.pointer_type(tl.int8))
    if MODE == 3:
        for line0 in range(0, share_bytes, _LANES * 128):
            offsets = start + line0 + lanes.to(tl.int64) * 128
            flags = (offsets < total_bytes).to(tl.int32)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                "=r,l,r", [base + offsets, flags], dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip
    else:
        if MODE == 2:
            piece = tl.where(lanes == 0, share_bytes, 0).to(tl.int64)
            offsets = start + lanes.to(tl.int64) * 0
        else:
            piece = (lanes * 0 + share_bytes // _LANES).to(tl.int64)
            offsets = start + lanes.to(tl.int64) * piece
        sizes = tl.minimum(tl.maximum(total_bytes - offsets, 0), piece).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [base + offsets, sizes], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9


def can_prefetch(device: torch.device) -> bool:
    """Whether kernels on this device can issue bulk L2 prefetches (NVIDIA Hopper or later),
    unless `PREFIXGATE_L2_PREFETCH=0` turns them off."""
    if device.type != "cuda" or os.environ.get("PREFIXGATE_L2_PREFETCH", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def prefetch_mode() -> int:
    """How the prefetch is issued (prefetch_share's MODE); `PREFIXGATE_L2_PREFETCH_MODE` to compare."""
    return int(os.environ.get("PREFIXGATE_L2_PREFETCH_MODE", "2"))


def prefetch_launch(tensor: torch.Tensor | None, programs: int) -> tuple[torch.Tensor | None, int, int]:
    """(tensor, total bytes, bytes per program's share) for `programs` programs that split a
    prefetch of `tensor` (contiguous); (None, 0, 0) for no prefetch."""
    if tensor is None or tensor.numel() == 0:
        return None, 0, 0
    if not tensor.is_contiguous() or tensor.data_ptr() % _ALIGN_BYTES:
        raise ValueError("an L2 prefetch needs a contiguous tensor at a 16-byte aligned address")
    total = tensor.numel() * tensor.element_size() // _ALIGN_BYTES * _ALIGN_BYTES
    per_lane = triton.cdiv(triton.cdiv(total, programs * PREFETCH_LANES), _ALIGN_BYTES) * _ALIGN_BYTES
    return tensor, total, per_lane * PREFETCH_LANES
