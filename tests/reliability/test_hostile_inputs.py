"""Hostile requests by hand, to the replica and to the gateway: every one gets an answer < 500
within the timeout, an OpenAI-style error body when refused, and both processes stay up.

Adds to tests/engine/server/test_bad_requests.py (replica only): extreme numbers in every
numeric field, huge and odd strings, wrong types, and the same against the gateway.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from bench.fuzz_api import Server, replica_idle_state

pytestmark = pytest.mark.slow

CHAT, COMPLETIONS, GENERATE = "/v1/chat/completions", "/v1/completions", "/internal/generate"
HI = [{"role": "user", "content": "hi"}]
HUGE_INT = 10**40  # past every 64-bit range: msgspec decodes it as a Python int
# bench/fuzz_api.py sends the rest (0.5, true, null, -1e308, ...); these are the ones that
# overflow 64-bit fields or C doubles on the way to the engine.
EXTREMES: list[Any] = [1e308, -1, 2**63, HUGE_INT]
CHAT_NUMBERS = [
    "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "top_k", "min_p", "seed",
    "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
]  # fmt: skip
COMPLETION_NUMBERS = [*CHAT_NUMBERS[:1], *CHAT_NUMBERS[2:8], "logprobs", "best_of", *CHAT_NUMBERS[9:]]
GENERATE_NUMBERS = [f for f in COMPLETION_NUMBERS if f != "best_of"]
MILLION = "a" * 1_000_000


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": HI, "max_tokens": 2} | fields


def completion(**fields: Any) -> dict[str, Any]:
    return {"prompt": "hello", "max_tokens": 2} | fields


def generate(**fields: Any) -> dict[str, Any]:
    return {"token_ids": [1, 2, 3], "max_tokens": 2} | fields


def _numbers() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for field in CHAT_NUMBERS:
        extra = {"logprobs": True} if field == "top_logprobs" else {}
        out += [(CHAT, chat(**extra, **{field: v})) for v in EXTREMES]
    for field in COMPLETION_NUMBERS:
        out += [(COMPLETIONS, completion(**{field: v})) for v in EXTREMES]
    out += [(COMPLETIONS, completion(stop_token_ids=[v])) for v in EXTREMES]
    out += [(CHAT, chat(stop=["x"] * 1000)), (CHAT, chat(stop="x" * 100_000))]
    return out


ODD: list[tuple[str, Any]] = [
    (COMPLETIONS, completion(prompt=MILLION)),
    (CHAT, chat(messages=[{"role": "user", "content": MILLION}])),
    (CHAT, chat(messages=[{"role": "user", "content": "x"}] * 20_000)),
    (COMPLETIONS, completion(prompt=[MILLION[:1000]] * 500)),
    (COMPLETIONS, completion(prompt=[[1] * 5000])),
    (COMPLETIONS, completion(prompt=[[1, 2], "mixed"])),
    (COMPLETIONS, completion(prompt=[[]])),
    (COMPLETIONS, completion(prompt=[1.5])),
    (COMPLETIONS, completion(prompt=[True, False])),
    (COMPLETIONS, completion(prompt={"text": "x"})),
    (COMPLETIONS, completion(prompt="\x00\x01\x02\x1b[31m\u202e\ufeff\x7f")),
    (CHAT, chat(messages=[{"role": "user", "content": "\x00" * 1000}])),
    (CHAT, chat(messages=[{"role": "user", "content": "{% raw %}{{ 7*7 }}{{ ''.__class__ }}"}])),
    (CHAT, chat(messages=[{"role": "user", "name": "\x00", "content": [{"type": "text"}]}])),
    (CHAT, chat(model="\x00\n\r")),
    (CHAT, chat(stop=["\x00", "\n"], max_tokens=3)),
    (CHAT, chat(stream="yes")),
    (CHAT, chat(stream=True, stream_options={"include_usage": "x"})),
    (CHAT, chat(tools="x")),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}])),
    (CHAT, chat(tool_choice={"type": "function", "function": {"name": "nope"}})),
    (CHAT, chat(response_format={"type": "json_schema"})),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": 5}}})),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {"schema": {"$ref": "#/x"}}})),
    (CHAT, chat(response_format={"type": "nope"})),
    (CHAT, chat(logit_bias={"1": 1e308})),
    (CHAT, chat(cache_salt="\x00" * 10_000)),
    (COMPLETIONS, completion(user=MILLION)),
]
GENERATE_ODD: list[tuple[str, Any]] = [
    *[(GENERATE, generate(**{field: v})) for field in GENERATE_NUMBERS for v in EXTREMES],
    (GENERATE, generate(token_ids=[HUGE_INT])),
    (GENERATE, generate(token_ids=[])),
    (GENERATE, generate(stop_token_ids=[HUGE_INT])),
    (GENERATE, generate(grammar={"kind": "lark", "text": "start: start"})),
    (GENERATE, generate(request_id="\x00" * 1000)),
    (GENERATE, generate(repetition_penalty=5e-324, logprobs=1)),
]
# The core refuses these grammars after the NDJSON answer has started: the stream must end
# with an error frame, not a dropped connection.
BAD_GRAMMARS = [{"kind": "lark", "text": "\x00"}, {"kind": "json_schema", "text": "{"}]


def _check(server: Server, client: httpx.Client, path: str, body: Any) -> int:
    response = client.post(server.url + path, json=body)
    assert response.status_code < 500, f"{server.name} {path} {str(body)[:300]}: {response.text[:500]}"
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text[:500]
    elif path != GENERATE and body.get("stream") is not True:
        assert response.json()["choices"], response.text[:500]
    return response.status_code


@pytest.mark.parametrize("server_name", ["replica", "gateway"])
def test_extreme_numbers_and_odd_bodies(fuzz_servers: tuple[Server, Server], server_name: str) -> None:
    replica, gateway = fuzz_servers
    server = replica if server_name == "replica" else gateway
    cases = _numbers() + ODD + (GENERATE_ODD if server is replica else [])
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=120.0) as client:
        for path, body in cases:
            status = _check(server, client, path, body)
            statuses[status] = statuses.get(status, 0) + 1
    assert replica.alive() and gateway.alive()
    # Refused far more often than served: the table is mostly out-of-range values.
    assert statuses.get(400, 0) > len(cases) // 2, statuses
    state = replica_idle_state(replica)
    assert state["integrity_error"] is None and state["load"]["used_blocks"] == 0, state


def test_refusals_name_the_field(fuzz_servers: tuple[Server, Server]) -> None:
    replica, gateway = fuzz_servers
    expected = [
        (CHAT, chat(max_tokens=HUGE_INT), "max_tokens"),
        (CHAT, chat(max_completion_tokens=2**64), "max_completion_tokens"),
        (CHAT, chat(n=2**63), "n"),
        (CHAT, chat(temperature=1e308), "temperature"),
        (CHAT, chat(logprobs=True, top_logprobs=HUGE_INT), "top_logprobs"),
        (COMPLETIONS, completion(prompt=MILLION), "prompt"),
        (CHAT, chat(messages=[{"role": "user", "content": MILLION}]), "messages"),
        (COMPLETIONS, completion(seed=HUGE_INT), "seed"),
        (COMPLETIONS, completion(prompt=[HUGE_INT]), "prompt"),
        # Logits divided by ~0 overflowed: NaN logprobs (JSON null) that the gateway took for a
        # broken replica, marking it unhealthy for everyone.
        (CHAT, chat(repetition_penalty=5e-324, logprobs=True), "repetition_penalty"),
        (COMPLETIONS, completion(repetition_penalty=1e-40, logprobs=2), "repetition_penalty"),
    ]
    with httpx.Client(timeout=120.0) as client:
        for server in (replica, gateway):
            for path, body, param in expected:
                response = client.post(server.url + path, json=body)
                assert response.status_code == 400, (server.name, param, response.text[:300])
                assert response.json()["error"]["param"] == param, (server.name, response.text[:300])
        normal = client.post(gateway.url + CHAT, json=chat())
        assert normal.status_code == 200, normal.text[:300]


def test_raw_bytes_on_the_gateway(fuzz_servers: tuple[Server, Server]) -> None:
    """The replica's table of raw bodies (test_bad_requests.py), sent through the gateway."""
    _, gateway = fuzz_servers
    bodies = [
        b'{"messages": [',
        b'{"prompt": "\xff\xfe bad"}',
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"[1, 2]",
        b"",
        b'{"prompt": "\\ud800"}',
        b'{"prompt": "x", "temperature": NaN}',
        b'{"prompt": "x", "max_tokens": 1e999}',
        b"\x00" * 1000,
    ]
    with httpx.Client(timeout=60.0) as client:
        for path in (CHAT, COMPLETIONS):
            for raw in bodies:
                response = client.post(gateway.url + path, content=raw)
                assert response.status_code < 500, (path, raw[:40], response.text[:300])
                assert json.loads(response.text)["error"]["message"]
    assert gateway.alive()


@pytest.mark.parametrize("grammar", BAD_GRAMMARS, ids=["lark", "json_schema"])
def test_bad_grammar_ends_the_stream_with_an_error_frame(
    fuzz_servers: tuple[Server, Server], grammar: dict[str, str]
) -> None:
    replica, _ = fuzz_servers
    with httpx.Client(timeout=60.0) as client:
        response = client.post(replica.url + GENERATE, json=generate(grammar=grammar))
        lines = [json.loads(line) for line in response.text.splitlines() if line]
    assert response.status_code == 400 or lines[-1]["error"]["message"], response.text[:300]
    assert replica.alive()
