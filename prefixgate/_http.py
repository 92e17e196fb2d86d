"""What the sync and async clients share: base URLs, request bodies, headers, retry delays
and the server-sent-events framing. No I/O here."""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar
from urllib.parse import urlsplit

import msgspec

from prefixgate.errors import APIError, stream_error

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"
SESSION_HEADER = "x-session-id"
RETRYABLE_STATUS = frozenset({429, 503})
USER_AGENT = "prefixgate-client/0.1"

T = TypeVar("T")
_ERROR_FRAME = re.compile(rb'^\s*\{\s*"error"\s*:')


class GenerationParams(TypedDict, total=False):
    """Body fields both endpoints take (OpenAI's, and the vLLM extras prefixgate honours)."""

    model: str
    max_tokens: int
    n: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    stop: str | list[str]
    stop_token_ids: list[int]
    seed: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: dict[str, float]
    ignore_eos: bool
    user: str
    cache_salt: str
    extra_body: Mapping[str, Any]


class ChatParams(GenerationParams, total=False):
    max_completion_tokens: int
    logprobs: bool
    top_logprobs: int
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    response_format: dict[str, Any]


class CompletionParams(GenerationParams, total=False):
    logprobs: int
    echo: bool


def normalize_base_url(base_url: str) -> str:
    """`http://host:8080` and `http://host:8080/v1/` both mean `http://host:8080/v1`."""
    url = base_url.rstrip("/")
    if urlsplit(url).path in ("", "/"):
        url += "/v1"
    return url


def request_body(
    fixed: Mapping[str, Any], params: Mapping[str, Any], default_model: str, stream: bool
) -> dict[str, Any]:
    """The JSON body: the endpoint's input, the caller's params (None means left out), stream flags."""
    body: dict[str, Any] = {"model": default_model, **fixed}
    for key, value in params.items():
        if key == "extra_body":
            continue
        if value is not None:
            body[key] = value
    if stream:
        body["stream"] = True
        # Usage (with cached_tokens) arrives in a last chunk only when asked for.
        body.setdefault("stream_options", {"include_usage": True})
    body.update(params.get("extra_body") or {})
    return body


def request_headers(
    api_key: str | None, session_id: str | None, extra: Mapping[str, str] | None
) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if session_id:
        headers[SESSION_HEADER] = session_id
    headers.update(extra or {})
    return headers


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for 429 / 503 answers and refused connections.

    A Retry-After header, when sent, sets the wait instead (capped by max_retry_after).
    """

    max_retries: int = 2
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0 is the first retry)."""
        told = parse_retry_after(retry_after)
        if told is not None:
            return min(told, self.max_retry_after)
        ceiling = min(self.max_backoff, self.initial_backoff * 2**attempt)
        return self.rng.uniform(ceiling / 2, ceiling)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds, or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def sse_data(line: bytes) -> bytes | None:
    """The payload of one `data:` line of an event stream (None for others, comments, [DONE])."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if not data or data == b"[DONE]":
        return None
    return data


def decode_chunk(data: bytes, into: type[T]) -> T:
    """One streamed chunk; an error frame is raised as the APIError it carries."""
    if _ERROR_FRAME.match(data):
        error = stream_error(msgspec.json.decode(data))
        if error is not None:
            raise error
    return msgspec.json.decode(data, type=into)


def decode_body(data: bytes, into: type[T]) -> T:
    try:
        return msgspec.json.decode(data, type=into)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise APIError(f"unreadable response ({err}): {data[:300]!r}", type="invalid_response") from None


def messages_list(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if isinstance(messages, (str, bytes)):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts, not a string")
    return list(messages)
