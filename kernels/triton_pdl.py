"""Programmatic dependent launch (PDL): a kernel's programs start while its predecessor drains.

Inside a CUDA graph a batch-1 decode step is ~400 kernels, ~300 of them ours, and each
boundary still waits for one grid to finish before the next one's programs are placed. On
Hopper and later, a kernel launched with PDL may be placed early; it then waits
(`griddepcontrol.wait`) until everything before it has finished and its writes are visible,
and lets its own dependents be placed (`griddepcontrol.launch_dependents`). Measured on an H200
with stand-ins for a decode step's chain (`python -m kernels.bench_pdl`): 0.6 us saved per
boundary; loading the next weight before the wait (into registers or L2) measured slower.

Every kernel launched with PDL waits before its first load or store and before any early exit:
a program that left without waiting could let its grid finish before its predecessor has, and
the next kernel's wait would then no longer cover the one before. Kernels launched without it
(cuBLAS, torch's) keep ordinary stream order, so mixing the two is safe.

`PREFIXGATE_PDL=0` in the environment turns it off (to compare, or on a driver without it).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    """The first statement of every kernel the engine launches with `launch_pdl`."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def _capable(device_index: int) -> bool:
    # NVIDIA only: a ROCm build reports AMD GPUs as "cuda" devices with capabilities of 9.x.
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on this device launch with PDL: an NVIDIA Hopper or later, unless turned off."""
    if device.type != "cuda" or os.environ.get("PREFIXGATE_PDL", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())
