"""Piecewise steps (graph pieces between eager attention calls) give the eager forward's results.

The pieces here run as plain calls (`capture_graphs=False`) on the CPU: what is checked is the
plumbing the GPU's graphs replay (static buffers, padding rows, the scratch slot, attention
into the static output) against the model's own forward. tests/engine/test_gpu_piecewise.py
checks the captured graphs on a GPU.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.batch import SequenceChunk, build_forward_batch
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.kv_cache import allocate_kv_caches
from engine.piecewise_graphs import PIECEWISE_BUCKETS, PiecewiseGraphs, piecewise_buckets
from engine.weights import load_model
from testkit.engine import mixed_workload, run_all


def test_buckets_cover_the_step_budget() -> None:
    assert piecewise_buckets(2048)[-1] == 2048
    assert piecewise_buckets(100)[-1] == 128 and piecewise_buckets(100)[0] == PIECEWISE_BUCKETS[0]
    assert piecewise_buckets(8192) == PIECEWISE_BUCKETS  # larger steps run eagerly
    assert piecewise_buckets(1) == (PIECEWISE_BUCKETS[0],)


def _with_piecewise(core: EngineCore, max_tokens: int) -> PiecewiseGraphs:
    """Give the core's runner plain-call pieces, over a pool one block larger for the padding."""
    runner = core.runner
    caches = allocate_kv_caches(
        core.model_config, core.num_blocks + 1, core.block_size, core.dtype, core.device
    )
    # A poisoned scratch block: a real token's attention that read it would turn to NaN.
    for cache in caches:
        cache[:, core.num_blocks].fill_(float("nan"))
    runner.kv_caches = caches
    runner.piecewise = PiecewiseGraphs(
        runner.model, caches, max_tokens, scratch_slot=core.num_blocks * core.block_size, capture_graphs=False
    )
    runner.piecewise.capture()
    return runner.piecewise


@pytest.mark.parametrize("budget", [512, 37], ids=["whole-prompts", "chunked"])
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_engine_greedy_outputs_equal_eager(tiny_model_dir, budget: int, overlap: bool) -> None:
    folder: Path = tiny_model_dir("llama")
    prompts, params = mixed_workload()

    def core() -> EngineCore:
        config = EngineConfig(
            model=str(folder), device="cpu", block_size=4, num_blocks=2048,
            max_batched_tokens=budget, overlap_scheduling=overlap,
        )  # fmt: skip
        return EngineCore(config, load_model(folder))

    expected = run_all(core(), prompts, params)
    piecewise_core = core()
    piecewise = _with_piecewise(piecewise_core, budget)
    assert run_all(piecewise_core, prompts, params) == expected
    assert piecewise.runs > 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hidden_states_match_the_forward_on_mixed_batches(tiny_model_dir, family: str) -> None:
    """Prompts, chunks on cached context and one-token decodes in one batch, at counts that pad."""
    model = load_model(tiny_model_dir(family)).model
    config = model.config
    block_size, num_blocks = 4, 256
    rng = random.Random(1)
    eager_caches = allocate_kv_caches(config, num_blocks, block_size, torch.float32, torch.device("cpu"))
    piece_caches = allocate_kv_caches(config, num_blocks + 1, block_size, torch.float32, torch.device("cpu"))
    piecewise = PiecewiseGraphs(
        model, piece_caches, 96, scratch_slot=num_blocks * block_size, capture_graphs=False
    )
    piecewise.capture()
    lengths = [0] * 6  # tokens each sequence has cached so far
    blocks = [list(range(i * 40, (i + 1) * 40)) for i in range(6)]
    with torch.inference_mode():
        for _step in range(6):
            chunks = []
            for seq in rng.sample(range(6), rng.randrange(1, 7)):
                count = 1 if lengths[seq] and rng.random() < 0.5 else rng.randrange(1, 15)
                tokens = [rng.randrange(3, config.vocab_size) for _ in range(count)]
                chunks.append(SequenceChunk(tokens, lengths[seq], blocks[seq]))
                lengths[seq] += count
            batch = build_forward_batch(chunks, block_size, torch.device("cpu"))
            eager = model(batch.input_ids, batch.positions, eager_caches, batch.metadata)
            pieces = piecewise.run(batch)
            assert pieces.shape == eager.shape
            torch.testing.assert_close(pieces, eager, rtol=1e-5, atol=1e-5)
    # The padding rows never wrote into the pool's blocks: every real token's K/V is as stored eagerly.
    slots = [
        blocks[seq][pos // block_size] * block_size + pos % block_size
        for seq in range(6)
        for pos in range(lengths[seq])
    ]
    for eager_cache, piece_cache in zip(eager_caches, piece_caches, strict=True):
        eager_slots = eager_cache.flatten(1, 2)[:, slots]
        torch.testing.assert_close(piece_cache.flatten(1, 2)[:, slots], eager_slots, rtol=1e-5, atol=1e-5)
