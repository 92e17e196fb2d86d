"""OpenAI-style errors for the gateway: the replica server's, so both answer alike.

engine/server/errors.py imports only msgspec, litestar and the wire types (no torch), so the
gateway shares it rather than keeping a copy that could drift.
"""

from engine.server.errors import (
    EXCEPTION_HANDLERS,
    ApiError,
    bad_request,
    decode_json,
    error_json,
    error_response,
)

__all__ = ["EXCEPTION_HANDLERS", "ApiError", "bad_request", "decode_json", "error_json", "error_response"]
