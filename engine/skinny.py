"""Give the projections whose weight shapes a GEMV kernel reads faster than cuBLAS that kernel.

At batch 1-16 every projection of a decode step is bound by reading its weight once, and
which kernel reads a given shape fastest depends on the card (kernels/triton_gemv.py: on an
H200, for an 8B model, the GEMV was chosen for o_proj and the LM head, qkv went either way,
and cuBLAS kept gate_up and down). So the engine times both, in CUDA graphs on the model's own
weights, once at start, per shape: about a second, against decode steps that then run at
batch <= 16 for as long as the replica lives.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from engine.models.decoder import CausalLM
from engine.models.layers import Linear, SkinnyMatmul

log = logging.getLogger(__name__)


def use_skinny_matmuls(model: CausalLM) -> list[str]:
    """Set the GEMV on every projection whose shape it measured faster; returns their groups."""
    weight = model.lm_head.weight
    if weight.device.type != "cuda" or weight.dtype not in (torch.bfloat16, torch.float16):
        return []  # a CPU, or float32 (tl.dot would round it to tf32)
    from kernels.backend import triton_available

    if not triton_available():
        return []
    from kernels.triton_gemv import GEMV_MAX_ROWS, choose_gemv, gemv

    groups: dict[tuple[str, bool], list[Linear]] = defaultdict(list)
    for layer in model.model.layers:
        groups[("qkv_proj", False)].append(layer.self_attn.qkv_proj)  # type: ignore[union-attr]
        groups[("o_proj", False)].append(layer.self_attn.o_proj)  # type: ignore[union-attr]
        groups[("gate_up_proj", False)].append(layer.mlp.gate_up_proj)  # type: ignore[union-attr]
        groups[("down_proj", True)].append(layer.mlp.down_proj)  # type: ignore[union-attr]  # silu folded in
    groups[("lm_head", False)].append(model.lm_head)
    skinny = SkinnyMatmul(gemv, GEMV_MAX_ROWS)
    chosen = []
    with torch.inference_mode():
        for (name, silu_mul), modules in groups.items():
            weights = [m.weight for m in modules[:4]]
            if choose_gemv(weights, modules[0].bias is not None, silu_mul):
                for module in modules:
                    module.skinny = skinny
                chosen.append(name)
    log.info("skinny matmuls (<= %d rows) on: %s", GEMV_MAX_ROWS, ", ".join(chosen) or "none")
    return chosen
