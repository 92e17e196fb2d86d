"""Agent traffic: ReAct loops over a shared system prompt and tool schemas, with sub-agents.

Tasks start as a Poisson process at `task_rate` per second. Each task runs one agent of one
of `num_agent_types` kinds; a kind is a system prompt plus tool schemas (~4k tokens) shared by
every task of that kind. A step is one request: the prompt is the kind's prefix, the task,
then the scratchpad (every earlier thought/action and tool output); the answer is the next
thought/action. The tool then runs (`tool_latency_mean_s`, exponential) and its output is
appended, so the next step arrives after this one finished plus the tool's time, and its
prompt extends this one's prompt and answer: exactly the prefix the previous replica holds.

With probability `subagent_prob` a step delegates: `min_subagents..max_subagents` sub-agents
start together, each from the parent's whole context plus its own sub-task, run their own
short loops, and the parent resumes when the last of them finished, with their final answers
as its observation. Sub-agents share the parent's context as a prefix (the fan-out case
SGLang's and Dynamo's routers target).
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
class AgentConfig:
    seed: int = 0
    num_tasks: int = 300
    task_rate: float = 1.0
    num_agent_types: int = 4
    system_prompt_len: int = 1024
    tool_schema_len: int = 3072
    task_len_mean: float = 300.0
    min_steps: int = 3
    max_steps: int = 10
    step_output_mean: float = 150.0
    tool_output_mean: float = 600.0
    length_sigma: float = 0.8
    tool_latency_mean_s: float = 1.0
    subagent_prob: float = 0.15
    min_subagents: int = 2
    max_subagents: int = 4
    subagent_max_steps: int = 4
    subtask_len: int = 96
    max_context: int = 16384
    vocab_size: int = LLAMA3_VOCAB


class _AgentBuilder:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.keys = KeyMaker(config.seed, stream=4)
        self.requests: list[TraceRequest] = []
        self.prefixes = [
            [Segment(self.keys(), config.system_prompt_len), Segment(self.keys(), config.tool_schema_len)]
            for _ in range(config.num_agent_types)
        ]

    def _length(self, mean: float, high: int) -> int:
        return lognormal_lengths(self.rng, mean, self.config.length_sigma, 1, 8, high)[0]

    def _tool_time(self) -> float:
        return float(self.rng.exponential(self.config.tool_latency_mean_s))

    def loop(
        self,
        session: str,
        context: list[Segment],
        steps: int,
        after: list[str],
        start: float | None,
        think: float,
        may_delegate: bool,
    ) -> tuple[str, Segment]:
        """Run `steps` ReAct steps from `context`; return the last request id and its answer."""
        config = self.config
        for step in range(steps):
            answer = Segment(self.keys(), self._length(config.step_output_mean, 1024))
            request_id = f"{session}-{step}"
            self.requests.append(
                TraceRequest(
                    request_id=request_id,
                    session_id=session,
                    prompt=context,
                    output_len=answer.length,
                    output_key=answer.key,
                    arrival_s=start if not after else None,
                    after=after,
                    think_time_s=think if after else 0.0,
                )
            )
            context = [*context, answer]
            last = step == steps - 1 or sum(s.length for s in context) > config.max_context
            if last:
                return request_id, answer
            if may_delegate and self.rng.random() < config.subagent_prob:
                after, results = self._delegate(session, step, context, request_id)
                context = [*context, *results]
                think = 0.0
            else:
                context = [*context, Segment(self.keys(), self._length(config.tool_output_mean, 4096))]
                after, think = [request_id], self._tool_time()
        raise AssertionError("unreachable: the last step returns")

    def _delegate(
        self, session: str, step: int, context: list[Segment], parent_request: str
    ) -> tuple[list[str], list[Segment]]:
        config = self.config
        count = int(self.rng.integers(config.min_subagents, config.max_subagents + 1))
        finals: list[str] = []
        results: list[Segment] = []
        for j in range(count):
            sub_context = [*context, Segment(self.keys(), config.subtask_len)]
            steps = int(self.rng.integers(1, config.subagent_max_steps + 1))
            final_id, answer = self.loop(
                f"{session}.{step}.{j}", sub_context, steps, [parent_request], None, 0.0, False
            )
            finals.append(final_id)
            results.append(answer)
        return finals, results


def generate_agent(config: AgentConfig) -> Trace:
    if not 1 <= config.min_steps <= config.max_steps:
        raise ValueError("need 1 <= min_steps <= max_steps")
    if not 1 <= config.min_subagents <= config.max_subagents:
        raise ValueError("need 1 <= min_subagents <= max_subagents")
    builder = _AgentBuilder(config)
    starts = poisson_arrivals(builder.rng, config.task_rate, config.num_tasks)
    for t, start in enumerate(starts):
        kind = int(builder.rng.integers(config.num_agent_types))
        task = Segment(builder.keys(), builder._length(config.task_len_mean, 2048))
        steps = int(builder.rng.integers(config.min_steps, config.max_steps + 1))
        builder.loop(f"agent-{t}", [*builder.prefixes[kind], task], steps, [], start, 0.0, True)
    return Trace(header_for("agent", config, len(builder.requests)), tuple(builder.requests))
