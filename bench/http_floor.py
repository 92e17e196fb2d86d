"""The least a Python HTTP router can add: HTTP parsed both ways, nothing else done.

    python -m bench.http_floor --port 9000 --upstream 127.0.0.1:8000

For each client request (parsed with httptools, keep-alive), it sends one fixed token request
to the mock replica's /internal/generate (as our gateway does, one upstream connection per
client connection, kept alive), parses the answer with httptools, and answers the client with
fixed OpenAI-shaped bytes: a chat completion once the replica's answer is complete, or, when
the request body asks for a stream, one SSE chunk per token frame as the frames arrive and
`data: [DONE]`. No JSON is decoded, no template rendered, nothing tokenized, routed or
detokenized: bench/gateway_latency.py puts it in front of the mock as the floor for a Python
router that speaks HTTP (bench/tcp_pipe.py is the floor for one that only copies bytes).
"""

from __future__ import annotations

import asyncio
import json

import httptools

from bench import tcp_pipe

_TOKEN_REQUEST = json.dumps({"token_ids": list(range(1000, 1040)), "max_tokens": 16}).encode()
_UPSTREAM_REQUEST = (
    b"POST /internal/generate HTTP/1.1\r\nHost: replica\r\nContent-Type: application/json\r\n"
    b"Accept: application/x-ndjson\r\nContent-Length: %d\r\n\r\n%s" % (len(_TOKEN_REQUEST), _TOKEN_REQUEST)
)
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-floor",
        "object": "chat.completion",
        "created": 0,
        "model": "floor",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The capital of France is Paris."},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": 16, "total_tokens": 56},
    }
).encode()
_JSON_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(_COMPLETION),
    _COMPLETION,
)
_STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
_CHUNK = json.dumps(
    {
        "id": "chatcmpl-floor",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "floor",
        "choices": [{"index": 0, "delta": {"content": " Paris"}, "finish_reason": None}],
    }
).encode()
_SSE_EVENT = b"data: " + _CHUNK + b"\n\n"
_DONE = b"data: [DONE]\n\n"


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Upstream(asyncio.Protocol):
    """The replica side: parses each answer and hands its token frames to the client side."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.client.frames(body.count(b"\n"))

    def on_message_complete(self) -> None:
        self.client.answer_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class _Client(tcp_pipe.PipedClient):
    """The client side: one request at a time, each sent on to the replica as it completes."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.stream = False

    def upstream_protocol(self) -> asyncio.Protocol:
        return _Upstream(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.stream = b'"stream": true' in b"".join(self.body)
        self.body.clear()
        if self.stream:
            self.transport.write(_STREAM_HEAD)
        self.send_upstream(_UPSTREAM_REQUEST)

    def frames(self, count: int) -> None:
        if self.stream and count:
            self.transport.write(_http_chunk(_SSE_EVENT * count))

    def answer_complete(self) -> None:
        if self.stream:
            self.transport.write(_http_chunk(_DONE) + b"0\r\n\r\n")
        else:
            self.transport.write(_JSON_ANSWER)


if __name__ == "__main__":
    tcp_pipe.main(__doc__, _Client)
