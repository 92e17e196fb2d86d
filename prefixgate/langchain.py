"""`ChatPrefixgate`: langchain-openai's ChatOpenAI set up for a prefixgate gateway.

    from prefixgate.langchain import ChatPrefixgate

    model = ChatPrefixgate(session_id="ticket-42", cache_salt="tenant-a")
    reply = model.invoke("What is the capital of France?")
    reply.usage_metadata["input_token_details"]["cache_read"]  # prompt tokens served from cache

What it changes from ChatOpenAI: base_url defaults to http://127.0.0.1:8080/v1 (or
$PREFIXGATE_BASE_URL; a URL without a path gets /v1), the model to "default" and the API
key to a placeholder (or $PREFIXGATE_API_KEY); usage is streamed (stream_usage=True), so
streamed answers report cached tokens too; `session_id` becomes the x-session-id header
(the gateway keeps the session on the replica that holds its KV) and `cache_salt` goes in
every request body (the tenant's cache is then shared only with requests of the same salt).
One instance serves one session id; `for_session(...)` gives a runnable bound to another.

Needs the `langchain` extra: `pip install 'prefixgate[langchain]'`.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage
from langchain_core.runnables import Runnable
from langchain_core.utils import from_env, secret_from_env
from langchain_openai import ChatOpenAI
from pydantic import Field, SecretStr, model_validator

from prefixgate._http import DEFAULT_BASE_URL, SESSION_HEADER, normalize_base_url

__all__ = ["ChatPrefixgate"]


class ChatPrefixgate(ChatOpenAI):
    model_name: str = Field(default="default", alias="model")
    openai_api_key: SecretStr | Callable[[], str] | Callable[[], Awaitable[str]] | None = Field(
        alias="api_key", default_factory=secret_from_env("PREFIXGATE_API_KEY", default="prefixgate")
    )
    openai_api_base: str | None = Field(
        alias="base_url", default_factory=from_env("PREFIXGATE_BASE_URL", default=DEFAULT_BASE_URL)
    )
    stream_usage: bool | None = True
    session_id: str | None = None
    """Sent as the x-session-id header on every request of this instance."""
    cache_salt: str | None = None
    """Sent as `cache_salt` in every request body: KV is reused only within one salt."""

    @model_validator(mode="before")
    @classmethod
    def _prefixgate_request_fields(cls, values: Any) -> Any:
        # Before ChatOpenAI builds its OpenAI clients from default_headers / extra_body.
        if not isinstance(values, dict):
            return values
        for key in ("base_url", "openai_api_base"):
            if values.get(key):  # http://host:8080 means http://host:8080/v1, as for Client
                values[key] = normalize_base_url(values[key])
        session_id = values.get("session_id")
        if session_id:
            headers = dict(values.get("default_headers") or {})
            headers.setdefault(SESSION_HEADER, session_id)
            values["default_headers"] = headers
        cache_salt = values.get("cache_salt")
        if cache_salt:
            extra_body = dict(values.get("extra_body") or {})
            extra_body.setdefault("cache_salt", cache_salt)
            values["extra_body"] = extra_body
        return values

    @property
    def _llm_type(self) -> str:
        return "prefixgate-chat"

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return False

    def for_session(self, session_id: str | None = None) -> Runnable[LanguageModelInput, AIMessage]:
        """This model with requests under another session id (a new one if None)."""
        return self.bind(extra_headers={SESSION_HEADER: session_id or uuid.uuid4().hex})  # type: ignore[return-value]
