"""Every kind of bad request gets the right 4xx and an OpenAI-style error body, never a 5xx."""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest

pytestmark = pytest.mark.slow

CHAT, COMPLETIONS, GENERATE = "/v1/chat/completions", "/v1/completions", "/internal/generate"
MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HI, "max_tokens": 2} | fields


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 2} | fields


# (name, method, path, body: dict (JSON) / bytes (sent as is) / None, status, message fragment, param)
CASES: list[tuple[str, str, str, Any, int, str, str | None]] = [
    ("malformed json", "POST", CHAT, b'{"messages": [', 400, "not valid JSON", None),
    ("invalid utf-8", "POST", COMPLETIONS, b'{"prompt": "\xff\xfe bad"}', 400, "not valid UTF-8", None),
    (
        "nested 100k deep",
        "POST",
        COMPLETIONS,
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
        "nests too deeply",
        None,
    ),
    ("body not an object", "POST", CHAT, b"[1, 2]", 400, "must be a JSON object", None),
    ("empty body", "POST", CHAT, b"", 400, "body is empty", None),
    (
        "missing messages",
        "POST",
        CHAT,
        {"model": MODEL},
        400,
        "missing required field `messages`",
        "messages",
    ),
    ("messages not a list", "POST", CHAT, chat(messages="hi"), 400, "Expected `array`", "messages"),
    ("message without role", "POST", CHAT, chat(messages=[{"content": "x"}]), 400, "`role`", "role"),
    ("unknown role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "wizard", None),
    (
        "content wrong type",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": 5}]),
        400,
        "got `int`",
        None,
    ),
    ("empty messages", "POST", CHAT, chat(messages=[]), 400, "messages must not be empty", "messages"),
    (
        "image content part",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "only text content parts",
        "messages[0].content",
    ),
    ("unknown model", "POST", CHAT, chat(model="gpt-4o"), 404, "does not exist", "model"),
    ("max_tokens wrong type", "POST", CHAT, chat(max_tokens="5"), 400, "got `str`", "max_tokens"),
    ("max_tokens zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens must be at least 1", "max_tokens"),
    (
        "max_tokens negative",
        "POST",
        CHAT,
        chat(max_tokens=-5),
        400,
        "max_tokens must be at least 1",
        "max_tokens",
    ),
    ("max_tokens cannot fit", "POST", CHAT, chat(max_tokens=1010), 400, "does not fit", "max_tokens"),
    (
        "max_completion_tokens zero",
        "POST",
        CHAT,
        chat(max_completion_tokens=0),
        400,
        "max_completion_tokens must be at least 1",
        "max_completion_tokens",
    ),
    (
        "prompt longer than the context",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": "hello " * 1100}]),
        400,
        "maximum context length is 1024",
        "messages",
    ),
    ("temperature negative", "POST", CHAT, chat(temperature=-1), 400, "temperature must be", "temperature"),
    ("temperature wrong type", "POST", CHAT, chat(temperature="hot"), 400, "got `str`", "temperature"),
    ("top_p zero", "POST", CHAT, chat(top_p=0), 400, "top_p must be in (0, 1]", "top_p"),
    ("top_p above one", "POST", CHAT, chat(top_p=1.5), 400, "top_p must be in (0, 1]", "top_p"),
    ("top_k below -1", "POST", CHAT, chat(top_k=-5), 400, "top_k must be", "top_k"),
    ("min_p above one", "POST", CHAT, chat(min_p=2), 400, "min_p must be in [0, 1]", "min_p"),
    ("n zero", "POST", CHAT, chat(n=0), 400, "n must be between 1 and 128", "n"),
    ("n too large", "POST", CHAT, chat(n=1000), 400, "n must be between 1 and 128", "n"),
    ("n wrong type", "POST", CHAT, chat(n=1.5), 400, "got `float`", "n"),
    (
        "top_logprobs too large",
        "POST",
        CHAT,
        chat(logprobs=True, top_logprobs=50),
        400,
        "top_logprobs",
        "top_logprobs",
    ),
    (
        "top_logprobs without logprobs",
        "POST",
        CHAT,
        chat(top_logprobs=2),
        400,
        "needs logprobs",
        "top_logprobs",
    ),
    (
        "presence_penalty out of range",
        "POST",
        CHAT,
        chat(presence_penalty=5),
        400,
        "presence_penalty",
        "presence_penalty",
    ),
    (
        "frequency_penalty out of range",
        "POST",
        CHAT,
        chat(frequency_penalty=-3),
        400,
        "frequency_penalty",
        "frequency_penalty",
    ),
    ("empty stop string", "POST", CHAT, chat(stop=[""]), 400, "stop strings must not be empty", "stop"),
    ("stop wrong type", "POST", CHAT, chat(stop=5), 400, "got `int`", "stop"),
    ("seed wrong type", "POST", CHAT, chat(seed="abc"), 400, "got `str`", "seed"),
    ("seed out of range", "POST", CHAT, chat(seed=2**70), 400, "seed must be between", "seed"),
    ("stream wrong type", "POST", CHAT, chat(stream="yes"), 400, "got `str`", "stream"),
    (
        "stream_options without stream",
        "POST",
        CHAT,
        chat(stream_options={"include_usage": True}),
        400,
        "only be set when stream is true",
        "stream_options",
    ),
    (
        "logit_bias",
        "POST",
        CHAT,
        chat(logit_bias={"50": 10}),
        400,
        "logit_bias is not supported",
        "logit_bias",
    ),
    (
        "stop token outside vocab",
        "POST",
        CHAT,
        chat(stop_token_ids=[10**30]),
        400,
        "outside the vocabulary",
        None,
    ),
    ("empty prompt", "POST", COMPLETIONS, completion(prompt=""), 400, "prompt must not be empty", "prompt"),
    (
        "empty prompt list",
        "POST",
        COMPLETIONS,
        completion(prompt=[]),
        400,
        "prompt must not be empty",
        "prompt",
    ),
    (
        "missing prompt",
        "POST",
        COMPLETIONS,
        {"model": MODEL},
        400,
        "missing required field `prompt`",
        "prompt",
    ),
    ("prompt wrong type", "POST", COMPLETIONS, completion(prompt=5), 400, "got `int`", "prompt"),
    (
        "mixed prompt list",
        "POST",
        COMPLETIONS,
        completion(prompt=[1, "a"]),
        400,
        "prompt must be a string",
        "prompt",
    ),
    (
        "token id outside the vocabulary",
        "POST",
        COMPLETIONS,
        completion(prompt=[1, 99999999]),
        400,
        "outside the vocabulary",
        "prompt",
    ),
    (
        "token prompt longer than the context",
        "POST",
        COMPLETIONS,
        completion(prompt=[42] * 1100),
        400,
        "maximum context length",
        "prompt",
    ),
    (
        "completion logprobs too large",
        "POST",
        COMPLETIONS,
        completion(logprobs=30),
        400,
        "logprobs must be",
        "logprobs",
    ),
    ("echo", "POST", COMPLETIONS, completion(echo=True), 400, "echo is not supported", "echo"),
    (
        "completion unknown model",
        "POST",
        COMPLETIONS,
        completion(model="nope"),
        404,
        "does not exist",
        "model",
    ),
    (
        "generate: no tokens",
        "POST",
        GENERATE,
        {"token_ids": []},
        400,
        "token_ids must not be empty",
        "token_ids",
    ),
    ("generate: negative token", "POST", GENERATE, {"token_ids": [1, -2]}, 400, ">= 0", "token_ids[1]"),
    (
        "generate: max_tokens zero",
        "POST",
        GENERATE,
        {"token_ids": [1], "max_tokens": 0},
        400,
        "at least 1",
        None,
    ),
    ("generate: n out of range", "POST", GENERATE, {"token_ids": [1], "n": 0}, 400, "n must be", "n"),
    ("wrong method", "GET", CHAT, None, 405, "Method Not Allowed", None),
    ("unknown route", "POST", "/v1/embeddings", {"input": "x"}, 404, "Not Found", None),
    ("body too large", "POST", CHAT, b'{"messages": "' + b"x" * 11_000_000 + b'"}', 413, "Too Large", None),
]


@pytest.fixture(scope="module")
def http(smol_replica):
    with httpx.Client(base_url=smol_replica.url, timeout=60) as client:
        yield client


def test_table_has_enough_kinds() -> None:
    assert len({name for name, *_ in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "status", "fragment", "param"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_request(
    http: httpx.Client,
    name: str,
    method: str,
    path: str,
    body: Any,
    status: int,
    fragment: str,
    param: str | None,
) -> None:
    if isinstance(body, bytes):
        response = http.request(method, path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.request(method, path, json=body)
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] is not None and param in error["param"], error
    assert "Traceback" not in response.text and "0x7f" not in response.text


def test_bad_msgpack(http: httpx.Client) -> None:
    response = http.post(GENERATE, content=b"\xc1\xff\x00", headers={"content-type": "application/msgpack"})
    assert response.status_code == 400
    assert "not valid msgpack" in response.json()["error"]["message"]
    good = msgspec.msgpack.encode({"token_ids": [1, 2, 3], "max_tokens": 1})
    response = http.post(GENERATE, content=good, headers={"content-type": "application/msgpack"})
    assert response.status_code == 200
    frames = [json.loads(line) for line in response.text.splitlines()]
    assert frames[-1]["finish_reason"] == "length"


def test_replica_survives_the_table(smol_replica, http: httpx.Client) -> None:
    assert smol_replica.get("/health")["status"] == "ready"
    ok = http.post(CHAT, json=chat(max_tokens=2, temperature=0))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    state = smol_replica.wait_idle()
    assert state["integrity_error"] is None
    metrics = http.get("/metrics").text
    assert 'status="500"' not in metrics
