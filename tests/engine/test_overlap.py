"""Overlapped steps (plan step N+1 while step N runs) change no output and leak no block.

On a CPU nothing actually runs concurrently, but the bookkeeping is the GPU's: a decode row
reads its input token from the device's future-token table, the host reads each step's
values one call later, and requests that stopped meanwhile waste a row of one step.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from engine.weights import load_model
from testkit.engine import mixed_workload, run_all, run_random_with_aborts


def make_core(folder: Path, overlap: bool, **options: object) -> EngineCore:
    config = EngineConfig(
        model=str(folder),
        device="cpu",
        block_size=options.pop("block_size", 4),  # type: ignore[arg-type]
        overlap_scheduling=overlap,
        **options,  # type: ignore[arg-type]
    )
    return EngineCore(config, load_model(folder))


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.mark.parametrize(
    "options",
    [
        {"max_batched_tokens": 512},
        {"max_batched_tokens": 16},
        {"max_batched_tokens": 1, "max_num_seqs": 8},
        {"enable_prefix_caching": False, "max_batched_tokens": 16},
        {"max_batched_tokens": 64, "num_blocks": 70},  # forces preemption
        {"max_batched_tokens": 100, "max_num_seqs": 3, "queue_policy": "lpm"},
    ],
    ids=["cache-512", "cache-16", "cache-1", "nocache-16", "preempt", "lpm"],
)
def test_greedy_outputs_match_the_steps_without_overlap(tiny_llama: Path, options: dict[str, object]) -> None:
    prompts, params = mixed_workload()
    options = {"num_blocks": 2048, **options}
    expected = run_all(make_core(tiny_llama, False, **options), prompts, params)
    core = make_core(tiny_llama, True, **options)
    assert run_all(core, prompts, params) == expected
    assert core.runner.future_rows > 0  # decode rows did take their input from the device


def test_stops_found_a_step_late_drop_the_extra_token(tiny_llama: Path) -> None:
    """A stop token is seen one call after the step that sampled it, when the next step already
    ran a row for the request: that row's token must not reach the output."""
    free = run_all(
        make_core(tiny_llama, False, num_blocks=256),
        [list(range(3, 30))],
        [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)],
    )["r0"]
    stop_at = free[4]
    rng = random.Random(5)
    prompts = [list(range(3, 30))] + [[rng.randrange(3, 512) for _ in range(20)] for _ in range(5)]
    params = [SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_at,))] + [
        SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 15), ignore_eos=True) for _ in range(5)
    ]
    results = {}
    for overlap in (False, True):
        core = make_core(tiny_llama, overlap, num_blocks=256)
        requests = [
            core.add_request(p, s, request_id=f"r{i}")
            for i, (p, s) in enumerate(zip(prompts, params, strict=True))
        ]
        delivered: dict[str, list[int]] = {r.request_id: [] for r in requests}
        while core.has_unfinished:
            for delta in core.step():
                delivered[delta.request.request_id].extend(delta.new_token_ids)
            core.check_integrity()
        assert core.pool.num_free + core.tree.num_cached_blocks == core.num_blocks
        for request in requests:
            assert delivered[request.request_id] == request.output_token_ids  # each token once, in order
        assert (core.runner.future_rows > 0) == overlap
        results[overlap] = [(r.output_token_ids, r.finish_reason, r.stop_reason) for r in requests]
    assert results[True] == results[False]
    assert results[True][0] == (free[: free.index(stop_at) + 1], FinishReason.STOP, stop_at)


def test_penalties_and_seeds_beside_plain_requests(tiny_llama: Path) -> None:
    """Penalised rows need their own last token on the host, so their steps are read back at once;
    seeded sampling draws the same numbers either way."""
    rng = random.Random(6)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(5, 40))] for _ in range(12)]
    params = []
    for i in range(12):
        if i % 3 == 0:
            params.append(
                SamplingParams(temperature=0.0, max_tokens=9, repetition_penalty=1.3, ignore_eos=True)
            )
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=0.9, max_tokens=9, seed=i, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True))
    outputs = [
        run_all(make_core(tiny_llama, overlap, num_blocks=512), prompts, params) for overlap in (False, True)
    ]
    assert outputs[0] == outputs[1]


def test_aborts_while_a_step_is_in_flight_leave_no_block_behind(tiny_llama: Path) -> None:
    core = make_core(tiny_llama, True, num_blocks=160, max_batched_tokens=256, max_num_seqs=32)
    run_random_with_aborts(core, 600, check_every_step=True)
    assert core.runner.future_rows > 0


def test_a_request_at_its_length_limit_is_not_scheduled_past_it(tiny_llama: Path) -> None:
    """max_tokens is known without the token values: no step runs a row past it."""
    core = make_core(tiny_llama, True, num_blocks=64)
    request = core.add_request(
        list(range(3, 20)), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    )
    rows = 0
    while core.has_unfinished:
        plan_rows = len(core.scheduler.running)
        core.step()
        rows += plan_rows
    assert request.finish_reason is FinishReason.LENGTH and len(request.output_token_ids) == 3
    assert core.stats.steps == 3  # prefill (samples 1), two decodes (2, 3); none for a 4th


def test_logprobs_come_back_with_their_tokens(tiny_llama: Path) -> None:
    rng = random.Random(9)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(5, 30))] for _ in range(6)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, logprobs=i % 3 or None)
        for i in range(6)
    ]
    results = []
    for overlap in (False, True):
        core = make_core(tiny_llama, overlap, num_blocks=256)
        requests = [core.add_request(p, s) for p, s in zip(prompts, params, strict=True)]
        while core.has_unfinished:
            core.step()
        results.append([(r.output_token_ids, r.logprobs) for r in requests])
    assert results[0] == results[1]
    assert all(len(lp) == 7 for (_, lp), p in zip(results[1], params, strict=True) if p.logprobs)
