"""The engine core end to end on a tiny random model: cache, chunking, batching, preemption."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cache.events import BlockRemoved
from engine.config import EngineConfig
from engine.core import EngineCore, InvalidRequestError
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from engine.weights import load_model
from testkit.engine import mixed_workload, run_all, run_random_with_aborts

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def make_core(folder: Path, **options: object) -> EngineCore:
    config = EngineConfig(model=str(folder), block_size=options.pop("block_size", 4), **options)  # type: ignore[arg-type]
    return EngineCore(config, load_model(folder))


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference_outputs(tiny_llama: Path) -> dict[str, list[int]]:
    prompts, params = mixed_workload()
    core = make_core(tiny_llama, enable_prefix_caching=False, max_batched_tokens=4096, num_blocks=4096)
    return run_all(core, prompts, params)


@pytest.mark.parametrize(
    "options",
    [
        {"enable_prefix_caching": True, "max_batched_tokens": 512},
        {"enable_prefix_caching": True, "max_batched_tokens": 16},
        {"enable_prefix_caching": True, "max_batched_tokens": 1, "max_num_seqs": 8},
        {"enable_prefix_caching": False, "max_batched_tokens": 16},
        {"enable_prefix_caching": True, "max_batched_tokens": 64, "num_blocks": 70},  # forces preemption
        {"enable_prefix_caching": False, "max_batched_tokens": 64, "num_blocks": 70},
        {"enable_prefix_caching": True, "max_batched_tokens": 100, "max_num_seqs": 3, "queue_policy": "lpm"},
        {"enable_prefix_caching": True, "max_batched_tokens": 48, "block_size": 16, "num_blocks": 40},
    ],
    ids=["cache-512", "cache-16", "cache-1", "nocache-16", "preempt", "preempt-nocache", "lpm", "bs16-tight"],
)
def test_greedy_outputs_do_not_depend_on_cache_chunking_or_batching(
    tiny_llama: Path, reference_outputs: dict[str, list[int]], options: dict[str, object]
) -> None:
    prompts, params = mixed_workload()
    options = {"num_blocks": 2048, **options}
    core = make_core(tiny_llama, **options)
    assert run_all(core, prompts, params) == reference_outputs


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_recomputes_to_the_same_outputs(tiny_llama: Path, prefix_caching: bool) -> None:
    """Requests whose outputs outgrow a small pool get preempted and recomputed, unchanged."""
    rng = random.Random(4)
    shared = [rng.randrange(3, 512) for _ in range(24)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 16))] for _ in range(12)]
    params = [SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)] * len(prompts)
    expected = run_all(make_core(tiny_llama, num_blocks=1024), prompts, params)
    core = make_core(tiny_llama, num_blocks=60, max_batched_tokens=64, enable_prefix_caching=prefix_caching)
    assert run_all(core, prompts, params) == expected
    assert core.scheduler.num_preemptions > 0


def test_each_request_alone_matches_the_batch(
    tiny_llama: Path, reference_outputs: dict[str, list[int]]
) -> None:
    prompts, params = mixed_workload()
    for index in (0, 7, 23, 49):
        core = make_core(tiny_llama, num_blocks=256)
        alone = run_all(core, [prompts[index]], [params[index]])
        assert alone["r0"] == reference_outputs[f"r{index}"]


def test_multi_turn_reuses_previous_turns(tiny_llama: Path) -> None:
    core = make_core(tiny_llama, block_size=16, num_blocks=1024)
    rng = random.Random(1)
    conversation = [rng.randrange(3, 512) for _ in range(400)]
    previous_total = 0
    for turn in range(5):
        request = core.add_request(
            conversation, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        )
        while core.has_unfinished:
            core.step()
        if turn > 0:
            assert request.num_cached_tokens >= 0.95 * previous_total, (turn, request.num_cached_tokens)
        conversation = conversation + request.output_token_ids
        previous_total = len(conversation)
        conversation = conversation + [rng.randrange(3, 512) for _ in range(30)]
    core.check_integrity()


def test_shared_prefix_is_computed_once_for_a_batch_of_agents(tiny_llama: Path) -> None:
    core = make_core(tiny_llama, block_size=16, num_blocks=1024, max_batched_tokens=512)
    rng = random.Random(2)
    prefix = [rng.randrange(3, 512) for _ in range(2000)]
    suffix_len, max_tokens = 20, 4
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = [
        core.add_request(prefix + [rng.randrange(3, 512) for _ in range(suffix_len)], params)
        for _ in range(32)
    ]
    while core.has_unfinished:
        core.step()
    # The prefix once, each suffix once, and every decode step after the first token.
    assert core.stats.tokens_computed == 2000 + 32 * suffix_len + 32 * (max_tokens - 1)
    assert sorted(r.num_cached_tokens for r in requests)[1:] == [2000] * 31
    core.check_integrity()


def test_random_requests_with_aborts_leave_no_block_behind(tiny_llama: Path) -> None:
    core = make_core(tiny_llama, num_blocks=160, max_batched_tokens=256, max_num_seqs=32)
    run_random_with_aborts(core, 1000)
    events = [event for _, event in core.drain_kv_events()]
    assert any(isinstance(event, BlockRemoved) for event in events)  # the pool was small enough to evict


def test_abort_frees_blocks_at_once(tiny_llama: Path) -> None:
    core = make_core(tiny_llama, num_blocks=64, enable_prefix_caching=False)
    request = core.add_request(list(range(3, 40)), GREEDY)
    core.step()
    assert core.pool.num_free < 64
    assert core.abort(request.request_id)
    assert core.pool.num_free == 64
    assert request.finish_reason is FinishReason.ABORT
    assert not core.abort(request.request_id)


def test_stop_tokens_and_max_tokens(tiny_llama: Path) -> None:
    core = make_core(tiny_llama, num_blocks=64)
    free_run = run_all(core, [list(range(3, 30))], [GREEDY])["r0"]
    stop_at = free_run[3]
    core = make_core(tiny_llama, num_blocks=64)
    request = core.add_request(
        list(range(3, 30)), SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=(stop_at,))
    )
    while core.has_unfinished:
        core.step()
    assert request.output_token_ids == free_run[: free_run.index(stop_at) + 1]
    assert request.finish_reason is FinishReason.STOP and request.stop_reason == stop_at


def test_invalid_requests_are_refused(tiny_llama: Path) -> None:
    core = make_core(tiny_llama, num_blocks=16)  # 64 tokens of context
    with pytest.raises(InvalidRequestError, match="empty"):
        core.add_request([], GREEDY)
    vocab = core.model_config.vocab_size
    for prompt, bad in (
        ([1, 2, 100000], 100000),
        ([1, -1], -1),
        ([2**32, 1], 2**32),
        ([vocab], vocab),
        ([1, 2.0], 2.0),
    ):
        with pytest.raises(InvalidRequestError, match=f"token id {bad} is outside the vocabulary"):
            core.add_request(prompt, GREEDY)  # type: ignore[arg-type]  # the float one on purpose
    edges = core.add_request([0, vocab - 1], SamplingParams(max_tokens=1))  # both ends are in range
    assert core.abort(edges.request_id)
    with pytest.raises(InvalidRequestError, match="maximum context"):
        core.add_request(list(range(3, 70)), GREEDY)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        core.add_request(list(range(3, 60)), SamplingParams(max_tokens=20))
    assert not core.has_unfinished


def test_step_log_records_what_each_step_held(tiny_llama: Path, tmp_path: Path) -> None:
    """Two requests on one 40-token prefix under a 32-token budget: the log's prompt chunks
    (tokens, cached context), decode rows and the keys they read (shared blocks once)."""
    from engine.step_log import StepLog, read_step_log

    core = make_core(tiny_llama, block_size=16, num_blocks=256, max_batched_tokens=32)
    core.step_log = StepLog(tmp_path / "steps.jsonl", flush_every=2)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prefix = list(range(3, 43))
    core.add_request([*prefix, 50], params)
    core.add_request([*prefix, 60], params)
    steps = 0
    while core.has_unfinished:
        core.step()
        steps += 1
    core.step_log.close()
    records = read_step_log(tmp_path / "steps.jsonl")
    assert len(records) == steps
    assert all(r.kind == "eager" and 0 < r.execute_s <= r.step_s for r in records)  # CPU: no graphs
    # Every prompt token computed once, except the 32 the second request finds cached.
    prompt_tokens = sum(n for r in records for n, _ in r.chunks)
    one_token_chunks = sum(r.decodes for r in records) - 2 * 2  # 2 decode steps per request
    assert prompt_tokens + one_token_chunks == 41 + (41 - 32)
    assert records[0].chunks == [(32, 0)]
    assert any(chunk == (9, 32) for r in records for chunk in r.chunks)  # a chunk over 32 cached
    last = records[-1]  # both requests decoding their last token
    assert last.decodes == 2 and last.chunks == []
    assert last.decode_kv == 2 * (41 + 2)
    assert last.decode_kv_distinct == 32 + 2 * (43 - 32)  # two shared full blocks, then per row
    core.check_integrity()


def test_kernel_warm_up_leaves_the_engine_as_it_started(tiny_llama: Path, tmp_path: Path) -> None:
    """The GPU warm-up's batches (run here on the CPU) hold what they are meant to (a prompt past
    the chunk graphs, two short chunks, chunks over a 512-token cached context) and leave no
    cached block, no KV event and no used block behind."""
    from engine.step_log import StepLog, read_step_log
    from engine.warmup import warm_up

    core = make_core(tiny_llama, block_size=16, num_blocks=256, max_batched_tokens=2048)
    core.step_log = StepLog(tmp_path / "steps.jsonl")
    warm_up(core, kernel_variants=True)
    core.step_log.close()
    prompt_steps = [r.chunks for r in read_step_log(tmp_path / "steps.jsonl") if r.chunks]
    assert prompt_steps == [
        [(8, 0)],
        [(640, 0)],
        [(20, 0), (20, 0)],
        [(300, 512), (20, 0)],
        [(50, 512), (20, 0)],
    ]
    assert core.tree is not None and core.tree.num_cached_blocks == 0
    assert core.drain_kv_events() == []
    assert core.pool.num_free == core.pool.num_blocks
    core.check_integrity()
