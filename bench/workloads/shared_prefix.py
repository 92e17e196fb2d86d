"""generated-shared-prefix (SGLang bench_serving's `generated-shared-prefix` dataset) and random lengths.

Shared prefix: `num_groups` system prompts of `system_prompt_len` tokens, each followed by
`prompts_per_group` unique questions of `question_len` tokens; every answer is `output_len`
tokens. SGLang's defaults: 64 groups x 16 prompts, 2,048-token system prompt, 128-token
question, 256 output tokens. Requests arrive as a Poisson process at `request_rate` (all at
t = 0 when infinite, as SGLang's default), group by group unless `shuffle`.

Random lengths (SGLang's `random` dataset): input and output lengths uniform in
[len x (1 - range_ratio), len], unrelated random tokens, so nothing is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bench.workloads.trace import (
    LLAMA3_VOCAB,
    KeyMaker,
    Segment,
    Trace,
    TraceRequest,
    header_for,
    poisson_arrivals,
)


@dataclass(frozen=True)
class SharedPrefixConfig:
    seed: int = 0
    num_groups: int = 64
    prompts_per_group: int = 16
    system_prompt_len: int = 2048
    question_len: int = 128
    output_len: int = 256
    request_rate: float = math.inf
    shuffle: bool = False
    vocab_size: int = LLAMA3_VOCAB


def generate_shared_prefix(config: SharedPrefixConfig) -> Trace:
    rng = np.random.default_rng(config.seed)
    keys = KeyMaker(config.seed, stream=1)
    prompts: list[tuple[list[Segment], int]] = []
    for _ in range(config.num_groups):
        system = Segment(keys(), config.system_prompt_len)
        for _ in range(config.prompts_per_group):
            prompts.append(([system, Segment(keys(), config.question_len)], keys()))
    order = rng.permutation(len(prompts)) if config.shuffle else np.arange(len(prompts))
    arrivals = poisson_arrivals(rng, config.request_rate, len(prompts))
    requests = tuple(
        TraceRequest(
            request_id=f"gsp-{n}",
            prompt=prompts[i][0],
            output_len=config.output_len,
            output_key=prompts[i][1],
            arrival_s=arrivals[n],
        )
        for n, i in enumerate(order)
    )
    return Trace(header_for("generated-shared-prefix", config, len(requests)), requests)


@dataclass(frozen=True)
class RandomLengthsConfig:
    seed: int = 0
    num_requests: int = 1000
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    request_rate: float = math.inf
    vocab_size: int = LLAMA3_VOCAB


def generate_random_lengths(config: RandomLengthsConfig) -> Trace:
    if not 0.0 <= config.range_ratio <= 1.0:
        raise ValueError(f"range_ratio must be within 0..1, got {config.range_ratio}")
    rng = np.random.default_rng(config.seed)
    keys = KeyMaker(config.seed, stream=2)
    n = config.num_requests

    def lengths(full: int) -> np.ndarray:
        low = max(1, int(full * (1 - config.range_ratio)))
        return rng.integers(low, full + 1, size=n)

    inputs, outputs = lengths(config.input_len), lengths(config.output_len)
    arrivals = poisson_arrivals(rng, config.request_rate, n)
    requests = tuple(
        TraceRequest(
            request_id=f"rnd-{i}",
            prompt=[Segment(keys(), int(inputs[i]))],
            output_len=int(outputs[i]),
            output_key=keys(),
            arrival_s=arrivals[i],
        )
        for i in range(n)
    )
    return Trace(header_for("random", config, n), requests)
