"""A replica of a tiny random model (no tokenizer): the token-level API, 429, a core crash, drain."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

# max_num_seqs 1 + max_waiting 1: a third concurrent request is refused with 429.
TINY_ARGS = ["--num-blocks", "512", "--max-num-seqs", "1", "--max-waiting", "1", "--drain-timeout", "20"]


@pytest.fixture(scope="module")
def tiny_replica(tiny_model_dir, replica_factory):
    return replica_factory(["--model", str(tiny_model_dir("llama")), *TINY_ARGS])


def generate(url: str, body: dict[str, Any], msgpack: bool = False) -> list[dict[str, Any]]:
    if not msgpack:
        response = httpx.post(url + "/internal/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in response.text.splitlines()]
    response = httpx.post(
        url + "/internal/generate",
        content=msgspec.msgpack.encode(body),
        headers={"content-type": "application/msgpack", "accept": "application/vnd.msgpack"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    data, frames = response.content, []
    while data:
        size = int.from_bytes(data[:4], "big")
        frames.append(msgspec.msgpack.decode(data[4 : 4 + size]))
        data = data[4 + size :]
    return frames


def test_internal_generate(tiny_replica) -> None:
    prompt = list(range(3, 40))  # 37 tokens: two full blocks
    body = {"token_ids": prompt, "max_tokens": 5, "n": 2, "temperature": 0, "logprobs": 2, "ignore_eos": True}
    frames = generate(tiny_replica.url, body)
    for index in (0, 1):
        mine = [f for f in frames if f["index"] == index]
        assert sum(len(f["token_ids"]) for f in mine) == 5
        assert mine[0]["prompt_tokens"] == 37 and "cached_tokens" in mine[0]
        assert "prompt_tokens" not in mine[1]
        assert [f.get("finish_reason") for f in mine] == [None] * 4 + ["length"]
        for f in mine:
            token_id, _, top = f["logprobs"][0]
            assert token_id == f["token_ids"][0] and len(top) == 2 and top[0][0] == token_id  # greedy
    tokens = [[t for f in frames if f["index"] == i for t in f["token_ids"]] for i in (0, 1)]
    assert tokens[0] == tokens[1]  # greedy: both samples agree

    again = generate(tiny_replica.url, body | {"n": 1}, msgpack=True)
    assert [t for f in again for t in f["token_ids"]] == tokens[0]
    assert again[0]["cached_tokens"] == 32  # both full prompt blocks, from the first request
    salted = generate(tiny_replica.url, body | {"n": 1, "cache_salt": "other"})
    assert salted[0]["cached_tokens"] == 0

    # Completions take token ids too; with no tokenizer the text is empty but usage is exact.
    response = httpx.post(
        tiny_replica.url + "/v1/completions",
        json={"prompt": prompt, "max_tokens": 3, "ignore_eos": True, "temperature": 0},
        timeout=60,
    )
    assert response.json()["usage"]["prompt_tokens"] == 37
    assert response.json()["usage"]["completion_tokens"] == 3
    chat = httpx.post(
        tiny_replica.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert chat.status_code == 400 and "chat template" in chat.json()["error"]["message"]


def test_full_queue_gets_429_with_retry_after(tiny_replica) -> None:
    # ~1 ms a token on this model: 4000 tokens keep the batch busy for seconds.
    body = {"token_ids": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True}
    with (
        httpx.Client(base_url=tiny_replica.url, timeout=60) as http,
        http.stream("POST", "/internal/generate", json=body) as running,
    ):
        # Keep the iterator: dropping it closes the response, which aborts the request.
        frames = running.iter_lines()
        next(frames)  # it is in the running batch (max_num_seqs 1)
        with http.stream("POST", "/internal/generate", json=body) as waiting:
            assert waiting.status_code == 200  # queued: the one waiting slot
            assert tiny_replica.get("/load")["in_flight"] == 2
            refused = httpx.post(tiny_replica.url + "/internal/generate", json=body)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            n_too_big = httpx.post(tiny_replica.url + "/internal/generate", json=body | {"n": 3})
            assert n_too_big.status_code == 400
    state = tiny_replica.wait_idle()
    assert state["load"]["used_blocks"] == 0 and state["integrity_error"] is None
    assert generate(tiny_replica.url, body | {"max_tokens": 2})[-1]["finish_reason"] == "length"


def test_ten_times_the_queue_bound_at_once(tiny_replica) -> None:
    """20 requests at once against a bound of 2 (one running, one waiting): the excess get 429
    with Retry-After, every admitted one finishes, and no block is left behind."""
    import asyncio

    body = {"token_ids": [5, 6, 7], "max_tokens": 300, "ignore_eos": True}

    async def run() -> list[tuple[int, str | None, str]]:
        async with httpx.AsyncClient(base_url=tiny_replica.url, timeout=60) as http:

            async def one() -> tuple[int, str | None, str]:
                response = await http.post("/internal/generate", json=body)
                return response.status_code, response.headers.get("retry-after"), response.text

            return await asyncio.gather(*(one() for _ in range(20)))

    results = asyncio.run(run())
    admitted = [text for status, _, text in results if status == 200]
    refused = [(after, text) for status, after, text in results if status == 429]
    assert len(admitted) + len(refused) == 20, [status for status, _, _ in results]
    assert len(admitted) >= 2 and len(refused) >= 10
    for text in admitted:
        frames = [json.loads(line) for line in text.splitlines()]
        assert frames[-1]["finish_reason"] == "length"
        assert sum(len(f["token_ids"]) for f in frames) == 300
    for after, text in refused:
        assert after == "1" and json.loads(text)["error"]["code"] == "queue_full"
    state = tiny_replica.wait_idle()
    assert state["load"]["used_blocks"] == 0 and state["integrity_error"] is None
    assert tiny_replica.get("/health")["status"] == "ready"


def test_sigterm_drains_running_requests(tiny_replica) -> None:
    """Last in this module: it stops the module's replica."""
    body = {"token_ids": [5, 6, 7], "max_tokens": 600, "ignore_eos": True}  # about a second
    tokens = 0
    with (
        httpx.Client(base_url=tiny_replica.url, timeout=60) as http,
        http.stream("GET", "/kv/events") as events,
        http.stream("POST", "/internal/generate", json=body) as gen,
    ):
        lines = gen.iter_lines()
        tokens += len(json.loads(next(lines))["token_ids"])
        tiny_replica.process.send_signal(signal.SIGTERM)
        frames = [json.loads(line) for line in lines]
        tokens += sum(len(f["token_ids"]) for f in frames)
        assert frames[-1]["finish_reason"] == "length"
        assert next(iter(events.iter_lines())).startswith('{"type":"CacheSnapshot"')  # then it ended
    assert tokens == 600
    # It exits although a /kv/events subscriber is still connected: that stream does not hold
    # the drain up (a generous bound: the machines are shared and slow at times).
    code = tiny_replica.process.wait(60)
    assert code in (0, -signal.SIGTERM)


def core_pid(replica_pid: int) -> int:
    children = Path(f"/proc/{replica_pid}/task/{replica_pid}/children").read_text().split()
    for pid in children:
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return int(pid)
    raise AssertionError(f"no core process among {children}")


def test_health_while_loading_then_core_crash(tiny_model_dir, replica_factory) -> None:
    replica = replica_factory(["--model", str(tiny_model_dir("llama")), "--num-blocks", "64"])
    # HTTP is up before the model: /health says so with a 503 until the core is warmed.
    assert replica.health_seen == ["loading", "ready"]
    os.kill(core_pid(replica.process.pid), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (health := httpx.get(replica.url + "/health")).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert health.status_code == 503 and health.json()["status"] == "failed"
    refused = httpx.post(replica.url + "/internal/generate", json={"token_ids": [1, 2]})
    assert refused.status_code == 503 and "engine" in refused.json()["error"]["message"]
    assert replica.process.poll() is None  # the API process answers; a supervisor restarts it
