"""Multi-turn chat: conversations that grow turn by turn, with think time between turns.

Conversations start as a Poisson process at `conversation_rate` per second. Each shares one
system prompt; turn t's prompt is the system prompt, then every earlier user message and
answer, then the new user message, so each turn extends the previous turn's prompt plus its
answer. Turn t + 1 arrives `think_time` after turn t finished (exponential, mean
`think_time_mean_s`): the replayer schedules it. Lengths are lognormal around ShareGPT-like
means (user ~150 tokens, answer ~250).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.workloads.trace import (
    LLAMA3_VOCAB,
    KeyMaker,
    Segment,
    Trace,
    TraceRequest,
    header_for,
    lognormal_lengths,
    poisson_arrivals,
)


@dataclass(frozen=True)
class MultiTurnConfig:
    seed: int = 0
    num_conversations: int = 200
    conversation_rate: float = 2.0
    min_turns: int = 3
    max_turns: int = 10
    system_prompt_len: int = 512
    user_len_mean: float = 150.0
    output_len_mean: float = 250.0
    length_sigma: float = 0.8
    max_len: int = 2048
    think_time_mean_s: float = 5.0
    vocab_size: int = LLAMA3_VOCAB


def generate_multi_turn(config: MultiTurnConfig) -> Trace:
    if not 1 <= config.min_turns <= config.max_turns:
        raise ValueError("need 1 <= min_turns <= max_turns")
    rng = np.random.default_rng(config.seed)
    keys = KeyMaker(config.seed, stream=3)
    system = Segment(keys(), config.system_prompt_len)
    starts = poisson_arrivals(rng, config.conversation_rate, config.num_conversations)
    requests: list[TraceRequest] = []
    for c, start in enumerate(starts):
        turns = int(rng.integers(config.min_turns, config.max_turns + 1))
        users = lognormal_lengths(rng, config.user_len_mean, config.length_sigma, turns, 4, config.max_len)
        answers = lognormal_lengths(
            rng, config.output_len_mean, config.length_sigma, turns, 4, config.max_len
        )
        context = [system]
        previous: str | None = None
        for t in range(turns):
            context = [*context, Segment(keys(), users[t])]
            answer = Segment(keys(), answers[t])
            request_id = f"chat-{c}-{t}"
            requests.append(
                TraceRequest(
                    request_id=request_id,
                    session_id=f"chat-{c}",
                    prompt=context,
                    output_len=answer.length,
                    output_key=answer.key,
                    arrival_s=start if previous is None else None,
                    after=[] if previous is None else [previous],
                    think_time_s=0.0
                    if previous is None
                    else float(rng.exponential(config.think_time_mean_s)),
                )
            )
            context = [*context, answer]
            previous = request_id
    return Trace(header_for("multi-turn", config, len(requests)), tuple(requests))
