"""prefixgate's public face: the Python client, sessions, and (with the `langchain` extra)
`prefixgate.langchain.ChatPrefixgate`.

    from prefixgate import Client, Session

Names load on first use, so `import prefixgate` (and the `prefixgate` command) stays light:
no torch, no HTTP library until a client is made.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefixgate._http import RetryPolicy
    from prefixgate.async_client import AsyncClient, AsyncStream
    from prefixgate.client import Client, Stream
    from prefixgate.errors import (
        APIError,
        BadRequestError,
        ConnectionError,
        InternalServerError,
        NotFoundError,
        PrefixgateError,
        RateLimitError,
        ServiceUnavailableError,
        TimeoutError,
    )
    from prefixgate.session import AsyncSession, Session, Turn
    from prefixgate.types import ChatCompletion, ChatCompletionChunk, Completion, Model, Usage

_WHERE = {
    "Client": "prefixgate.client",
    "Stream": "prefixgate.client",
    "AsyncClient": "prefixgate.async_client",
    "AsyncStream": "prefixgate.async_client",
    "Session": "prefixgate.session",
    "AsyncSession": "prefixgate.session",
    "Turn": "prefixgate.session",
    "RetryPolicy": "prefixgate._http",
    "ChatCompletion": "prefixgate.types",
    "ChatCompletionChunk": "prefixgate.types",
    "Completion": "prefixgate.types",
    "Model": "prefixgate.types",
    "Usage": "prefixgate.types",
    **{
        name: "prefixgate.errors"
        for name in (
            "PrefixgateError",
            "APIError",
            "BadRequestError",
            "NotFoundError",
            "RateLimitError",
            "ServiceUnavailableError",
            "InternalServerError",
            "ConnectionError",
            "TimeoutError",
        )
    },
}

__all__ = [
    "APIError",
    "AsyncClient",
    "AsyncSession",
    "AsyncStream",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Client",
    "Completion",
    "ConnectionError",
    "InternalServerError",
    "Model",
    "NotFoundError",
    "PrefixgateError",
    "RateLimitError",
    "RetryPolicy",
    "ServiceUnavailableError",
    "Session",
    "Stream",
    "TimeoutError",
    "Turn",
    "Usage",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'prefixgate' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
