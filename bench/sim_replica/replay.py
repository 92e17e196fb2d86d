"""The client side of a router comparison: a trace replayed as chat completions, on schedule.

Each request is a streamed /v1/chat/completions with stream_options.include_usage and
max_tokens = the trace's output length, one message per trace segment (the first one the
system message, earlier answers as assistant messages), with `x-session-id`. Its text is the
trace's token ids as words that encode back to the same number of tokens (words.py), so a
router that routes on text (sglang-router) and one that routes on token ids (our gateway) see
the same prompts, and the replicas see equal ids for equal segments. Open-loop requests arrive
at the trace's times, closed-loop ones `think_time_s` after the requests they follow, both
stretched by the time scale. TTFT is the first chunk that carries output text (vLLM's
definition, except that a role-only chunk does not count).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import msgspec

from bench.sim_replica.words import WordVocab
from bench.workloads.trace import Segment, TokenBook, Trace, TraceRequest

MODEL = "sim-llama3-8b"


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _Details | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None


_chunk = msgspec.json.Decoder(_Chunk)


@dataclass
class Outcome:
    request_id: str
    ok: bool
    start_s: float  # wall seconds from the run's start
    ttft_s: float = 0.0
    latency_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


class Replay:
    """Sends a trace's requests on schedule (time-scaled) and records what each one got."""

    def __init__(self, trace: Trace, words: WordVocab, time_scale: float) -> None:
        self.trace = trace
        self.words = words
        self.time_scale = time_scale
        self.book = TokenBook(trace.header.vocab_size)
        self.answer_keys = {r.output_key for r in trace.requests}
        self._texts: dict[Segment, str] = {}

    def messages(self, request: TraceRequest) -> list[dict[str, str]]:
        out = []
        for i, segment in enumerate(request.prompt):
            text = self._texts.get(segment)
            if text is None:
                text = self.words.text_for(self.book.segment(segment))
                self._texts[segment] = text
            role = "system" if i == 0 else "assistant" if segment.key in self.answer_keys else "user"
            out.append({"role": role, "content": text})
        return out

    async def run(self, base_url: str) -> tuple[list[Outcome], float]:
        url = base_url + "/v1/chat/completions"
        finished: dict[str, asyncio.Event] = {r.request_id: asyncio.Event() for r in self.trace.requests}
        outcomes: list[Outcome] = []
        # Idle connections are dropped well before a server's keep-alive timeout (uvicorn: 5 s),
        # so a request never goes out on a connection the server is closing at that moment.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=1.0)
        timeout = aiohttp.ClientTimeout(total=3600)
        started = time.perf_counter()

        async def one(session: aiohttp.ClientSession, request: TraceRequest) -> None:
            try:
                if request.arrival_s is not None:
                    delay = request.arrival_s * self.time_scale - (time.perf_counter() - started)
                    await asyncio.sleep(max(delay, 0.0))
                else:
                    for dep in request.after:
                        await finished[dep].wait()
                    await asyncio.sleep(request.think_time_s * self.time_scale)
                outcomes.append(await self._send(session, url, request, started))
            finally:
                finished[request.request_id].set()

        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(one(session, r) for r in self.trace.requests))
        return outcomes, time.perf_counter() - started

    async def _send(
        self, session: aiohttp.ClientSession, url: str, request: TraceRequest, started: float
    ) -> Outcome:
        body = {
            "model": MODEL,
            "messages": self.messages(request),
            "max_tokens": request.output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"content-type": "application/json"}
        if request.session_id:
            headers["x-session-id"] = request.session_id
        sent = time.perf_counter()
        outcome = Outcome(request.request_id, False, sent - started)
        try:
            async with session.post(url, data=msgspec.json.encode(body), headers=headers) as response:
                if response.status != 200:
                    outcome.error = f"{response.status}: {(await response.read())[:200]!r}"
                    return outcome
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = _chunk.decode(line[6:])
                    now = time.perf_counter() - sent
                    for choice in chunk.choices:
                        if choice.delta is not None and choice.delta.content:
                            if not outcome.ttft_s:
                                outcome.ttft_s = now
                            outcome.latency_s = now
                        if choice.finish_reason is not None:
                            outcome.latency_s = now
                    if chunk.usage is not None:
                        usage = chunk.usage
                        outcome.prompt_tokens = usage.prompt_tokens
                        outcome.output_tokens = usage.completion_tokens
                        details = usage.prompt_tokens_details
                        outcome.cached_tokens = (details.cached_tokens or 0) if details else 0
                        outcome.ok = outcome.ttft_s > 0
        except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError) as err:
            outcome.error = f"{type(err).__name__}: {err}"
        return outcome
