"""Overlapped steps on an NVIDIA GPU: same greedy outputs, and no host sync while launching."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.sampling_params import SamplingParams
from engine.weights import load_model
from testkit.engine import mixed_workload, run_all

pytestmark = pytest.mark.gpu


def _engine(folder: Path, overlap: bool, **options: Any) -> EngineCore:
    config = EngineConfig(
        model=str(folder), device="cuda", dtype="float32", overlap_scheduling=overlap, **options
    )
    return EngineCore(config, load_model(folder, dtype=torch.float32, device="cuda"))


@pytest.mark.parametrize("graphs", [True, False])
def test_greedy_outputs_equal_with_overlap_on_and_off(tiny_model_dir, graphs: bool) -> None:
    folder: Path = tiny_model_dir("llama")
    prompts, params = mixed_workload(seed=2)
    outputs = []
    for overlap in (False, True):
        engine = _engine(folder, overlap, num_blocks=512, max_num_seqs=24, cuda_graphs=graphs)
        outputs.append(run_all(engine, prompts, params))
        assert (engine.runner.future_rows > 0) == overlap
    assert outputs[0] == outputs[1]


@contextlib.contextmanager
def _syncs_are_errors() -> Iterator[None]:
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _no_sync(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _syncs_are_errors():
            return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("graphs", [True, False])
def test_planning_and_launching_a_step_never_waits_for_the_gpu(tiny_model_dir, graphs: bool) -> None:
    """Scheduling, building the inputs, the forward and the sampling are only queued: any call
    that synchronises with the device (a blocking copy, .item(), .tolist()) raises here."""
    engine = _engine(tiny_model_dir("llama"), True, num_blocks=512, max_num_seqs=16, cuda_graphs=graphs)
    rng = random.Random(8)
    for i in range(12):
        prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(10, 90))]
        params = SamplingParams(temperature=0.0 if i % 2 else 0.8, max_tokens=24, seed=i, ignore_eos=True)
        engine.add_request(prompt, params)
    for _ in range(3):  # first steps: caches and pinned buffers get allocated
        engine.step()
    engine.scheduler.schedule = _no_sync(engine.scheduler.schedule)  # type: ignore[method-assign]
    engine.runner.launch = _no_sync(engine.runner.launch)  # type: ignore[method-assign]
    launches = engine.runner.num_launches
    while engine.has_unfinished:
        engine.step()
    assert engine.runner.num_launches - launches >= 20
    engine.check_integrity()
