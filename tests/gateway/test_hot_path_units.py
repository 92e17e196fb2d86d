"""The gateway's hot path, piece by piece: its HTTP client to replicas (against a real socket
server speaking raw HTTP/1.1), frames read in bursts, the ASGI front of the completion
routes against Litestar's own answers, cached metric children, the detokenizer's fast path."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.detokenizer import IncrementalDetokenizer
from engine.server.protocol import GenerateFrame
from gateway.app import GatewayApp
from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics
from gateway.replica_http import ReplicaConnections
from gateway.text import GatewayTokenizer
from gateway.upstream import GenerateStream, coalesce

_Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


def _frame(index: int, token: int, finish: str | None = None) -> bytes:
    body: dict[str, Any] = {"index": index, "token_ids": [token]}
    if finish:
        body["finish_reason"] = finish
    return json.dumps(body).encode() + b"\n"


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class RawReplica:
    """Answers each POST with the next scripted answer; counts connections and their ends."""

    def __init__(self, answers: list[_Answer]) -> None:
        self.answers = answers
        self.connections = 0
        self.closed_by_client = asyncio.Event()
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/internal/generate"

    async def __aenter__(self) -> RawReplica:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                await self.answers.pop(0)(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
        finally:
            writer.close()


def _ndjson_head() -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"


def whole_stream(tokens: int) -> _Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        frames = b"".join(_frame(0, t, "length" if t == tokens - 1 else None) for t in range(tokens))
        writer.write(_ndjson_head() + _chunk(frames) + b"0\r\n\r\n")
        await writer.drain()

    return answer


def endless_stream() -> _Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(_ndjson_head())
        for t in range(100_000):
            writer.write(_chunk(_frame(0, t)))
            await writer.drain()
            await asyncio.sleep(0.005)

    return answer


def then_close(answer: _Answer) -> _Answer:
    async def closing(writer: asyncio.StreamWriter) -> None:
        await answer(writer)
        writer.close()  # no Connection: close header: the client finds out when it reuses it

    return closing


async def _read_all(stream: GenerateStream) -> list[int]:
    tokens = []
    while frames := await stream.next_frames():
        tokens += [t for f in frames for t in f.token_ids]
    return tokens


def test_a_connection_read_to_its_end_is_reused() -> None:
    async def main() -> None:
        async with RawReplica([whole_stream(5), whole_stream(3)]) as replica:
            pool = ReplicaConnections()
            for tokens in (5, 3):
                response = await pool.post(replica.url, b"{}", {}, 5.0)
                assert await _read_all(GenerateStream(response)) == list(range(tokens))
            assert replica.connections == 1
            pool.close()

    asyncio.run(main())


def test_an_aborted_stream_closes_its_connection() -> None:
    async def main() -> None:
        async with RawReplica([endless_stream(), whole_stream(2)]) as replica:
            pool = ReplicaConnections()
            stream = GenerateStream(await pool.post(replica.url, b"{}", {}, 5.0))
            assert (await stream.next()) is not None
            stream.close()  # the client went away: the replica must see the connection end
            await asyncio.wait_for(replica.closed_by_client.wait(), 10.0)
            response = await pool.post(replica.url, b"{}", {}, 5.0)
            assert await _read_all(GenerateStream(response)) == [0, 1]
            assert replica.connections == 2
            pool.close()

    asyncio.run(main())


def test_an_idle_connection_the_replica_closed_is_replaced() -> None:
    async def main() -> None:
        async with RawReplica([then_close(whole_stream(2)), whole_stream(4)]) as replica:
            pool = ReplicaConnections()
            assert await _read_all(GenerateStream(await pool.post(replica.url, b"{}", {}, 5.0))) == [0, 1]
            response = await pool.post(replica.url, b"{}", {}, 5.0)
            assert await _read_all(GenerateStream(response)) == [0, 1, 2, 3]
            assert replica.connections == 2
            pool.close()

    asyncio.run(main())


def test_a_burst_of_frames_comes_as_one_frame_per_sample_and_an_error_after_them() -> None:
    error = {"error": {"message": "the replica is draining", "type": "service_unavailable"}}

    async def burst(writer: asyncio.StreamWriter) -> None:
        frames = _frame(0, 7) + _frame(1, 70) + _frame(0, 8) + b"\n" + _frame(0, 9) + _frame(1, 71, "stop")
        writer.write(_ndjson_head() + _chunk(frames + json.dumps(error).encode() + b"\n") + b"0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with RawReplica([burst]) as replica:
            pool = ReplicaConnections()
            stream = GenerateStream(await pool.post(replica.url, b"{}", {}, 5.0))
            first = await stream.next()
            assert first is not None and (first.index, first.token_ids) == (0, [7, 8, 9])
            (second,) = await stream.next_frames()
            assert (second.index, second.token_ids, second.finish_reason) == (1, [70, 71], "stop")
            with pytest.raises(ApiError) as raised:
                await stream.next_frames()
            assert raised.value.status == 503
            stream.close()
            pool.close()

    asyncio.run(main())


def _parsed(*frames: dict[str, Any]) -> list[GenerateFrame]:
    return [msgspec.convert(f, GenerateFrame) for f in frames]


def test_coalesced_frames_keep_each_samples_tokens_logprobs_and_end() -> None:
    lp = [[5, -0.5, [[5, -0.5]]], [6, -0.25, [[6, -0.25]]], [7, -1.0, []]]
    frames = _parsed(
        {"index": 0, "token_ids": [5], "logprobs": [lp[0]], "prompt_tokens": 9, "cached_tokens": 0},
        {"index": 1, "token_ids": [6], "logprobs": [lp[1]], "prompt_tokens": 9, "cached_tokens": 0},
        {"index": 0, "token_ids": [6, 7], "logprobs": lp[1:]},
        {"index": 0, "token_ids": [8], "logprobs": [lp[0]], "finish_reason": "stop", "stop_reason": 8},
        {"index": 0, "token_ids": [9]},  # after its end (never sent): not merged into a finished one
    )
    out = coalesce(frames)
    assert [(f.index, f.token_ids, f.finish_reason, f.stop_reason) for f in out] == [
        (0, [5, 6, 7, 8], "stop", 8),
        (1, [6], None, None),
        (0, [9], None, None),
    ]
    assert out[0].logprobs is not None and [e.token_id for e in out[0].logprobs] == [5, 6, 7, 5]
    assert (out[0].prompt_tokens, out[0].cached_tokens) == (9, 0)
    # A sample's first frame (its counts) starts a frame of its own, even mid-burst.
    first_frame = {"index": 0, "token_ids": [2], "prompt_tokens": 3}
    again = coalesce(_parsed({"index": 0, "token_ids": [1]}, first_frame))
    assert [f.token_ids for f in again] == [[1], [2]]


async def _asgi(app: Any, method: str, path: str, body: bytes, length: bool = True) -> list[dict[str, Any]]:
    headers = [(b"host", b"test"), (b"content-type", b"application/json")]
    if length:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "state": {},
    }
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []
    answered = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop()
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    await app(scope, receive, send)
    return sent


def _answer(sent: list[dict[str, Any]]) -> tuple[int, dict[bytes, bytes], bytes]:
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", b"not json"),
        ("/v1/chat/completions", b""),
        ("/v1/chat/completions", b'{"messages": 3}'),
        ("/v1/completions", b'{"prompt": "hi", "model": "none"}'),
        ("/v1/completions", b"[]"),
    ],
)
def test_the_asgi_front_answers_errors_as_litestar_does(path: str, body: bytes) -> None:
    gateway = GatewayApp(GatewayConfig())  # no replica: every valid request is a 503

    async def main() -> None:
        ours = _answer(await _asgi(gateway, "POST", path, body))
        litestar = _answer(await _asgi(gateway.litestar, "POST", path, body))
        assert ours == litestar
        assert ours[0] >= 400 and b'"error"' in ours[2]

    asyncio.run(main())


def test_unusual_requests_on_the_hot_routes_go_to_litestar() -> None:
    gateway = GatewayApp(GatewayConfig())

    async def main() -> None:
        wrong_method = _answer(await _asgi(gateway, "GET", "/v1/chat/completions", b""))
        assert wrong_method[0] == 405
        assert wrong_method == _answer(await _asgi(gateway.litestar, "GET", "/v1/chat/completions", b""))
        chunked = _answer(await _asgi(gateway, "POST", "/v1/completions", b"{}", length=False))
        assert chunked == _answer(
            await _asgi(gateway.litestar, "POST", "/v1/completions", b"{}", length=False)
        )

    asyncio.run(main())


def test_metric_children_are_kept_and_count_like_labels() -> None:
    metrics = GatewayMetrics()
    child = metrics.child(metrics.requests, "http://a", "ok")
    assert metrics.child(metrics.requests, "http://a", "ok") is child
    child.inc()
    metrics.child(metrics.requests, "http://a", "error").inc(2)
    assert metrics.requests.labels("http://a", "ok")._value.get() == 1
    assert metrics.requests.labels("http://a", "error")._value.get() == 2
    assert b'prefixgate_gateway_requests_total{outcome="ok",replica="http://a"} 1.0' in metrics.render()[0]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> GatewayTokenizer:
    return GatewayTokenizer(smollm2_dir)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=60))
def test_the_detokenizer_without_stop_strings_streams_what_the_held_back_path_does(
    tokenizer: GatewayTokenizer, text: str
) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    fast = IncrementalDetokenizer(tokenizer.tokenizer, ())
    held = IncrementalDetokenizer(tokenizer.tokenizer, ("\x00never there\x00",))
    fast_pieces = [fast.push(t) for t in ids] + [fast.flush()]
    held_text = "".join(held.push(t) for t in ids) + held.flush()
    assert "".join(fast_pieces) == held_text == fast.text
    whole = tokenizer.tokenizer.decode(ids)
    if "\ufffd" not in whole:  # a stream holds back bytes that form no character; decode() does not
        assert fast.text == whole
    assert fast.stop_string is None


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(min_size=1, max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=6),
    stop=st.sampled_from([(), ("e",), ("the", "\n"), ("\x00never there\x00",)]),
)
def test_pushing_tokens_in_bursts_gives_what_pushing_them_one_by_one_does(
    tokenizer: GatewayTokenizer, text: str, cuts: list[int], stop: tuple[str, ...]
) -> None:
    """push_many (a frame's or a burst's tokens at once) streams the same text, stops at the
    same token and counts the same tokens as push() one at a time."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    one = IncrementalDetokenizer(tokenizer.tokenizer, stop)
    one_text, one_used = "", 0
    for token_id in ids:
        if one.stop_string is not None:
            break
        one_text += one.push(token_id)
        one_used += 1
    bursts = IncrementalDetokenizer(tokenizer.tokenizer, stop)
    bounds = sorted({0, len(ids), *(c for c in cuts if c < len(ids))})
    burst_text, burst_used = "", 0
    for start, end in itertools.pairwise(bounds):
        text_part, used = bursts.push_many(ids[start:end])
        burst_text += text_part
        burst_used += used
        if bursts.stop_string is not None:
            break
    assert (burst_text, burst_used, bursts.stop_string) == (one_text, one_used, one.stop_string)
    assert burst_text + bursts.flush() == one_text + one.flush()
    if bursts.stop_string is not None:
        assert bursts.push_many(ids) == ("", 0)  # nothing more once stopped
