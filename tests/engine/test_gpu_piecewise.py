"""Captured piecewise graphs (engine/piecewise_graphs.py) give the eager forward's outputs on a GPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.batch import SequenceChunk, build_forward_batch
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.weights import load_model
from testkit.engine import mixed_workload, run_all

pytestmark = pytest.mark.gpu


def _engine(folder: Path, dtype: str, graphs: bool, **options: int) -> EngineCore:
    config = EngineConfig(model=str(folder), device="cuda", dtype=dtype, cuda_graphs=graphs, **options)  # type: ignore[arg-type]
    return EngineCore(
        config, load_model(folder, dtype=config.torch_dtype(torch.device("cuda")), device="cuda")
    )


@pytest.mark.parametrize("budget", [2048, 100], ids=["whole-prompts", "chunked"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prompts_together_run_piecewise_and_match_eager(tiny_model_dir, family: str, budget: int) -> None:
    """Fifty prompts at once: multi-sequence prefill steps, then decodes beside chunks."""
    folder: Path = tiny_model_dir(family)
    prompts, params = mixed_workload(seed=11)
    outputs, runners = [], []
    for graphs in (False, True):
        engine = _engine(
            folder, "float32", graphs, num_blocks=1024, max_num_seqs=24, max_batched_tokens=budget
        )
        outputs.append(run_all(engine, prompts, params))
        runners.append(engine.runner)
    assert runners[0].piecewise is None
    assert runners[1].piecewise is not None and runners[1].piecewise.runs >= 3
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_hidden_states_match_the_eager_forward(tiny_model_dir, family: str) -> None:
    """The same batches through the graphs and the eager forward, on twin caches."""
    folder: Path = tiny_model_dir(family)
    engine = _engine(folder, "bfloat16", True, num_blocks=512)
    runner = engine.runner
    piecewise = runner.piecewise
    assert piecewise is not None
    model, block_size = runner.model, engine.block_size
    eager_caches = [torch.empty_like(c) for c in runner.kv_caches]
    rng = random.Random(4)
    lengths = [0] * 8
    blocks = [list(range(i * 60, (i + 1) * 60)) for i in range(8)]
    with torch.inference_mode():
        for _ in range(8):
            chunks = []
            for seq in rng.sample(range(8), rng.randrange(2, 9)):
                count = 1 if lengths[seq] and rng.random() < 0.5 else rng.randrange(2, 90)
                tokens = [rng.randrange(3, 512) for _ in range(count)]
                chunks.append(SequenceChunk(tokens, lengths[seq], blocks[seq]))
                lengths[seq] += count
            batch = build_forward_batch(chunks, block_size, engine.device)
            assert piecewise.supports(batch)
            eager = model(batch.input_ids, batch.positions, eager_caches, batch.metadata)
            pieces = piecewise.run(batch).clone()
            # Same kernels on the same rows; matmuls over a padded row count may sum in another order.
            torch.testing.assert_close(pieces.float(), eager.float(), rtol=2e-2, atol=2e-2)
