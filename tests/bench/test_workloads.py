"""Workload generators: deterministic for a seed, replayable, and shaped as documented."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bench.workloads import WORKLOADS, generate
from bench.workloads.trace import Segment, TokenBook, Trace, TraceRequest

SMALL = {
    "generated-shared-prefix": {"num_groups": 4, "prompts_per_group": 8},
    "multi-turn": {"num_conversations": 20},
    "agent": {"num_tasks": 20, "subagent_prob": 0.5},
    "rag": {"num_requests": 300},
    "random": {"num_requests": 50, "range_ratio": 0.5},
}


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_same_seed_same_trace_other_seed_other_trace(workload: str) -> None:
    first = generate(workload, seed=7, **SMALL[workload]).to_bytes()
    assert generate(workload, seed=7, **SMALL[workload]).to_bytes() == first
    assert generate(workload, seed=8, **SMALL[workload]).to_bytes() != first


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_trace_round_trips_through_jsonl(workload: str, tmp_path: Path) -> None:
    trace = generate(workload, seed=1, **SMALL[workload])
    path = tmp_path / "trace.jsonl"
    trace.write(path)
    again = Trace.read(path)
    assert again.header == trace.header
    assert again.requests == trace.requests
    assert again.header.seed == 1 and again.header.num_requests == len(trace.requests)


def test_trace_rejects_a_request_following_an_unknown_one() -> None:
    orphan = TraceRequest(request_id="b", prompt=[Segment(1, 4)], output_len=2, output_key=2, after=["a"])
    with pytest.raises(ValueError, match="not listed before"):
        Trace(generate("random", num_requests=1).header, (orphan,))


def test_segment_expansion_is_a_prefix_of_a_longer_one() -> None:
    book, other = TokenBook(1000), TokenBook(1000)
    long = book.segment(Segment(42, 300)).copy()
    assert np.array_equal(other.segment(Segment(42, 120)), long[:120])
    assert not np.array_equal(book.segment(Segment(43, 300)), long)
    assert long.min() >= 256 and long.max() < 1000


def test_shared_prefix_groups_share_exactly_their_system_prompt() -> None:
    trace = generate(
        "generated-shared-prefix", seed=3, num_groups=3, prompts_per_group=4, system_prompt_len=64
    )
    book = TokenBook(trace.header.vocab_size)
    prompts = [book.tokens(r.prompt) for r in trace.requests]
    assert all(len(p) == 64 + 128 for p in prompts)
    for g in range(3):
        group = prompts[g * 4 : g * 4 + 4]
        assert all(np.array_equal(p[:64], group[0][:64]) for p in group)
        assert len({p[64:].tobytes() for p in group}) == 4  # unique questions
    assert not np.array_equal(prompts[0][:64], prompts[4][:64])
    assert all(r.arrival_s == 0.0 for r in trace.requests)  # infinite rate: all at once


def test_each_chat_turn_extends_the_previous_turn_and_its_answer() -> None:
    trace = generate("multi-turn", seed=2, num_conversations=5)
    book = TokenBook(trace.header.vocab_size)
    by_id = {r.request_id: r for r in trace.requests}
    followers = [r for r in trace.requests if r.after]
    assert followers
    for request in followers:
        (previous_id,) = request.after
        previous = by_id[previous_id]
        assert previous.session_id == request.session_id and request.arrival_s is None
        quoted = book.tokens([*previous.prompt, Segment(previous.output_key, previous.output_len)])
        assert np.array_equal(book.tokens(request.prompt)[: len(quoted)], quoted)
        assert request.prompt_len > len(quoted) and request.think_time_s >= 0


def test_agent_steps_grow_and_subagents_share_the_parent_context() -> None:
    trace = generate("agent", seed=4, num_tasks=30, subagent_prob=0.5)
    by_id = {r.request_id: r for r in trace.requests}
    fan_in = [r for r in trace.requests if len(r.after) > 1]
    assert fan_in, "with subagent_prob 0.5 some parent waits on several sub-agents"
    for parent in fan_in:
        subagent_finals = [by_id[d] for d in parent.after]
        # Each sub-agent's answer is quoted in the parent's next prompt.
        keys = {s.key for s in parent.prompt}
        assert all(f.output_key in keys for f in subagent_finals)
    for request in (r for r in trace.requests if len(r.after) == 1):
        previous = by_id[request.after[0]]
        # The step's prompt begins with the previous step's prompt and answer.
        n = len(previous.prompt)
        assert request.prompt[:n] == previous.prompt
        assert request.prompt[n] == Segment(previous.output_key, previous.output_len)
    kinds = Counter(tuple(s.key for s in r.prompt[:2]) for r in trace.requests)
    assert len(kinds) == 4  # four agent kinds, each a shared system prompt + tool schemas


def test_rag_popularity_is_zipf_and_order_varies() -> None:
    trace = generate("rag", seed=5, num_requests=3000, num_documents=200, top_k=3, zipf_s=1.0)
    instructions = trace.requests[0].prompt[0]
    assert all(r.prompt[0] == instructions for r in trace.requests)
    counts = Counter(s.key for r in trace.requests for s in r.prompt[1:4])
    ranked = [count for _, count in counts.most_common()]
    assert len(counts) > 150
    assert ranked[0] > 3 * ranked[20] > 3 * 3 * ranked[-1]
    # Varying order: the same pair of popular documents appears in both orders.
    pairs = Counter(tuple(s.key for s in r.prompt[1:3]) for r in trace.requests)
    (a, b), _ = pairs.most_common(1)[0]
    assert pairs[(b, a)] > 0


def test_rag_followups_quote_the_same_documents() -> None:
    trace = generate("rag", seed=6, num_requests=50, followups_mean=2.0)
    by_id = {r.request_id: r for r in trace.requests}
    followups = [r for r in trace.requests if r.after]
    assert followups
    for request in followups:
        first = by_id[request.session_id or ""]
        assert request.prompt[: len(first.prompt)] == first.prompt


def test_random_lengths_stay_in_range() -> None:
    trace = generate("random", seed=0, num_requests=200, input_len=100, output_len=40, range_ratio=0.5)
    assert all(50 <= r.prompt_len <= 100 and 20 <= r.output_len <= 40 for r in trace.requests)
    assert len({r.prompt[0].key for r in trace.requests}) == 200


def test_unknown_workload_or_option_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        generate("nope")
    with pytest.raises(ValueError, match="bad options"):
        generate("rag", top_kk=3)
