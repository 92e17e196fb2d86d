"""Give the projections whose weight shapes a GEMV kernel reads faster than cuBLAS that kernel.

At batch 1-16 every projection of a decode step is bound by reading its weight once, and
which kernel reads a given shape fastest depends on the card (kernels/triton_gemv.py: on an
H200, for an 8B model, the GEMV was chosen for o_proj and the LM head, qkv went either way,
and cuBLAS kept gate_up and down). So the engine times them, in CUDA graphs on the model's own
weights, once at start, per shape: cuBLAS, the GEMV, and for the down projection also the GEMV
with the activation folded into its loads (the separate activation kernel is timed with the
other two). About a second, against decode steps that then run at batch <= 16 for as long as
the replica lives. The qkv projection is timed once more against kernels/triton_qkv.py, which
also does rotary and the KV store (three launches in one; not for models with q/k norms).

Last, one decoder layer's chain at one row (everything but attention) is timed as chosen above
against the same chain with its two RMSNorm kernels folded into the matmuls (NormFold): the
o_proj and down GEMVs add the residual stream in their epilogues and leave its rows' sums of
squares, and the qkv kernel and the gate_up GEMV normalise their input rows with those. If the
fold wins, the norms' weights are multiplied into the qkv and gate_up weights once, here, and
those norms keep unit weights for every other path. On an H200 (8B shape) it won by ~1% of a
decode step (kernels/NOTES.md, v14).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import torch

from engine.models.decoder import CausalLM, DecoderLayer
from engine.models.layers import FusedQkv, Linear, NormFold, SkinnyMatmul

log = logging.getLogger(__name__)


def use_skinny_matmuls(model: CausalLM) -> list[str]:
    """Set the GEMV on every projection whose shape it measured faster; returns their groups."""
    weight = model.lm_head.weight
    if weight.device.type != "cuda" or weight.dtype not in (torch.bfloat16, torch.float16):
        return []  # a CPU, or float32 (tl.dot would round it to tf32)
    from kernels.backend import triton_available

    if not triton_available():
        return []
    from kernels.triton_gemv import GEMV_MAX_ROWS, fastest_kernel, gemv

    groups: dict[tuple[str, bool], list[Linear]] = defaultdict(list)
    for layer in model.model.layers:
        groups[("qkv_proj", False)].append(layer.self_attn.qkv_proj)  # type: ignore[union-attr]
        groups[("o_proj", False)].append(layer.self_attn.o_proj)  # type: ignore[union-attr]
        groups[("gate_up_proj", False)].append(layer.mlp.gate_up_proj)  # type: ignore[union-attr]
        groups[("down_proj", True)].append(layer.mlp.down_proj)  # type: ignore[union-attr]  # after the activation
    groups[("lm_head", False)].append(model.lm_head)
    kernels = {
        "gemv": SkinnyMatmul(gemv, GEMV_MAX_ROWS),
        "gemv_fused": SkinnyMatmul(gemv, GEMV_MAX_ROWS, fold_silu=True),
    }
    chosen = []
    with torch.inference_mode():
        for (name, activation), modules in groups.items():
            weights = [m.weight for m in modules[:4]]
            fastest = fastest_kernel(weights, modules[0].bias is not None, activation)
            if fastest in kernels:
                for module in modules:
                    module.skinny = kernels[fastest]
                chosen.append(name if fastest == "gemv" else f"{name} (activation folded in)")
        qkv = _fuse_qkv(model)
        if qkv is not None:
            chosen.append(f"qkv_proj with rotary and KV store ({qkv})")
        if _fold_norms(model, qkv):
            chosen.append("RMSNorms folded into the matmuls")
    log.info("skinny matmuls (<= %d rows) on: %s", GEMV_MAX_ROWS, ", ".join(chosen) or "none")
    return chosen


def _fuse_qkv(model: CausalLM) -> str | None:
    """Give every layer the fused qkv + rotary + KV-store kernel if it measured fastest; the
    name of the variant that did (kernels/triton_qkv.py, qkv_kernel), or None."""
    from kernels.triton_qkv import GEMV_MAX_ROWS, fastest_qkv, qkv_kernel

    config = model.config
    if config.qk_norm or config.head_dim % 64:
        return None  # a norm between projection and rotary; or a head the kernel does not split
    attentions = [layer.self_attn for layer in model.model.layers]
    rotary = model.model.rotary
    weights = [a.qkv_proj.weight for a in attentions[:4]]  # type: ignore[union-attr]
    bias = attentions[0].qkv_proj.bias  # type: ignore[union-attr]
    fastest = fastest_qkv(weights, bias, rotary.cos, rotary.sin, config.num_heads, config.num_kv_heads)  # type: ignore[arg-type]
    if fastest not in ("fused", "fused_fine"):
        return None
    fused = FusedQkv(qkv_kernel(fastest, config.head_dim), GEMV_MAX_ROWS)
    for attention in attentions:
        attention.fused_qkv = fused  # type: ignore[union-attr,assignment]
    return fastest


def _fold_norms(model: CausalLM, qkv: str | None) -> bool:
    """Fold every layer's norms into its matmuls (NormFold) if one layer's chain measured faster.

    `PREFIXGATE_NORM_FOLD=1` (or 0) in the environment folds (or does not) without timing: to
    compare the two in one benchmark, say. `qkv`: the fused qkv variant _fuse_qkv chose, if any
    (the folded path runs it too)."""
    from kernels.matmul_ref import row_stats_buffer
    from kernels.triton_gemv import GEMV_MAX_ROWS, gemv, graph_time_us
    from kernels.triton_qkv import qkv_kernel

    config = model.config
    forced = os.environ.get("PREFIXGATE_NORM_FOLD")
    if config.qk_norm or config.head_dim % 64 or forced == "0":
        return False  # the same limits as the fused qkv kernel, which does the qkv side
    weight = model.lm_head.weight
    stats = row_stats_buffer(config.hidden_size, GEMV_MAX_ROWS, weight.device)
    fold = NormFold(gemv, qkv_kernel(qkv or "fused", config.head_dim), GEMV_MAX_ROWS, stats)
    on = {"device": weight.device, "dtype": weight.dtype}
    hidden = torch.randn(1, config.hidden_size, **on)
    residual = torch.randn(1, config.hidden_size, **on)
    attn_out = torch.randn(1, config.num_heads, config.head_dim, **on)
    positions = torch.tensor([7], device=weight.device)
    slots = torch.tensor([5], device=weight.device)
    cache = torch.zeros((2, 2, 16, config.num_kv_heads, config.head_dim), **on)

    def separate(layer: DecoderLayer) -> None:
        _, stream = layer.attention_inputs(hidden, residual, positions, cache, slots)
        layer.after_attention(attn_out, stream)

    def folded(layer: DecoderLayer) -> None:
        layer.attention_inputs_folded(hidden, fold, positions, cache, slots)
        layer.after_attention_folded(attn_out, hidden, fold)

    layers: list[DecoderLayer] = list(model.model.layers[:4])  # type: ignore[arg-type]
    if forced != "1":
        with torch.cuda.device(weight.device):  # the timing graph's stream on the layers' device
            with_norms, without = graph_time_us(separate, layers), graph_time_us(folded, layers)
        log.info("a layer's matmuls at one row: %.1f us with norm kernels, %.1f folded", with_norms, without)
        if without >= with_norms:
            return False
    fold_norm_weights(model)
    model.model.norm_fold = fold
    return True


def fold_norm_weights(model: CausalLM) -> None:
    """Multiply each layer's two RMSNorm weights into the matmuls they feed (qkv, gate_up), and
    give the norms unit weights: W @ (g * n) == (W * g) @ n, so every path computes the same
    function, and the folded path needs no norm weight at all."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, linear in (
                (layer.input_layernorm, layer.self_attn.qkv_proj),  # type: ignore[union-attr]
                (layer.post_attention_layernorm, layer.mlp.gate_up_proj),  # type: ignore[union-attr]
            ):
                linear.weight.mul_(norm.weight.to(linear.weight.dtype)[None, :])
                norm.weight.fill_(1.0)
