"""POST /v1/chat/completions and /v1/completions served as plain ASGI, in front of Litestar.

Litestar's per-request machinery (routing, Request and Headers objects, signature parsing,
the Response -> ASGIResponse conversion, and for a stream an anyio task group that listens
for the disconnect) cost ~50 us of CPU per JSON answer and ~190 us per stream on this 2-core
machine, a large share of the gateway's whole cost on a fast replica. These two routes are
the hot path, so they run the very same handler functions (openai_api, unchanged) but are
answered here: one dict of headers, one `http.response.start`, the body as it comes. Every
other route, and these two when not POSTed, goes to Litestar, which stays the reference:
errors are shaped by the same functions (engine/server/errors.py). The front in
gateway/app.py checks size, key and admission first and answers its refusals with refuse().
Measured with bench/mock_replica.py (16 tokens), this alone took the gateway process's CPU
per request from 1.45 to 1.24 ms (JSON) and from 1.76 to 1.07 ms (stream). The front adds
~0.5 us per request open, ~1.1 us with 1,000 keys (timeit, 2-core AMD EPYC).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from litestar import Litestar, Response
from litestar.exceptions import HTTPException
from litestar.response import Stream

from engine.server.errors import handle_http_exception
from gateway import openai_api
from gateway.auth import Refusal
from gateway.errors import ApiError, error_json

log = logging.getLogger("prefixgate.gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# After refusing a request, read and drop at most this much of its body, so that a client
# that sends all of it before reading (urllib, http.client) finds the answer rather than a
# connection reset; past it, uvicorn drops the rest itself while the connection stays open.
_DRAIN_LIMIT_BYTES = 64 << 20
_STREAM_FAILED = b"data: " + error_json(ApiError(500, "internal server error")) + b"\n\ndata: [DONE]\n\n"
_HANDLERS: dict[str, Any] = {
    "/v1/chat/completions": openai_api.chat_completions.fn,
    "/v1/completions": openai_api.completions.fn,
}


class HotRequest:
    """What openai_api's handlers read of a Litestar Request: scope, headers, body, receive, app.state."""

    __slots__ = ("_body", "app", "headers", "receive", "scope")

    def __init__(
        self, app: Litestar, scope: Scope, headers: dict[str, str], body: bytes, receive: Receive
    ) -> None:
        self.app = app
        self.scope = scope
        self.headers = headers
        self.receive = receive
        self._body = body

    async def body(self) -> bytes:
        return self._body


def hot_handler(method: str, path: str) -> Any | None:
    """The handler serving this request here, or None to leave it to Litestar."""
    return _HANDLERS.get(path) if method == "POST" else None


def request_headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1")
        if key not in headers:  # the first of repeated headers, as Litestar's Headers.get
            headers[key] = value.decode("latin-1")
    return headers


async def refuse(send: Send, receive: Receive, headers: dict[str, str], refusal: Refusal) -> None:
    """Answer a Refusal at once, then read what the client still sends of its body (bounded)."""
    head = _head("application/json", refusal.headers)
    head.append((b"content-length", str(len(refusal.body)).encode()))
    await send({"type": "http.response.start", "status": refusal.status, "headers": head})
    if headers.get("expect", "").lower() == "100-continue":
        # The client waits for a 100 Continue before sending its body; reading now would send
        # one (uvicorn does on the first receive), so it gets the answer without sending it.
        await send({"type": "http.response.body", "body": refusal.body, "more_body": False})
        return
    await send({"type": "http.response.body", "body": refusal.body, "more_body": True})
    await _drain(receive)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _drain(receive: Receive) -> None:
    drained = 0
    while drained <= _DRAIN_LIMIT_BYTES:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        drained += len(message.get("body", b""))


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body (a Content-Length one, or chunked); None when the client left first.
    Raises BodyTooLarge as soon as it passes `limit`, holding no more than that."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class BodyTooLarge(Exception):
    pass


async def serve(
    app: Litestar,
    handler: Any,
    scope: Scope,
    headers: dict[str, str],
    receive: Receive,
    send: Send,
    too_large: Refusal,
    max_body_bytes: int,
) -> None:
    """Read the body and answer the request (the front has checked its key and admitted it)."""
    try:
        body = await read_body(receive, max_body_bytes)
    except BodyTooLarge:
        await refuse(send, receive, headers, too_large)
        return
    if body is None:
        return  # the client left before its body arrived: nobody to answer
    request = HotRequest(app, scope, headers, body, receive)
    try:
        response = await handler(request)
    except ApiError as err:
        await _send_whole(send, err.status, error_json(err), "application/json", err.headers)
        return
    except HTTPException as exc:  # Litestar's own (none expected here): shaped as Litestar would
        answer = handle_http_exception(None, exc)  # type: ignore[arg-type]  # it reads no request
        await _send_whole(send, answer.status_code or 500, answer.content, answer.media_type, answer.headers)
        return
    except Exception:
        log.exception("unexpected error in POST %s", scope["path"])
        await _send_whole(send, 500, error_json(ApiError(500, "internal server error")), "application/json")
        return
    if isinstance(response, Stream):
        await _send_stream(response, receive, send)
    else:
        assert isinstance(response, Response)
        await _send_whole(
            send, response.status_code or 200, response.content, response.media_type, response.headers
        )


def _head(media_type: Any, headers: dict[str, Any] | None) -> list[tuple[bytes, bytes]]:
    out = [
        (name.lower().encode("latin-1"), str(value).encode("latin-1"))
        for name, value in (headers or {}).items()
    ]
    media = str(media_type)
    out.append(
        (b"content-type", (f"{media}; charset=utf-8" if media.startswith("text/") else media).encode())
    )
    return out


async def _send_whole(
    send: Send, status: int, body: bytes, media_type: Any, headers: dict[str, Any] | None = None
) -> None:
    head = _head(media_type, headers)
    head.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_stream(response: Stream, receive: Receive, send: Send) -> None:
    # One watcher task cancels the stream when the client goes away (Litestar's Stream runs an
    # anyio task group for this); the stream's generator then closes the upstream request.
    iterator: AsyncIterator[bytes] = response.iterator  # type: ignore[assignment]
    streaming = asyncio.current_task()
    assert streaming is not None
    gone = False

    async def disconnected() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        streaming.cancel()

    watcher = asyncio.ensure_future(disconnected())
    try:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": _head(response.media_type, response.headers),
            }
        )
        async for chunk in iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        watcher.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not gone:
            raise
        streaming.uncancel()
    except Exception:
        # A fault of ours after the 200 went out: the client gets an error event and the end
        # of the stream, as for a replica's failure; the details stay in the log.
        log.exception("unexpected error in a stream")
        watcher.cancel()
        await send({"type": "http.response.body", "body": _STREAM_FAILED, "more_body": False})
    finally:
        watcher.cancel()
        await iterator.aclose()  # type: ignore[attr-defined]
