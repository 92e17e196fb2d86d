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


def run_random_with_aborts(core: EngineCore, count: int, check_every_step: bool = False) -> None:
    """`count` random requests on shared prefixes, arriving a few per step, some aborted while
    they run, until all are done; then every block is free or cached and nothing is locked."""
    rng = random.Random(3)
    prefixes = [[rng.randrange(3, 512) for _ in range(rng.randrange(4, 60))] for _ in range(10)]
    live: list[str] = []
    added = 0
    while added < count or core.has_unfinished:
        for _ in range(rng.randrange(0, 12)):
            if added >= count:
                break
            prompt = rng.choice(prefixes) + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))]
            params = SamplingParams(
                temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randrange(1, 8), seed=rng.randrange(100)
            )
            live.append(core.add_request(prompt, params, request_id=f"q{added}").request_id)
            added += 1
        for _ in range(rng.randrange(0, 3)):
            if live:
                core.abort(live.pop(rng.randrange(len(live))))
        core.step()
        if check_every_step:
            core.check_integrity()
    core.check_integrity()
    assert core.tree is not None
    assert core.pool.num_free + core.tree.num_cached_blocks == core.num_blocks
    assert core.tree.num_evictable_blocks == core.tree.num_cached_blocks  # no lock left
    assert core.tree.root.lock_ref == 0
    assert not core.scheduler.running and not core.scheduler.waiting
