"""The decoder's RMSNorms folded into the Triton matmuls (NormFold) on an NVIDIA GPU: the same
logits as the model with its norm kernels, and an engine whose graphs run it."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.models.decoder import CausalLM
from engine.models.layers import NormFold
from engine.skinny import fold_norm_weights
from engine.weights import load_model
from testkit.engine import mixed_workload, run_all
from testkit.numerics import relative_error
from testkit.paged import PagedDriver

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")


def fold(model: CausalLM, mlp_rows: int = 0) -> None:
    """Fold the norms; with `mlp_rows`, the MLP of batches up to that many rows as one call."""
    from kernels.matmul_ref import row_stats_buffer
    from kernels.triton_gemv import GEMV_MAX_ROWS, gemv
    from kernels.triton_mlp import fused_mlp
    from kernels.triton_qkv import qkv_rotary_store

    fold_norm_weights(model)
    stats = row_stats_buffer(model.config.hidden_size, GEMV_MAX_ROWS, model.lm_head.weight.device)
    model.model.norm_fold = NormFold(
        gemv, qkv_rotary_store, GEMV_MAX_ROWS, stats, mlp=fused_mlp if mlp_rows else None, mlp_rows=mlp_rows
    )


@pytest.mark.parametrize("mlp_rows", [0, 16])
def test_folded_model_follows_the_float32_reference(tiny_model_dir, mlp_rows: int) -> None:
    folder = tiny_model_dir("llama-d64")
    tokens = torch.randint(3, 512, (60,), generator=torch.Generator().manual_seed(12)).tolist()
    steps = [[(0, tokens[:40])], [(0, tokens[40:41])], [(0, tokens[41:50])], [(0, tokens[50:51])]]
    reference = PagedDriver(load_model(folder).model, block_size=16)
    want = torch.cat([reference.step(step)[0] for step in steps])
    errors = {}
    for folded in (False, True):
        model = load_model(folder, dtype=torch.bfloat16, device="cuda").model
        if folded:
            fold(model, mlp_rows)
        driver = PagedDriver(model, block_size=16)
        got = torch.cat([driver.step(step)[0] for step in steps]).cpu()
        assert torch.isfinite(got).all()
        # The 40-row prompt runs the norm kernels (unit weights over the folded weights when
        # folded), the later rows the folded path: both follow the reference.
        errors[folded] = (relative_error(got[:40], want[:40]), relative_error(got[40:], want[40:]))
    # bf16 alone is ~2% off float32 on this model; the fold must not add to it measurably.
    for plain, folded in zip(errors[False], errors[True], strict=True):
        assert plain < 4e-2 and folded < 1.2 * plain, errors


@pytest.mark.parametrize("mlp_rows", [0, 4])
def test_engine_with_the_fold_in_its_graphs_matches_the_engine_without(tiny_model_dir, mlp_rows: int) -> None:
    folder = tiny_model_dir("llama-d64")
    prompts, params = mixed_workload(seed=7)
    outputs = []
    for folded in (False, True):
        config = EngineConfig(
            model=str(folder), device="cuda", dtype="bfloat16", num_blocks=512, max_num_seqs=24,
            skinny_matmuls=False,  # the fold is set here, not measured
        )  # fmt: skip
        loaded = load_model(folder, dtype=torch.bfloat16, device="cuda")
        if folded:
            fold(loaded.model, mlp_rows)
        engine = EngineCore(config, loaded)
        outputs.append(run_all(engine, prompts, params))
        assert engine.runner.graphs is not None and engine.runner.graphs.replays > 0
    # bf16 sums in another order on the two paths; near-ties may flip, but rarely.
    same = sum(outputs[0][k] == outputs[1][k] for k in outputs[0])
    assert same >= 0.9 * len(outputs[0])


def test_the_chooser_folds_only_what_it_can(tiny_model_dir) -> None:
    from engine.skinny import ROW_COUNTS, use_skinny_matmuls

    for family, can in (("llama-d64", True), ("qwen3", False), ("llama", False)):
        model = load_model(tiny_model_dir(family), dtype=torch.bfloat16, device="cuda").model
        chosen = use_skinny_matmuls(model)
        folded = any(what.startswith("RMSNorms folded into the matmuls") for what in chosen)
        assert folded == (model.model.norm_fold is not None)
        assert can or not folded  # q/k norms, or heads the fused qkv kernel does not take
        norm = model.model.layers[0].input_layernorm.weight
        assert torch.equal(norm, torch.ones_like(norm)) == folded
        fold = model.model.norm_fold
        fused_mlp = fold is not None and fold.mlp is not None
        assert fused_mlp == any("the MLP fused" in what for what in chosen)
        assert fold is None or fold.max_rows in ROW_COUNTS
        assert not fused_mlp or 1 <= fold.mlp_rows <= fold.max_rows
