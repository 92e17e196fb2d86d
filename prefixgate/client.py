"""`Client`: the blocking client for a prefixgate gateway or replica (any OpenAI-compatible server).

    from prefixgate import Client

    with Client("http://127.0.0.1:8080") as client:
        reply = client.chat([{"role": "user", "content": "Hi"}], max_tokens=32)
        print(reply.text, reply.usage.cached_tokens)
        for chunk in client.chat_stream([{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="")

429 and 503 answers, and refused connections, are retried with exponential backoff and
jitter (honouring Retry-After) before any byte of an answer arrives; nothing is retried
after that. A `session_id` sends the x-session-id header, which the gateway uses to keep a
conversation on the replica that holds its KV.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar, Unpack

import httpx

from prefixgate._http import (
    DEFAULT_BASE_URL,
    RETRYABLE_STATUS,
    ChatParams,
    CompletionParams,
    RetryPolicy,
    decode_body,
    decode_chunk,
    messages_list,
    normalize_base_url,
    request_body,
    request_headers,
    sse_data,
)
from prefixgate.errors import APIError, ConnectionError, TimeoutError, error_for
from prefixgate.types import ChatCompletion, ChatCompletionChunk, Completion, Model, ModelList

T = TypeVar("T")


class Client:
    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        model: str = "default",
        session_id: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 2,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """`timeout` bounds a whole answer, or for a stream each wait for the next chunk."""
        self.base_url = normalize_base_url(base_url)
        self.api_key = api_key
        self.model = model
        self.session_id = session_id
        self.timeout = timeout
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self.headers = dict(headers or {})
        self._http = httpx.Client(timeout=timeout)

    # --- endpoints ----------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        **params: Unpack[ChatParams],
    ) -> ChatCompletion:
        body = request_body({"messages": messages_list(messages)}, params, self.model, stream=False)
        return self._post("/chat/completions", body, ChatCompletion, session_id, timeout)

    def chat_stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        **params: Unpack[ChatParams],
    ) -> Stream[ChatCompletionChunk]:
        """Chunks as they arrive; the last one carries usage (stream_options include_usage)."""
        body = request_body({"messages": messages_list(messages)}, params, self.model, stream=True)
        return self._stream("/chat/completions", body, ChatCompletionChunk, session_id, timeout)

    def complete(
        self,
        prompt: str | list[str] | list[int] | list[list[int]],
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        **params: Unpack[CompletionParams],
    ) -> Completion:
        body = request_body({"prompt": prompt}, params, self.model, stream=False)
        return self._post("/completions", body, Completion, session_id, timeout)

    def complete_stream(
        self,
        prompt: str | list[str] | list[int] | list[list[int]],
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        **params: Unpack[CompletionParams],
    ) -> Stream[Completion]:
        body = request_body({"prompt": prompt}, params, self.model, stream=True)
        return self._stream("/completions", body, Completion, session_id, timeout)

    def models(self) -> list[Model]:
        response = self._send("GET", "/models", None, None, None)
        return decode_body(response.content, ModelList).data

    # --- plumbing -----------------------------------------------------------------------

    def _post(
        self, path: str, body: dict[str, Any], into: type[T], session_id: str | None, timeout: float | None
    ) -> T:
        response = self._send("POST", path, body, session_id, timeout)
        return decode_body(response.content, into)

    def _stream(
        self, path: str, body: dict[str, Any], into: type[T], session_id: str | None, timeout: float | None
    ) -> Stream[T]:
        # Sent now, so that a refused request raises here rather than at the first chunk.
        response = self._send("POST", path, body, session_id, timeout, stream=True)
        return Stream(response, into, self._timeout(timeout))

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        session_id: str | None,
        timeout: float | None,
        stream: bool = False,
    ) -> httpx.Response:
        """The first answer that is neither 429 nor 503 (or the last one), raised if an error."""
        headers = request_headers(self.api_key, session_id or self.session_id, self.headers)
        seconds = self._timeout(timeout)
        attempt = 0
        while True:
            request = self._http.build_request(
                method, self.base_url + path, json=body, headers=headers, timeout=seconds
            )
            try:
                response = self._http.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                if attempt < self.retry.max_retries:
                    time.sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise ConnectionError(f"cannot reach {self.base_url}: {err}") from err
            except httpx.TimeoutException as err:
                raise TimeoutError(f"no answer from {self.base_url}{path} within {seconds} s") from err
            except httpx.TransportError as err:
                raise ConnectionError(f"{method} {self.base_url}{path} failed: {err}") from err
            if response.status_code < 400:
                return response
            error = self._error(response)
            if response.status_code in RETRYABLE_STATUS and attempt < self.retry.max_retries:
                time.sleep(self.retry.delay(attempt, response.headers.get("retry-after")))
                attempt += 1
                continue
            raise error

    @staticmethod
    def _error(response: httpx.Response) -> APIError:
        try:
            content = response.read()
        finally:
            response.close()
        return error_for(response.status_code, content, dict(response.headers))

    # --- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Stream(Generic[T]):
    """The chunks of one streamed answer: iterate it once; close it (or use `with`) to stop early."""

    def __init__(self, response: httpx.Response, into: type[T], timeout: float) -> None:
        self._response = response
        self._into = into
        self._timeout = timeout

    def __iter__(self) -> Iterator[T]:
        try:
            for line in self._response.iter_lines():
                data = sse_data(line.encode())
                if data is not None:
                    yield decode_chunk(data, self._into)
        except httpx.TimeoutException as err:
            raise TimeoutError(f"no chunk within {self._timeout} s: {err}") from err
        except httpx.TransportError as err:
            raise ConnectionError(f"the stream broke off: {err}") from err
        finally:
            self._response.close()

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
