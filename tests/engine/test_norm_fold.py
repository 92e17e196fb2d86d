"""The decoder with its RMSNorms folded into the matmuls (engine/models/layers.py NormFold,
DecoderLayer.forward_folded, engine/skinny.py fold_norm_weights) computes what it computed
before, on both sides of the row limit. The Triton kernels are tested against the same torch
references on a GPU (tests/kernels/test_triton_gemv.py, test_triton_qkv.py); here those
references stand in for them, so the model's folded path runs in CI, on the CPU."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from engine.models.layers import NormFold
from engine.skinny import fold_norm_weights, rows_won
from engine.weights import load_model
from kernels.matmul_ref import fused_mlp_ref, qkv_rotary_store_ref, row_stats_buffer, skinny_matmul_ref
from testkit.paged import PagedDriver


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biases on q, k and v
def test_folded_layers_compute_the_same_logits(tiny_model_dir, family: str) -> None:
    model = load_model(tiny_model_dir(family)).model
    tokens = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    work = [
        [(0, tokens[:30]), (1, tokens[30:35])],  # 35 rows: over the limit, the norms run
        [(0, [7]), (1, [9])],  # two decode rows: folded
        [(0, tokens[35:38]), (1, [11])],  # four rows: folded, a chunk on a cached prefix
    ]
    plain = PagedDriver(model)
    reference = [[t.clone() for t in plain.step(step)] for step in work]
    calls: Counter[str] = Counter()

    def matmul(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["norm" if kwargs.get("norm_stats") is not None else "residual"] += 1
        assert (kwargs.get("residual") is not None) == (kwargs.get("row_stats") is not None)
        return skinny_matmul_ref(*args, **kwargs)

    def qkv(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["qkv normalising" if kwargs.get("norm_stats") is not None else "qkv"] += 1
        return qkv_rotary_store_ref(*args, **kwargs)

    norm_weight = model.model.layers[0].input_layernorm.weight.clone()
    fold_norm_weights(model)
    assert not torch.equal(norm_weight, torch.ones_like(norm_weight))
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones_like(norm_weight))
    stats = row_stats_buffer(model.config.hidden_size, 8, "cpu")
    model.model.norm_fold = NormFold(matmul, qkv, max_rows=8, stats=stats)
    folded = PagedDriver(model)
    layers = len(model.model.layers)
    for step, want in zip(work, reference, strict=True):
        before = sum(calls.values())
        got = folded.step(step)
        rows = sum(len(tokens) for _, tokens in step)
        assert sum(calls.values()) - before == (4 * layers if rows <= 8 else 0)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # Two folded steps: the first layer's qkv after a norm kernel (the embeddings have no row
    # statistics), the others' normalising their rows themselves.
    assert calls == {
        "qkv": 2,
        "qkv normalising": 2 * (layers - 1),
        "norm": 2 * layers,
        "residual": 4 * layers,
    }


def test_a_fused_mlp_takes_the_batches_up_to_its_rows(tiny_model_dir) -> None:
    # NormFold.mlp (kernels/triton_mlp.py on a GPU; its torch contract here) replaces the two
    # MLP matmuls of batches of at most mlp_rows rows, and computes the same logits.
    model = load_model(tiny_model_dir("llama")).model
    tokens = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    work = [
        [(0, tokens[:30]), (1, tokens[30:35])],  # 35 rows: the norm kernels
        [(0, [7]), (1, [9])],  # two rows: the fused MLP
        [(0, tokens[35:38]), (1, [11])],  # four rows: folded, the two matmuls
    ]
    plain = PagedDriver(model)
    reference = [[t.clone() for t in plain.step(step)] for step in work]
    calls: Counter[str] = Counter()

    def matmul(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["matmul"] += 1
        return skinny_matmul_ref(*args, **kwargs)

    def mlp(*args: Any) -> torch.Tensor:
        calls["mlp"] += 1
        return fused_mlp_ref(*args)

    fold_norm_weights(model)
    stats = row_stats_buffer(model.config.hidden_size, 8, "cpu")
    model.model.norm_fold = NormFold(matmul, qkv_rotary_store_ref, 8, stats, mlp=mlp, mlp_rows=2)
    folded = PagedDriver(model)
    layers = len(model.model.layers)
    expected = [{}, {"matmul": layers, "mlp": layers}, {"matmul": 3 * layers}]
    for step, want, counts in zip(work, reference, expected, strict=True):
        calls.clear()
        got = folded.step(step)
        assert calls == counts
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_row_statistics_carry_a_norm_from_one_matmul_to_the_next() -> None:
    x = torch.randn(3, 70)
    w_first, w_next = torch.randn(100, 70), torch.randn(5, 100)
    residual = torch.randn(3, 100)
    stats = row_stats_buffer(100, 4, "cpu")
    stats.fill_(7.0)  # stale values: the first kernel overwrites what the next one reads
    y = skinny_matmul_ref(x, w_first, residual=residual, row_stats=stats)
    torch.testing.assert_close(y, x @ w_first.T + residual)
    assert stats.shape == (4, 4)  # cdiv(100, 32) partials of each of up to 4 rows
    torch.testing.assert_close(stats[:, :3].sum(0), y.pow(2).sum(-1))
    normed = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(skinny_matmul_ref(y, w_next, norm_stats=stats), normed @ w_next.T)


def scripted(times: dict[int, dict[str, float]], asked: list[tuple[int, tuple[str, ...], bool]]):
    """A layer timer answering from `times` (us by rows, then by path), noting each question."""

    def time_layer(rows: int, names: list[str], norms: bool) -> dict[str, float]:
        asked.append((rows, tuple(names), norms))
        return {name: times[rows][name] for name in (*names, *(["norms"] if norms else []))}

    return time_layer


def test_the_fold_and_the_fused_mlp_run_up_to_their_first_loss() -> None:
    # engine/skinny.py rows_won: each path runs from one row up to the last row count through
    # which it kept winning; the fused MLP only where the fold runs.
    times = {
        1: {"norms": 100, "folded": 98, "fused MLP": 95},
        2: {"norms": 101, "folded": 99, "fused MLP": 97},
        4: {"norms": 102, "folded": 100, "fused MLP": 103},  # the fused MLP loses here ...
        8: {"norms": 103, "folded": 102, "fused MLP": 90},  # ... and is not asked again
        16: {"norms": 104, "folded": 105, "fused MLP": 90},
    }
    asked: list[tuple[int, tuple[str, ...], bool]] = []
    assert rows_won(scripted(times, asked), has_fused=True) == (8, 2)
    assert asked == [
        (1, ("folded", "fused MLP"), True),
        (2, ("folded", "fused MLP"), True),
        (4, ("folded", "fused MLP"), True),
        (8, ("folded",), True),
        (16, ("folded",), True),
    ]
    # A fold that wins only with the fused MLP still folds; one that loses at one row never.
    times[1] = {"norms": 96, "folded": 98, "fused MLP": 95}
    assert rows_won(scripted(times, []), has_fused=True) == (8, 2)
    assert rows_won(scripted(times, []), has_fused=False) == (0, 0)
    # Forced on (PREFIXGATE_FUSED_MLP=1): the fused MLP is timed alone, against the norms
    # (it loses to them at 4 rows, where the fold then stops too).
    asked.clear()
    assert rows_won(scripted(times, asked), has_fused=True, time_mlp=False) == (2, 2)
    assert [names for _, names, _ in asked] == [("fused MLP",)] * 3
    # PREFIXGATE_NORM_FOLD=1: folded at every row count, the fused MLP where it won.
    assert rows_won(scripted(times, []), has_fused=True, time_norms=False) == (16, 2)
