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
decode step (kernels/NOTES.md, v14). The folded chain is timed once more with each layer's MLP
as one fused call (kernels/triton_mlp.py), which then runs up to the most rows at which it
stays faster than the two GEMVs; on an H200 it won for a Qwen2.5-1.5B shape, where the down
GEMV has too few columns to fill the GPU (kernels/NOTES.md, v17).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict
from collections.abc import Callable

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
        folded = _fold_norms(model, qkv)
        if folded is not None:
            chosen.append(folded)
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


# The batch sizes at which the folded layer is timed against the one with norm kernels: each
# path runs up to the largest row count through which it kept winning.
ROW_COUNTS = (1, 2, 4, 8, 16)


def _fold_norms(model: CausalLM, qkv: str | None) -> str | None:
    """Fold every layer's norms into its matmuls (NormFold) for batches of as many rows as one
    layer's chain measured faster that way, and run its MLP as one fused call
    (kernels/triton_mlp.py) for as many rows as that measured faster still; what was chosen,
    or None.

    `PREFIXGATE_NORM_FOLD=1` (or 0) in the environment folds up to 16 rows (or not at all)
    without timing, and `PREFIXGATE_FUSED_MLP=1` (or 0) likewise fuses the MLP wherever folded
    (or nowhere): to compare them in one benchmark, say. `qkv`: the fused qkv variant
    _fuse_qkv chose, if any (the folded path runs it too)."""
    from kernels.matmul_ref import row_stats_buffer
    from kernels.triton_gemv import GEMV_MAX_ROWS, gemv
    from kernels.triton_mlp import fused_mlp
    from kernels.triton_qkv import qkv_kernel

    config = model.config
    forced = os.environ.get("PREFIXGATE_NORM_FOLD")
    forced_mlp = os.environ.get("PREFIXGATE_FUSED_MLP")
    if config.qk_norm or config.head_dim % 64 or forced == "0":
        return None  # the same limits as the fused qkv kernel, which does the qkv side
    weight = model.lm_head.weight
    stats = row_stats_buffer(config.hidden_size, GEMV_MAX_ROWS, weight.device)
    fold = NormFold(gemv, qkv_kernel(qkv or "fused", config.head_dim), GEMV_MAX_ROWS, stats)
    fused = None
    if not config.mlp_bias and forced_mlp != "0":
        fused = dataclasses.replace(fold, mlp=fused_mlp, mlp_rows=GEMV_MAX_ROWS)
    fold_rows, mlp_rows = GEMV_MAX_ROWS, GEMV_MAX_ROWS if fused is not None else 0
    if forced != "1" or (fused is not None and forced_mlp != "1"):
        folds = {"folded": fold} if fused is None else {"folded": fold, "fused MLP": fused}
        timer = _LayerTimer(model)
        with torch.cuda.device(weight.device):  # the timing graphs' streams on the layers' device
            fold_rows, mlp_rows = rows_won(
                lambda rows, names, norms: timer.times(rows, {n: folds[n] for n in names}, norms),
                fused is not None,
                time_norms=forced != "1",
                time_mlp=forced_mlp != "1",
            )
    if not fold_rows:
        return None
    fold_norm_weights(model)
    mlp = fused_mlp if mlp_rows else None
    model.model.norm_fold = dataclasses.replace(fold, max_rows=fold_rows, mlp=mlp, mlp_rows=mlp_rows)
    what = f"RMSNorms folded into the matmuls up to {fold_rows} rows"
    return what + (f", the MLP fused up to {mlp_rows}" if mlp_rows else "")


class _LayerTimer:
    """One decoder layer's work but attention, at a given batch size, each way it can run."""

    def __init__(self, model: CausalLM) -> None:
        self.config = model.config
        self.layers: list[DecoderLayer] = list(model.model.layers[:4])  # type: ignore[arg-type]
        weight = model.lm_head.weight
        self.on = {"device": weight.device, "dtype": weight.dtype}
        config = self.config
        self.cache = torch.zeros((2, 2, 16, config.num_kv_heads, config.head_dim), **self.on)

    def times(self, rows: int, folds: dict[str, NormFold], with_norms: bool) -> dict[str, float]:
        """us per layer at `rows` rows: with norm kernels ("norms") and with each fold."""
        from kernels.triton_gemv import graph_time_us

        config, on, cache = self.config, self.on, self.cache
        hidden = torch.randn(rows, config.hidden_size, **on)
        residual = torch.randn(rows, config.hidden_size, **on)
        attn_out = torch.randn(rows, config.num_heads, config.head_dim, **on)
        positions = torch.arange(7, 7 + rows, device=on["device"])
        slots = torch.arange(rows, device=on["device"])  # the scratch cache has 32 slots

        def separate(layer: DecoderLayer) -> None:
            _, stream = layer.attention_inputs(hidden, residual, positions, cache, slots)
            layer.after_attention(attn_out, stream)

        def folded(fold: NormFold) -> Callable[[DecoderLayer], None]:
            def run(layer: DecoderLayer) -> None:
                layer.attention_inputs_folded(hidden, fold, positions, cache, slots)
                layer.after_attention_folded(attn_out, hidden, fold)

            return run

        took = {name: graph_time_us(folded(fold), self.layers) for name, fold in folds.items()}
        if with_norms:
            took["norms"] = graph_time_us(separate, self.layers)
        log.info("a layer at %d rows, us: %s", rows, ", ".join(f"{k} {v:.1f}" for k, v in took.items()))
        return took


def rows_won(
    time_layer: Callable[[int, list[str], bool], dict[str, float]],
    has_fused: bool,
    time_norms: bool = True,
    time_mlp: bool = True,
) -> tuple[int, int]:
    """(folded rows, fused-MLP rows): up to which of ROW_COUNTS the fold (with the fused MLP
    where that won) beat the layer with norm kernels, and the fused MLP the two GEMVs, each
    counting from one row and stopping at its first loss. `time_layer(rows, names, norms)`
    gives a layer's us at `rows` rows for each of `names` ("folded", "fused MLP") and, if
    `norms`, for the layer with norm kernels ("norms"). With `time_norms` (or `time_mlp`) off,
    the fold (or the fused MLP) wins unmeasured."""
    fold_rows = mlp_rows = 0
    for rows in ROW_COUNTS:
        mlp_winning = has_fused and mlp_rows == fold_rows
        names = [] if mlp_winning and not time_mlp else ["folded"]
        if mlp_winning:
            names.append("fused MLP")
        took = time_layer(rows, names, time_norms)
        if time_norms and min(took[name] for name in names) >= took["norms"]:
            break
        fold_rows = rows
        if mlp_winning and took["fused MLP"] < took.get("folded", float("inf")):
            mlp_rows = rows
    return fold_rows, mlp_rows


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
