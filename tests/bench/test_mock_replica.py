"""The mock replica that bench/gateway_latency.py puts behind each router: what it answers and when.

Unpaced, a streamed answer is whole (every token frame, SSE chunk and [DONE]) and goes out in
one write; paced, token i comes no earlier than i intervals after the first, and a non-streamed
answer no earlier than its last token would.
"""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
from aiohttp.test_utils import TestClient, TestServer

from bench.mock_replica import OUTPUT_TOKENS, MockReplica, _Writer, default_model_folder
from engine.server.protocol import GenerateFrame

INTERVAL_S = 0.005


async def _client(interval_s: float) -> tuple[TestClient, MockReplica]:
    mock = MockReplica(default_model_folder(), interval_s)
    client = TestClient(TestServer(mock.app()))
    await client.start_server()
    return client, mock


class _RecordedResponse:
    """What _Writer calls of aiohttp's StreamResponse, recorded."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.ended = False

    async def write(self, data: bytes) -> None:
        self.writes.append(data)

    async def write_eof(self) -> None:
        self.ended = True


def test_an_unpaced_answer_is_one_write_and_a_paced_one_a_write_per_frame() -> None:
    async def run(paced: bool) -> list[bytes]:
        response = _RecordedResponse()
        writer = _Writer(response, paced)  # type: ignore[arg-type]
        for frame in (b"a", b"b", b"c"):
            await writer.write(frame)
        await writer.close()
        assert response.ended
        return response.writes

    assert asyncio.run(run(paced=False)) == [b"abc"]
    assert asyncio.run(run(paced=True)) == [b"a", b"b", b"c"]


def test_unpaced_token_frames_are_whole() -> None:
    async def run() -> None:
        client, mock = await _client(0.0)
        try:
            response = await client.post("/internal/generate", json={"token_ids": [1, 2, 3], "max_tokens": 8})
            data = await response.read()
        finally:
            await client.close()
        frames = [msgspec.json.decode(line, type=GenerateFrame) for line in data.splitlines()]
        assert [f.token_ids[0] for f in frames] == mock.token_ids[:8]
        assert frames[0].prompt_tokens == 3 and frames[0].cached_tokens == 0
        assert [f.finish_reason for f in frames] == [None] * 7 + ["length"]

    asyncio.run(run())


def test_unpaced_chat_stream_is_every_chunk_then_done() -> None:
    async def run() -> None:
        client, mock = await _client(0.0)
        try:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            response = await client.post("/v1/chat/completions", json=body)
            text = (await response.read()).decode()
        finally:
            await client.close()
        events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) == OUTPUT_TOKENS + 2  # the role chunk, one per token, the finish chunk
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:])
        assert content == "".join(mock.pieces)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    asyncio.run(run())


def test_paced_tokens_keep_their_clock() -> None:
    async def run() -> None:
        client, _ = await _client(INTERVAL_S)
        try:
            started = time.monotonic()
            response = await client.post("/internal/generate", json={"token_ids": [1], "max_tokens": 6})
            arrivals = []
            async for _ in response.content:  # one NDJSON line per frame
                arrivals.append(time.monotonic() - started)
            started = time.monotonic()
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
            answer = await (await client.post("/v1/chat/completions", json=body)).json()
            whole_s = time.monotonic() - started
        finally:
            await client.close()
        assert len(arrivals) == 6
        for i, at in enumerate(arrivals):
            assert at >= i * INTERVAL_S * 0.99, arrivals
        assert whole_s >= 5 * INTERVAL_S * 0.99
        assert answer["usage"]["completion_tokens"] == 6

    asyncio.run(run())
