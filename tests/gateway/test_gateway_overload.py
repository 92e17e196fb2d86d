"""The gateway's own bounds, on a real gateway in front of one real replica (127.0.0.1):
requests in flight (429 with Retry-After, overall and per tenant, never a leaked slot) and
request body size (413, whether Content-Length says so or a chunked body grows too big)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MAX_IN_FLIGHT = 4
MAX_BODY = 1_000_000
BIG, SMALL = "sk-big-tenant", "sk-small-tenant"  # SMALL's tenant may have one request in flight
KEYS_JSON = {"keys": {BIG: "big", SMALL: "small"}, "tenants": {"small": {"max_in_flight": 1}}}


@pytest.fixture(scope="module")
def cluster(procs, engine_cmd, gateway_cmd, tmp_path_factory: pytest.TempPathFactory):
    replica = procs(*engine_cmd)
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps(KEYS_JSON))
    replica.wait_ready()
    extra = [
        "--api-keys",
        str(keys),
        "--max-in-flight",
        str(MAX_IN_FLIGHT),
        "--max-body-bytes",
        str(MAX_BODY),
    ]
    gateway = procs(gateway_cmd([replica], extra=extra)).wait_ready(60)
    return gateway, replica


def _auth(key: str = BIG) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _chat(max_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {
        "model": "default",
        "messages": [{"role": "user", "content": "Count slowly from one to one hundred."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


def _sdk_chat(max_tokens: int, stream: bool = True) -> dict[str, Any]:
    body = _chat(max_tokens, stream)
    del body["ignore_eos"]
    return {**body, "extra_body": {"ignore_eos": True}}


def admitted(gateway: Any) -> float:
    text = httpx.get(gateway.url + "/metrics").text
    found = re.search(r"^prefixgate_gateway_admitted_requests ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found is not None, text
    return float(found.group(1))


def wait_admitted_zero(gateway: Any, within_s: float = 30.0) -> None:
    """The count falls as each ASGI call returns, just after the client has its last byte."""
    deadline = time.monotonic() + within_s
    while admitted(gateway) != 0:
        assert time.monotonic() < deadline, f"admitted requests stuck at {admitted(gateway)}"
        time.sleep(0.05)


def _stream_tokens(text: str) -> tuple[int, str | None]:
    """(completion_tokens from usage, last finish_reason) of a whole chat SSE stream."""
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", text[-500:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), text[-500:]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    return chunks[-1]["usage"]["completion_tokens"], reasons[-1]


def test_excess_requests_get_429_at_once_and_admitted_ones_finish(cluster: Any) -> None:
    gateway, replica = cluster
    order: list[str] = []

    async def one(session: aiohttp.ClientSession) -> tuple[int, Any]:
        async with session.post(gateway.url + "/v1/chat/completions", json=_chat(32), headers=_auth()) as r:
            if r.status == 429:
                order.append("refused")
                return 429, (r.headers.get("Retry-After"), await r.json())
            text = await r.text()
            order.append("finished")
            return r.status, _stream_tokens(text)

    async def flood() -> list[tuple[int, Any]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            return await asyncio.gather(*(one(session) for _ in range(10 * MAX_IN_FLIGHT)))

    results = asyncio.run(flood())
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= MAX_IN_FLIGHT and statuses.count(429) >= 1, statuses
    for status, detail in results:
        if status == 200:
            assert detail == (32, "length")
        else:
            retry_after, body = detail
            assert retry_after == "1" and body["error"]["code"] == "rate_limit_exceeded", detail
    # Refusals do not wait for capacity: the first came before any admitted stream ended.
    assert order.index("refused") < order.index("finished"), order
    wait_admitted_zero(gateway)
    assert gateway.process.poll() is None and replica.process.poll() is None


def test_aborted_and_failed_requests_release_their_slots(cluster: Any) -> None:
    gateway, replica = cluster

    async def abort_stream(session: aiohttp.ClientSession) -> None:
        r = await session.post(gateway.url + "/v1/chat/completions", json=_chat(400), headers=_auth())
        assert r.status == 200
        await r.content.readline()  # the first event: admitted and streaming
        r.close()  # drop the connection mid-stream

    async def abort_whole(session: aiohttp.ClientSession) -> None:
        post = session.post(gateway.url + "/v1/chat/completions", json=_chat(400, False), headers=_auth())
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.5):
                await post

    async def failing(session: aiohttp.ClientSession, body: bytes) -> int:
        async with session.post(gateway.url + "/v1/chat/completions", data=body, headers=_auth()) as r:
            return r.status

    async def main() -> list[int]:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(abort_stream(session) for _ in range(2)))
            await asyncio.gather(*(abort_whole(session) for _ in range(2)))
            bad = [
                b"{not json",
                b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
                json.dumps({**_chat(10**6), "stream": False}).encode(),
            ]
            return await asyncio.gather(*(failing(session, b) for b in bad * 3))

    statuses = asyncio.run(main())
    assert all(400 <= s < 500 for s in statuses), statuses
    wait_admitted_zero(gateway)

    # Every slot is free again: MAX_IN_FLIGHT requests at once are all admitted and answered.
    async def full_house() -> list[tuple[int, Any]]:
        async with aiohttp.ClientSession() as session:

            async def one() -> tuple[int, Any]:
                async with session.post(
                    gateway.url + "/v1/chat/completions", json=_chat(8), headers=_auth()
                ) as r:
                    return r.status, _stream_tokens(await r.text()) if r.status == 200 else await r.text()

            return await asyncio.gather(*(one() for _ in range(MAX_IN_FLIGHT)))

    assert asyncio.run(full_house()) == [(200, (8, "length"))] * MAX_IN_FLIGHT
    wait_admitted_zero(gateway)
    assert gateway.process.poll() is None and replica.process.poll() is None


def test_a_tenant_limit_refuses_only_that_tenant(cluster: Any) -> None:
    gateway, _ = cluster
    small = openai.OpenAI(base_url=gateway.url + "/v1", api_key=SMALL, max_retries=0)
    big = openai.OpenAI(base_url=gateway.url + "/v1", api_key=BIG, max_retries=0)
    stream = small.chat.completions.create(**_sdk_chat(400))
    next(iter(stream))  # SMALL's one slot is taken while this stream is open
    with pytest.raises(openai.RateLimitError) as raised:
        small.chat.completions.create(**_sdk_chat(4, False))
    assert raised.value.response.headers["retry-after"] == "1"
    assert "tenant" in raised.value.message
    answer = big.chat.completions.create(**_sdk_chat(4, False))  # other tenants are not held back
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    stream.close()
    wait_admitted_zero(gateway)
    again = small.chat.completions.create(**_sdk_chat(4, False))
    assert again.usage is not None and again.usage.completion_tokens == 4


def _raw_head(gateway: Any, path: str, extra: str = "") -> bytes:
    """Send only a request head declaring a 100 MB body; return what the gateway answers."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as conn:
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {BIG}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 100000000\r\n{extra}\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = conn.recv(65536)
            if not data:
                break
            answer += data
        return answer


def _assert_413(body: bytes | str) -> None:
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and str(MAX_BODY) in error["message"], error


def test_a_body_declared_too_large_gets_413_before_it_is_sent(cluster: Any) -> None:
    gateway, _ = cluster
    for path in ("/v1/chat/completions", "/v1/completions", "/admin/replicas"):
        for extra in ("", "Expect: 100-continue\r\n"):
            answer = _raw_head(gateway, path, extra)
            assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
            assert b"100 Continue" not in answer
            _assert_413(answer.split(b"\r\n\r\n", 1)[1])


def test_a_body_over_the_limit_gets_413_whether_declared_or_chunked(cluster: Any) -> None:
    gateway, _ = cluster
    url = gateway.url + "/v1/chat/completions"
    # urllib sends the whole body before it reads: it sees the 413, not a connection reset.
    request = urllib.request.Request(url, data=b"x" * (3 * MAX_BODY), headers=_auth(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == 413
    _assert_413(raised.value.read())

    def chunks() -> Any:
        for _ in range(30):
            yield b"x" * 100_000

    response = httpx.post(url, content=chunks(), headers=_auth(), timeout=60)
    assert response.status_code == 413 and "content-length" not in response.request.headers
    _assert_413(response.content)
    # Just under the limit is read whole (and then judged on its JSON).
    under = httpx.post(url, content=b" " * (MAX_BODY - 10) + b"{}", headers=_auth(), timeout=60)
    assert under.status_code == 400 and "messages" in under.text
    wait_admitted_zero(gateway)


def test_a_client_leaving_a_non_streamed_answer_aborts_it_on_the_replica(cluster: Any) -> None:
    """The gateway hears the lost connection and closes the replica stream: the replica's
    request ends at once, not after 4,000 tokens."""
    gateway, replica = cluster

    def replica_in_flight() -> int:
        return int(httpx.get(replica.url + "/load").json()["in_flight"])

    async def leave() -> None:
        async with aiohttp.ClientSession() as session:
            post = session.post(
                gateway.url + "/v1/chat/completions", json=_chat(4000, False), headers=_auth()
            )
            with pytest.raises(asyncio.TimeoutError):
                async with asyncio.timeout(1.0):
                    await post
            assert replica_in_flight() == 1  # it was generating when the client left

    asyncio.run(leave())
    left = time.monotonic()
    while replica_in_flight():
        assert time.monotonic() - left < 10.0, "the replica kept generating for a client that had gone"
        time.sleep(0.05)
    wait_admitted_zero(gateway, within_s=5.0)
