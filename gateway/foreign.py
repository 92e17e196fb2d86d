"""Forwarding to a foreign OpenAI-compatible backend (vLLM, SGLang, `transformers serve`...).

Such a backend has no token-level API, so the gateway sends its already-templated token ids
as the `prompt` of a streamed POST /v1/completions (vLLM and SGLang take token-id prompts),
passes the stop strings along (the backend stops on them; there are no token ids to
detokenize here) and turns each SSE chunk into TextFrames. Failures are sorted like
upstream.py's: Retryable before the stream starts, UpstreamBroken after, ApiError for a 4xx.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from engine.server.protocol import GenerateRequest
from gateway.errors import ApiError
from gateway.upstream import Retryable, UpstreamBroken, connect_timeout, failed_body

_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class TextFrame:
    """One choice's text delta, or (index None) the usage the backend reports at the end."""

    index: int | None
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


def completion_body(model: str, request: GenerateRequest, stop: Sequence[str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": request.token_ids,
        "max_tokens": request.max_tokens,
        "n": request.n,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # Extensions vLLM and SGLang accept; sent only when they change something.
    extras = {
        "seed": request.seed,
        "stop": list(stop) or None,
        "top_k": request.top_k or None,
        "min_p": request.min_p or None,
        "repetition_penalty": request.repetition_penalty if request.repetition_penalty != 1.0 else None,
        "ignore_eos": request.ignore_eos or None,
        "stop_token_ids": request.stop_token_ids or None,
        "cache_salt": request.cache_salt,
    }
    body.update({k: v for k, v in extras.items() if v is not None})
    grammar = request.grammar
    if grammar is not None:
        # JSON constraints travel as `response_format`, which vLLM and SGLang take on
        # /v1/completions too. Lark grammars (forced tool calls) are llguidance's dialect,
        # which no foreign backend is known to speak: refused, not silently unenforced.
        if grammar.kind == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif grammar.kind == "json_schema":
            schema = json.loads(grammar.text)
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": schema},
            }
        else:
            raise ApiError(
                400,
                "tool_choice 'required' or a named function needs a prefixgate replica; this model's "
                "backend cannot be constrained to a tool call (use tool_choice 'auto')",
                param="tool_choice",
            )
    return body


class ForeignStream:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._pending: deque[TextFrame] = deque()
        self._done = False

    async def next(self) -> TextFrame | None:
        while not self._pending:
            if self._done:
                return None
            await self._read_event()
        return self._pending.popleft()

    async def _read_event(self) -> None:
        try:
            line = await self._response.content.readline()
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            raise UpstreamBroken(f"{type(err).__name__}: {err}") from None
        if not line:
            self._done = True
            return
        line = line.strip()
        if not line.startswith(b"data:"):
            return  # blank separators, comments, event names
        data = line[5:].strip()
        if data == b"[DONE]":
            self._done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError as err:
            raise UpstreamBroken(f"bad SSE chunk from the backend: {err}") from None
        if not isinstance(chunk, dict):
            raise UpstreamBroken("bad SSE chunk from the backend: not an object")
        if "error" in chunk:
            error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            raise UpstreamBroken(f"the backend failed: {error.get('message', error)}")
        for choice in chunk.get("choices") or []:
            self._pending.append(
                TextFrame(int(choice.get("index", 0)), choice.get("text") or "", choice.get("finish_reason"))
            )
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details") or {}
            self._pending.append(
                TextFrame(
                    None,
                    prompt_tokens=usage.get("prompt_tokens"),
                    completion_tokens=usage.get("completion_tokens"),
                    cached_tokens=details.get("cached_tokens") if isinstance(details, dict) else None,
                )
            )

    def close(self) -> None:
        """Closing the connection makes vLLM / SGLang abort the request."""
        self._done = True
        self._response.close()


async def open_foreign(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    request: GenerateRequest,
    stop: Sequence[str],
    connect_timeout_s: float,
    trace_headers: dict[str, str] | None = None,
) -> ForeignStream:
    timeout = connect_timeout(connect_timeout_s)
    headers = {"content-type": "application/json", "accept": "text/event-stream", **(trace_headers or {})}
    try:
        response = await session.post(
            url + "/v1/completions",
            data=_encoder.encode(completion_body(model, request, stop)),
            headers=headers,
            timeout=timeout,
        )
    except (aiohttp.ClientError, OSError, TimeoutError) as err:
        raise Retryable(f"{type(err).__name__}: {err}") from None
    if response.status == 200:
        return ForeignStream(response)
    raw = await failed_body(response, "the backend", retry_statuses=(408, 429))
    message = f"the backend answered {response.status}"
    try:
        error = json.loads(raw).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
    except (ValueError, AttributeError):
        pass
    raise ApiError(response.status, message)
