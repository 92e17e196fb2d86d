"""Client behaviour that needs a peer misbehaving on cue: retries on 429 / 503 (honouring
Retry-After), timeouts, the session header, and streamed tool calls put back together.

The peer is a small aiohttp server on 127.0.0.1 answering what each test scripts (a test
double of an HTTP server); everything the real gateway does is tested in test_client.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from prefixgate import (
    AsyncClient,
    BadRequestError,
    Client,
    ConnectionError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
    Session,
    TimeoutError,
)
from prefixgate._http import normalize_base_url, parse_retry_after

_OK = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 10,
        "completion_tokens": 1,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 8},
    },
}


def _error(status: int, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": f"scripted {status}", "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status, headers=headers)


@dataclass
class Peer:
    """Answers the n-th request with script[n] (the last entry repeats); records requests."""

    script: list[Callable[[], Any]]
    url: str = ""
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((dict(request.headers), await request.json()))
        answer = self.script[min(len(self.requests), len(self.script)) - 1]()
        if asyncio.iscoroutine(answer):
            answer = await answer
        if isinstance(answer, list):  # SSE frames
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for frame in answer:
                await response.write(b"data: " + json.dumps(frame).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            return response
        return answer


@pytest.fixture
def peer() -> Iterator[Callable[[list[Callable[[], Any]]], Peer]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners: list[web.AppRunner] = []

    def start(script: list[Callable[[], Any]]) -> Peer:
        made = Peer(script)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", made.handle)

        async def up() -> int:
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

        port = asyncio.run_coroutine_threadsafe(up(), loop).result(10)
        made.url = f"http://127.0.0.1:{port}/v1"
        return made

    yield start
    for runner in runners:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


FAST = RetryPolicy(max_retries=2, initial_backoff=0.01, max_backoff=0.02)
HI = [{"role": "user", "content": "hi"}]


def test_503_then_200_is_retried(peer) -> None:
    server = peer(
        [lambda: _error(503, "service_unavailable", {"Retry-After": "0"}), lambda: web.json_response(_OK)]
    )
    with Client(server.url, retry=FAST) as client:
        reply = client.chat(HI)
    assert reply.text == "fine" and reply.usage is not None and reply.usage.cached_tokens == 8
    assert len(server.requests) == 2


@pytest.mark.asyncio
async def test_async_429_then_503_then_200_is_retried(peer) -> None:
    server = peer(
        [
            lambda: _error(429, "rate_limit_exceeded", {"Retry-After": "0"}),
            lambda: _error(503, "service_unavailable"),
            lambda: web.json_response(_OK),
        ]
    )
    async with AsyncClient(server.url, retry=FAST) as client:
        reply = await client.chat(HI)
    assert reply.text == "fine" and len(server.requests) == 3


@pytest.mark.asyncio
async def test_retries_give_up_with_the_last_error(peer) -> None:
    server = peer([lambda: _error(429, "rate_limit_exceeded", {"Retry-After": "0"})])
    async with AsyncClient(server.url, retry=FAST) as client:
        with pytest.raises(RateLimitError) as err:
            await client.chat(HI)
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "0"
    assert len(server.requests) == 3  # the first try and max_retries=2 more
    server = peer([lambda: _error(503, "service_unavailable")])
    with Client(server.url, max_retries=0) as client, pytest.raises(ServiceUnavailableError):
        client.chat(HI)
    assert len(server.requests) == 1


def test_a_400_is_not_retried(peer) -> None:
    server = peer([lambda: _error(400, "invalid_request_error")])
    with Client(server.url, retry=FAST) as client, pytest.raises(BadRequestError) as err:
        client.chat(HI)
    assert err.value.message == "scripted 400" and len(server.requests) == 1


def test_retry_delays_are_exponential_with_jitter_and_honour_retry_after() -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=4.0, rng=random.Random(7))
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)]:
        delays = {policy.delay(attempt) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(delays) > 1
    assert policy.delay(0, "3") == 3.0
    assert policy.delay(5, "1000") == policy.max_retry_after
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert parse_retry_after("soon") is None


def test_timeouts_and_refused_connections(peer) -> None:
    async def slow() -> web.Response:
        await asyncio.sleep(1)
        return web.json_response(_OK)

    server = peer([slow])
    with Client(server.url, timeout=0.2) as client, pytest.raises(TimeoutError):
        client.chat(HI)

    async def go() -> None:
        async with AsyncClient(server.url, timeout=0.2) as client:
            with pytest.raises(TimeoutError):
                await client.chat(HI)

    asyncio.run(go())
    with Client("http://127.0.0.1:9", retry=FAST) as client, pytest.raises(ConnectionError):
        client.chat(HI)


def test_base_urls() -> None:
    assert normalize_base_url("http://h:8080") == "http://h:8080/v1"
    assert normalize_base_url("http://h:8080/v1/") == "http://h:8080/v1"
    assert normalize_base_url("http://h/openai/v1") == "http://h/openai/v1"


def test_session_sends_its_id_and_salt_and_replays_streamed_tool_calls_verbatim(peer) -> None:
    arguments = '{"expression": "2 * (3 + 4)"}'
    frames = [
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "calculator", "arguments": arguments[:9]},
                            }
                        ]
                    },
                }
            ]
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": arguments[9:]}}]},
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": _OK["usage"]},
    ]
    server = peer([lambda: frames, lambda: web.json_response(_OK)])
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    with Client(server.url) as client:
        session = Session(client, system="Use tools.", tools=tools, cache_salt="tenant-a", max_tokens=8)
        chunks = list(session.stream("What is 2 * (3 + 4)?"))
        assert chunks[-1].usage is not None
        [call] = session.pending_tool_calls
        assert (call.id, call.function.name, call.function.arguments) == ("call_1", "calculator", arguments)
        session.add_tool_result(call.id, "14")
        assert session.pending_tool_calls == []
        session.send()
    assert [t.cached_tokens for t in session.turns] == [8, 8]
    assert session.turns[0].finish_reason == "tool_calls"
    (first_headers, first), (second_headers, second) = server.requests
    assert first_headers["x-session-id"] == second_headers["x-session-id"] == session.session_id
    assert first["cache_salt"] == second["cache_salt"] == "tenant-a"
    assert first["tools"] == second["tools"] == tools and first["stream"] is True
    assert second["messages"][:2] == first["messages"]  # the prefix is unchanged
    assert second["messages"][2:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "14"},
    ]


def test_the_client_imports_no_torch() -> None:
    code = (
        "import sys, prefixgate\n"
        "assert 'httpx' not in sys.modules and 'aiohttp' not in sys.modules\n"
        "from prefixgate import AsyncClient, Client, Session\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'engine', 'gateway')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
