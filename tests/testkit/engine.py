"""Workloads and a drive loop for engine-level tests, shared by the CPU and GPU suites."""

from __future__ import annotations

import random

from engine.core import EngineCore
from engine.sampling_params import SamplingParams


def run_all(core: EngineCore, prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, list[int]]:
    requests = [
        core.add_request(p, s, request_id=f"r{i}")
        for i, (p, s) in enumerate(zip(prompts, params, strict=True))
    ]
    steps = 0
    while core.has_unfinished:
        core.step()
        steps += 1
        if steps % 7 == 0:
            core.check_integrity()
    core.check_integrity()
    assert core.pool.num_free + (core.tree.num_cached_blocks if core.tree else 0) == core.num_blocks
    return {r.request_id: r.output_token_ids for r in requests}


def mixed_workload(seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """50 requests: shared system prefixes, multi-turn style extensions, n > 1 style repeats."""
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 512) for _ in range(rng.randrange(20, 70))] for _ in range(4)]
    prompts: list[list[int]] = []
    while len(prompts) < 50:
        kind = rng.random()
        if kind < 0.5:
            prompt = rng.choice(systems) + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 30))]
        elif kind < 0.75 and prompts:
            # A later turn of an earlier conversation: its whole prompt plus new tokens.
            prompt = rng.choice(prompts) + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 20))]
        elif prompts:
            prompt = list(rng.choice(prompts))  # the same prompt again, as n > 1 would send
        else:
            continue
        prompts.append(prompt[:200])
    params = [
        SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 12), ignore_eos=True) for _ in prompts
    ]
    return prompts, params
