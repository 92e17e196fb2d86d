"""A random-weight engine of a real model's shape on a GPU, and what its benchmarks measure
it against: the copy bandwidth and the weight bytes a decode step reads (the roofline).

bench/offline.py's scenarios, the bench/profile_*.py breakdowns and the kernels/bench_*.py
kernel timings share these.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.shapes import hf_config
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.model_config import ModelConfig
from engine.sampling_params import SamplingParams
from engine.weights import LoadedModel, build_model, randomize_weights


def copy_bandwidth(device: torch.device, gib: float = 2.0, repeat: int = 20) -> float:
    """Bytes read plus bytes written per second for a large device-to-device copy."""
    count = int(gib * (1 << 30)) // 2
    src = torch.randn(count, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000 / repeat
    del src, dst
    return 2 * count * 2 / seconds


def weight_bytes_per_step(config: ModelConfig, element_size: int = 2) -> int:
    """Every weight a decode step reads: all layers, the final norm and the LM head (one embedding row)."""
    params = config.num_parameters()
    embedding = config.vocab_size * config.hidden_size
    if not config.tie_word_embeddings:
        params -= embedding  # the input embedding is read one row per token, not whole
    return params * element_size


def build_engine(
    shape: str, device: torch.device, overrides: dict[str, Any] | None = None, **options: Any
) -> EngineCore:
    """A random-weight engine of `shape` (`overrides`: config fields, e.g. fewer layers)."""
    config = ModelConfig.from_hf(hf_config(shape, **(overrides or {})))
    model = build_model(config, torch.bfloat16, device)
    randomize_weights(model, seed=0)
    engine_config = EngineConfig(model=shape, device=str(device), dtype="bfloat16", **options)
    return EngineCore(engine_config, LoadedModel(model=model, config=config, path=Path(shape)))


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab - 10) for _ in range(length)]


def run_to_completion(engine: EngineCore, on_step: Callable[[], None] | None = None) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
        if on_step is not None:
            on_step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def warm_up(engine: EngineCore) -> None:
    """Mixed prefill/decode batches of many shapes, so Triton compiles its kernel variants
    before any timed region (a compile inside one costs seconds)."""
    rng = random.Random(9)
    vocab = engine.model_config.vocab_size
    for count, length in ((1, 40), (8, 300), (64, 200), (4, 3000), (32, 2500)):
        for _ in range(count):
            engine.add_request(
                random_prompt(rng, length, vocab), SamplingParams(max_tokens=4, ignore_eos=True)
            )
        run_to_completion(engine)
    if engine.tree is not None:
        engine.tree.clear()
