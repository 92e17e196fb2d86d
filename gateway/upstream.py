"""POST /internal/generate on one replica: token ids out, NDJSON GenerateFrames back.

What can go wrong is sorted here for the retry logic: `Retryable` means the replica failed
(unreachable, 5xx, 429, 503, stream ended without a frame) and another replica may serve the
request; an ApiError is the request's own fault (a 4xx), which every replica would repeat.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import aiohttp
import msgspec

from engine.server.protocol import ErrorBody, ErrorFrame, GenerateFrame, GenerateRequest
from gateway.errors import ApiError
from gateway.replica_http import ReplicaResponse, connections

_encoder = msgspec.json.Encoder()
_frame = msgspec.json.Decoder(GenerateFrame)
_frames = msgspec.json.Decoder(list[GenerateFrame])
_error_frame = msgspec.json.Decoder(ErrorFrame)
_error_body = msgspec.json.Decoder(ErrorFrame)
_RETRYABLE_TYPES = {"server_error", "service_unavailable", "rate_limit_exceeded"}


class Retryable(Exception):
    """The replica failed; another one may serve the request. `overloaded`: it answered 429
    (its queue is full): no fault of the replica, so it must not trip the circuit breaker."""

    def __init__(self, message: str, overloaded: bool = False) -> None:
        super().__init__(message)
        self.overloaded = overloaded


class UpstreamBroken(Exception):
    """The replica's stream broke after it had started."""


class GenerateStream:
    def __init__(self, response: aiohttp.ClientResponse | ReplicaResponse) -> None:
        self._response = response
        self.finished = False
        self._lines: list[bytes] = []  # read, not decoded yet (those after a batch's error line)
        self._ready: list[GenerateFrame] = []  # decoded, not handed out yet

    async def next(self) -> GenerateFrame | None:
        """The next frame; None once the stream ended cleanly. Raises UpstreamBroken or ApiError."""
        if not self._ready:
            self._ready = await self._read()
            if not self._ready:
                return None
        return self._ready.pop(0)

    async def next_frames(self) -> list[GenerateFrame]:
        """Every frame that has arrived (waits for one); [] once the stream ended cleanly."""
        if self._ready:
            ready, self._ready = self._ready, []
            return ready
        return await self._read()

    async def _read(self) -> list[GenerateFrame]:
        frames: list[GenerateFrame] = []
        while not frames:
            if not self._lines:
                self._lines = await self._read_lines()
                if not self._lines:
                    return []
            lines, self._lines = self._lines, []
            try:  # the common case, every line a frame: one decode for all of them
                frames = _frames.decode(b"[" + b",".join(lines) + b"]")
                continue
            except msgspec.DecodeError:
                pass  # an error line, a blank or a broken one among them: line by line
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                if line.startswith(b'{"error"'):
                    if frames:  # hand out the frames before it first, as they came
                        self._lines = lines[i:]
                        return coalesce(frames)
                    raise _error(_error_frame.decode(line).error)
                try:
                    frames.append(_frame.decode(line))
                except msgspec.DecodeError as err:
                    if frames:
                        self._lines = lines[i:]
                        return coalesce(frames)
                    raise UpstreamBroken(f"bad frame from the replica: {err}") from None
        return coalesce(frames)

    async def _read_lines(self) -> list[bytes]:
        try:
            if isinstance(self._response, ReplicaResponse):
                return await self._response.readlines()
            line = await self._response.content.readline()
            return [line] if line else []
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            raise UpstreamBroken(f"{type(err).__name__}: {err}") from None

    def close(self) -> None:
        """Closing the connection aborts the request on the replica."""
        self.finished = True
        self._response.close()


def coalesce(frames: list[GenerateFrame]) -> list[GenerateFrame]:
    """The frames of each sample that arrived together, as one frame (its tokens, logprobs and
    last finish in order; samples in the order they first appear).

    A replica sends a frame per sample per step; when several are read at once (a replica
    ahead of the gateway, or an answer that came whole) the client can have their text at once
    too, and one frame costs the detokenizer, the OpenAI shapes and the SSE encoding once
    instead of per token: on a 16-token answer that came whole, ~70 us of the gateway's CPU
    streamed, ~20 us not (bench/mock_replica.py, this project's 2-core machine).
    A sample's first frame (prompt and cached token counts) starts a frame of its own."""
    if len(frames) < 2:
        return frames
    out: list[GenerateFrame] = []
    open_frames: dict[int, GenerateFrame] = {}
    for frame in frames:
        into = open_frames.get(frame.index)
        if (
            into is None
            or into.finish_reason is not None
            or frame.prompt_tokens is not None
            or frame.cached_tokens is not None
        ):
            open_frames[frame.index] = frame
            out.append(frame)
            continue
        into.token_ids += frame.token_ids
        if frame.logprobs:
            into.logprobs = [*(into.logprobs or ()), *frame.logprobs]
        into.finish_reason, into.stop_reason = frame.finish_reason, frame.stop_reason
    return out


def _error(body: ErrorBody) -> ApiError:
    status = 503 if body.type in _RETRYABLE_TYPES else 400
    return ApiError.from_body(status, body)


_GENERATE_HEADERS = {"content-type": "application/json", "accept": "application/x-ndjson"}


@functools.lru_cache(maxsize=8)
def connect_timeout(connect_timeout_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_connect=connect_timeout_s)


async def failed_body(
    response: aiohttp.ClientResponse | ReplicaResponse, who: str, retry_statuses: tuple[int, ...]
) -> bytes:
    """The body of a non-200 answer, for the caller to shape into an ApiError; raises Retryable
    when another replica may do better (a 5xx, one of `retry_statuses`, a body that broke)."""
    try:
        raw = await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as err:
        raise Retryable(f"{type(err).__name__}: {err}") from None
    finally:
        response.release()
    if response.status == 429 and 429 in retry_statuses:
        raise Retryable(f"{who} answered 429", overloaded=True)
    if response.status in retry_statuses or response.status >= 500:
        raise Retryable(f"{who} answered {response.status}")
    return raw


async def open_generate(
    session: aiohttp.ClientSession,
    url: str,
    request: GenerateRequest,
    connect_timeout_s: float,
    trace_headers: dict[str, str] | None = None,
    while_waiting: Callable[[], None] | None = None,
) -> GenerateStream:
    """Send the request; `while_waiting` runs once it is on its way (ReplicaConnections.post)."""
    headers = {**_GENERATE_HEADERS, **trace_headers} if trace_headers else _GENERATE_HEADERS
    body = _encoder.encode(request)
    response: aiohttp.ClientResponse | ReplicaResponse
    try:
        if url.startswith("http://"):  # the hot path: gateway/replica_http.py says why
            response = await connections().post(
                url + "/internal/generate", body, headers, connect_timeout_s, while_waiting
            )
        else:
            if while_waiting is not None:
                while_waiting()
            timeout = connect_timeout(connect_timeout_s)
            response = await session.post(
                url + "/internal/generate", data=body, headers=headers, timeout=timeout
            )
    except (aiohttp.ClientError, OSError, TimeoutError) as err:
        raise Retryable(f"{type(err).__name__}: {err}") from None
    if response.status == 200:
        return GenerateStream(response)
    raw = await failed_body(response, "the replica", retry_statuses=(429,))
    try:
        body = _error_body.decode(raw).error
    except msgspec.DecodeError:
        body = ErrorBody(message=f"the replica answered {response.status}", type="invalid_request_error")
    raise ApiError.from_body(response.status, body)
