"""Errors a client can cause, as OpenAI-style bodies: {"error": {message, type, param, code}}.

Handlers raise ApiError; litestar's own errors (unknown route, wrong method, body too large)
and anything unexpected go through the same exception handlers, so no response ever carries
a traceback or an internal address.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from engine.server.openai_types import ErrorResponse
from engine.server.protocol import ErrorBody

log = logging.getLogger("prefixgate.engine.server")

T = TypeVar("T")

_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | int | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        return ErrorBody(message=self.message, type=self.error_type, param=self.param, code=self.code)

    @classmethod
    def from_body(cls, status: int, body: ErrorBody) -> ApiError:
        """The error a replica answered with, to pass on unchanged (the gateway does)."""
        return cls(status, body.message, param=body.param, code=body.code, error_type=body.type)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def error_json(error: ApiError) -> bytes:
    return msgspec.json.encode(ErrorResponse(error.body()))


def error_response(error: ApiError) -> Response[bytes]:
    return Response(
        error_json(error), status_code=error.status, media_type="application/json", headers=error.headers
    )


_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def decode_json(body: bytes, into: type[T]) -> T:
    """Decode a request body; every way it can be wrong becomes a 400 naming the field."""
    return _decode(msgspec.json.decode, body, into, "JSON")


def decode_msgpack(body: bytes, into: type[T]) -> T:
    return _decode(msgspec.msgpack.decode, body, into, "msgpack")


def _decode(decode: Any, body: bytes, into: type[T], kind: str) -> T:
    if not body.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        return decode(body, type=into)
    except msgspec.ValidationError as err:
        text = str(err)
        at, missing = _PATH.search(text), _MISSING.search(text)
        param = ".".join(m.group(1) for m in (at, missing) if m is not None and m.group(1)) or None
        if text.startswith("Expected `object`") and param is None:
            text = "the request body must be a JSON object"
        raise ApiError(400, f"invalid request: {text}", param=param) from None
    except msgspec.DecodeError as err:
        if "UTF-8" in str(err):  # msgspec >= 0.23 checks strings' encoding itself
            where = "the request body" if kind == "JSON" else "a string in the request body"
            raise bad_request(f"{where} is not valid UTF-8: {err}") from None
        raise bad_request(f"the request body is not valid {kind}: {err}") from None
    except UnicodeDecodeError as err:
        raise bad_request(f"the request body is not valid UTF-8: {err.reason} at byte {err.start}") from None
    except RecursionError:
        raise bad_request(f"the request body nests too deeply to be valid {kind}") from None


# --- litestar exception handlers ------------------------------------------------------


def handle_api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[bytes]:
    return error_response(exc)


def handle_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    if status >= 500:
        log.error("internal error: %s", exc.detail)
        return error_response(ApiError(status, "internal server error"))
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    message = phrase if exc.detail in ("", phrase) else f"{phrase}: {exc.detail}"
    code = "method_not_allowed" if status == 405 else None
    headers = {"Allow": exc.headers["Allow"]} if exc.headers and "Allow" in exc.headers else None
    return error_response(ApiError(status, message, code=code, headers=headers))


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ApiError(500, "internal server error"))


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: handle_api_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
