"""The client's exceptions.

PrefixgateError
├── APIError (the server answered with an error: status, type, code, param, message)
│   ├── BadRequestError (400, 413, 422: fix the request)
│   ├── NotFoundError (404: unknown model or route)
│   ├── RateLimitError (429: retried with backoff, honouring Retry-After)
│   ├── ServiceUnavailableError (503: retried likewise)
│   └── InternalServerError (any other 5xx)
└── ConnectionError (no answer: refused, reset, or a timeout)
    └── TimeoutError

ConnectionError and TimeoutError shadow the builtins of the same names inside this module
only; import them as `prefixgate.ConnectionError` and so on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from prefixgate.types import ErrorBody, ErrorEnvelope


class PrefixgateError(Exception):
    """Every error the client raises."""


class APIError(PrefixgateError):
    """The server answered with an OpenAI-style error body (or a stream carried one).

    `status` is None for an error sent inside a stream, after the 200 was out.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | int | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        prefix = f"{status} " if status is not None else ""
        super().__init__(f"{prefix}{type or 'error'}: {message}")
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


class BadRequestError(APIError):
    pass


class NotFoundError(APIError):
    pass


class RateLimitError(APIError):
    pass


class ServiceUnavailableError(APIError):
    pass


class InternalServerError(APIError):
    pass


class ConnectionError(PrefixgateError):
    """The request got no answer: connection refused or reset, DNS, or a timeout."""


class TimeoutError(ConnectionError):
    pass


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    413: BadRequestError,
    422: BadRequestError,
    404: NotFoundError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}
# An error inside a stream has no status of its own: its type tells what it was.
_BY_TYPE: dict[str, type[APIError]] = {
    "invalid_request_error": BadRequestError,
    "rate_limit_exceeded": RateLimitError,
    "service_unavailable": ServiceUnavailableError,
}


def error_for(status: int | None, body: bytes, headers: Mapping[str, str] | None = None) -> APIError:
    """The exception for an error answer; a body that is not OpenAI-style is kept as the message."""
    try:
        error: ErrorBody = msgspec.json.decode(body, type=ErrorEnvelope).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        text = body.decode(errors="replace").strip()[:500]
        error = ErrorBody(message=text or "(empty body)")
    return error_from_body(status, error, headers)


def error_from_body(
    status: int | None, error: ErrorBody, headers: Mapping[str, str] | None = None
) -> APIError:
    if status is not None:
        cls = _BY_STATUS.get(status, InternalServerError if status >= 500 else APIError)
    else:
        cls = _BY_TYPE.get(error.type or "", APIError)
    return cls(
        error.message,
        status=status,
        type=error.type,
        code=error.code,
        param=error.param,
        headers=headers,
    )


def stream_error(data: Any) -> APIError | None:
    """The error a stream sent as `data: {"error": {...}}`, or None for an ordinary chunk."""
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return error_from_body(None, msgspec.convert(data["error"], ErrorBody))
    return None
