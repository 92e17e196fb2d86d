"""The engine on an NVIDIA GPU: bf16 model against the float32 reference, cache on/off equality."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.weights import load_model
from testkit.engine import mixed_workload, run_all
from testkit.numerics import relative_error
from testkit.paged import PagedDriver

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_model_on_gpu_follows_float32_reference(tiny_model_dir, family: str) -> None:
    folder = tiny_model_dir(family)
    tokens = torch.randint(3, 512, (300,), generator=torch.Generator().manual_seed(11)).tolist()
    reference = PagedDriver(load_model(folder).model, block_size=16).step([(0, tokens)])[0]
    gpu = PagedDriver(load_model(folder, dtype=torch.bfloat16, device="cuda").model, block_size=16)
    whole = gpu.step([(0, tokens[:200])])[0]
    chunks = [gpu.step([(0, tokens[start : start + 37])])[0] for start in range(200, 300, 37)]
    ours = torch.cat([whole, *chunks]).cpu()
    assert torch.isfinite(ours).all()
    assert relative_error(ours, reference) < 2e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_outputs_equal_with_cache_on_and_off_on_gpu(tiny_model_dir, dtype: str) -> None:
    folder: Path = tiny_model_dir("llama")
    prompts, params = mixed_workload()
    outputs = []
    for caching, budget in ((False, 4096), (True, 4096), (True, 16)):
        config = EngineConfig(
            model=str(folder),
            device="cuda",
            dtype=dtype,
            block_size=16,
            num_blocks=512,
            enable_prefix_caching=caching,
            max_batched_tokens=budget,
        )
        loaded = load_model(folder, dtype=config.torch_dtype(torch.device("cuda")), device="cuda")
        outputs.append(run_all(EngineCore(config, loaded), prompts, params))
    if dtype == "float32":
        assert outputs[0] == outputs[1] == outputs[2]
    else:
        # bf16 sums in a different order per batch shape; near-ties may flip, but rarely.
        same = sum(outputs[0][k] == outputs[i][k] for i in (1, 2) for k in outputs[0])
        assert same >= 0.9 * 2 * len(outputs[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_decode_matches_eager(tiny_model_dir, dtype: str) -> None:
    folder: Path = tiny_model_dir("qwen3")
    prompts, params = mixed_workload(seed=5)
    outputs, engines = [], []
    for graphs in (False, True):
        config = EngineConfig(
            model=str(folder), device="cuda", dtype=dtype, num_blocks=512, max_num_seqs=24, cuda_graphs=graphs
        )
        loaded = load_model(folder, dtype=config.torch_dtype(torch.device("cuda")), device="cuda")
        engine = EngineCore(config, loaded)
        outputs.append(run_all(engine, prompts, params))
        engines.append(engine)
    assert engines[0].runner.graphs is None
    assert engines[1].runner.graphs is not None and engines[1].runner.graphs.replays > 0
    if dtype == "float32":
        assert outputs[0] == outputs[1]
    else:
        same = sum(outputs[0][k] == outputs[1][k] for k in outputs[0])
        assert same >= 0.9 * len(outputs[0])


def test_one_sequence_chunks_replay_graphs_and_match_eager(tiny_model_dir) -> None:
    """Agent-style turns: one request at a time on a growing cached prefix, graphs on and off."""
    folder: Path = tiny_model_dir("llama")
    prompts, params = mixed_workload(seed=6)
    outputs = []
    for graphs in (False, True):
        config = EngineConfig(
            model=str(folder), device="cuda", dtype="float32", num_blocks=512, cuda_graphs=graphs
        )
        engine = EngineCore(config, load_model(folder, device="cuda"))
        outputs.append(
            [run_all(engine, [p], [s])["r0"] for p, s in zip(prompts[:12], params[:12], strict=True)]
        )
        if graphs:
            assert engine.runner.graphs is not None and engine.runner.graphs.prefill_replays > 0
    assert outputs[0] == outputs[1]
