"""The gateway in front of two real replicas of the embedded model, on 127.0.0.1.

Tests run in file order on one cluster: OpenAI clients through the gateway, the 8-agent
workload under kv_aware and round_robin, a gateway restart, and last a replica killed
with SIGKILL (it is restarted within the test).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.text import GatewayTokenizer

pytestmark = pytest.mark.slow

_WORD_LIST = (
    "agent tool schema call result retrieve document policy answer summary context plan step "
    "observe report query search index table filter rank score source cite verify check update "
    "memory state goal task user system assistant function argument value return error retry"
)
_WORDS = _WORD_LIST.split()


@dataclass(frozen=True)
class Turn:
    agent: int
    turn: int
    replica: str
    prompt_tokens: int
    cached_tokens: int
    ideal_cached_tokens: int  # what one replica with an unbounded cache would reuse


def system_prompt(seed: int, agent: int, words: int = 1500) -> str:
    rng = random.Random(seed * 1000 + agent)
    body = " ".join(rng.choice(_WORDS) for _ in range(words))
    return f"You are agent {agent} (run {seed}). Follow these notes exactly.\n{body}"


def _ideal(prev: list[int] | None, ids: list[int], block: int) -> int:
    if prev is None:
        return 0
    common = 0
    for a, b in zip(prev, ids, strict=False):
        if a != b:
            break
        common += 1
    usable = (len(ids) - 1) // block
    return min(common // block, usable) * block


async def run_agents(
    base_url: str,
    tokenizer: GatewayTokenizer,
    seed: int,
    agents: int = 8,
    turns: int = 6,
    block: int = 16,
    max_tokens: int = 2,
) -> list[Turn]:
    out: list[Turn] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def agent(i: int) -> None:
            await asyncio.sleep(0.05 * i)  # stagger, so turns of different agents interleave
            messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt(seed, i)}]
            prev: list[int] | None = None
            for t in range(turns):
                messages.append({"role": "user", "content": f"Turn {t}: what is step {t + 1} of the plan?"})
                ids = tokenizer.apply_chat_template(messages)
                body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
                async with session.post(base_url + "/v1/chat/completions", json=body) as response:
                    data = await response.json()
                    assert response.status == 200, data
                    replica = response.headers["x-prefixgate-replica"]
                usage = data["usage"]
                assert usage["prompt_tokens"] == len(ids)
                cached = usage["prompt_tokens_details"]["cached_tokens"]
                out.append(Turn(i, t, replica, len(ids), cached, _ideal(prev, ids, block)))
                messages.append({"role": "assistant", "content": data["choices"][0]["message"]["content"]})
                prev = ids

        await asyncio.gather(*(agent(i) for i in range(agents)))
    return out


def summary(turns: list[Turn]) -> dict[str, float]:
    later = [t for t in turns if t.turn > 0]
    first_replica = {(t.agent, t.turn): t.replica for t in turns}
    stayed = sum(1 for t in later if first_replica[(t.agent, t.turn - 1)] == t.replica)
    delivered = sum(t.cached_tokens for t in turns)
    ideal = sum(t.ideal_cached_tokens for t in turns)
    return {
        "turns": len(turns),
        "later_turns_on_prefix_holder": stayed / len(later),
        "delivered_cached_tokens": delivered,
        "ideal_cached_tokens": ideal,
        "delivered_vs_ideal": delivered / ideal if ideal else 0.0,
        "prompt_tokens": sum(t.prompt_tokens for t in turns),
        "first_turn_min_prompt_tokens": min(t.prompt_tokens for t in turns if t.turn == 0),
    }


REPORT: dict[str, Any] = {}


@pytest.fixture(scope="module")
def cluster(procs, smollm2_dir: Path, engine_cmd, gateway_cmd):
    replicas = [procs(*engine_cmd) for _ in range(2)]
    for replica in replicas:
        replica.wait_ready()
    kv = procs(gateway_cmd(replicas)).wait_ready(60)
    rr = procs(gateway_cmd(replicas, "round_robin")).wait_ready(60)
    return {"replicas": replicas, "kv": kv, "rr": rr, "tokenizer": GatewayTokenizer(smollm2_dir)}


def test_openai_clients_through_the_gateway(cluster) -> None:
    client = openai.OpenAI(base_url=cluster["kv"].url + "/v1", api_key="none", max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="default", messages=question, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content.startswith("The capital of France is Paris")
    chunks = list(
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=question,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            stop=["Paris"],
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is "
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == whole.usage.prompt_tokens
    # The same prompt again: routed to a replica that holds it, which reuses its blocks.
    again = client.chat.completions.create(messages=question, model="default", max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == (again.usage.prompt_tokens - 1) // 16 * 16
    completion = client.completions.create(
        model="default", prompt="The capital of France is", max_tokens=3, temperature=0
    )
    assert completion.choices[0].text and completion.usage.completion_tokens == 3
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=question, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="default", messages=question, max_tokens=100_000)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:  # refused by the replica, passed through
        client.chat.completions.create(model="default", messages=question, max_tokens=2, temperature=-1)
    assert err.value.body["param"] == "temperature"


def test_agents_stay_on_the_replica_holding_their_prefix(cluster) -> None:
    tokenizer = cluster["tokenizer"]
    started = time.perf_counter()
    kv = summary(asyncio.run(run_agents(cluster["kv"].url, tokenizer, seed=1)))
    kv["seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    rr = summary(asyncio.run(run_agents(cluster["rr"].url, tokenizer, seed=2)))
    rr["seconds"] = round(time.perf_counter() - started, 1)
    REPORT.update(kv_aware=kv, round_robin=rr)
    print("\n8 agents x 6 turns, 2 replicas:\n" + json.dumps(REPORT, indent=1))
    assert kv["first_turn_min_prompt_tokens"] >= 1500
    assert kv["later_turns_on_prefix_holder"] >= 0.95, kv
    assert kv["delivered_vs_ideal"] >= 0.90, kv
    assert rr["delivered_vs_ideal"] < kv["delivered_vs_ideal"], (kv, rr)


async def hot_prefix_burst(base_url: str, seed: int, burst: int = 24) -> dict[str, Any]:
    """Warm a fresh ~650-token prefix on one replica, then send `burst` requests sharing it at once."""
    prefix = system_prompt(seed, 0, words=600)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def ask(i: int) -> tuple[str, float, float]:
            messages = [{"role": "system", "content": prefix}, {"role": "user", "content": f"Question {i}?"}]
            sent = time.perf_counter()
            body = {"messages": messages, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            async with session.post(base_url + "/v1/chat/completions", json=body) as response:
                data = await response.json()
                assert response.status == 200, data
                return response.headers["x-prefixgate-replica"], sent, time.perf_counter()

        holder, _, _ = await ask(-1)
        results = await asyncio.gather(*(ask(i) for i in range(burst)))
    counts: dict[str, int] = {}
    for replica, _, _ in results:
        counts[replica] = counts.get(replica, 0) + 1
    return {
        "holder": holder,
        "on_holder": counts.get(holder, 0),
        "counts": counts,
        # Every request was sent before any finished: the counts are in-flight requests at the peak.
        "overlapped": max(r[1] for r in results) < min(r[2] for r in results),
    }


def test_a_hot_prefix_burst_spreads_under_kv_aware_and_piles_up_under_sglang(cluster, procs, gateway_cmd):
    replicas = cluster["replicas"]
    burst = 24
    kv = asyncio.run(hot_prefix_burst(cluster["kv"].url, seed=11, burst=burst))
    sglang = procs(gateway_cmd(replicas, "sglang_cache_aware")).wait_ready(60)
    try:
        sg = asyncio.run(hot_prefix_burst(sglang.url, seed=12, burst=burst))
    finally:
        sglang.stop()
    REPORT.update(hot_prefix_kv_aware=kv, hot_prefix_sglang_cache_aware=sg)
    print("\nhot prefix burst of 24 on 2 replicas:\n" + json.dumps({"kv_aware": kv, "sglang": sg}, indent=1))
    assert kv["overlapped"] and sg["overlapped"]
    mean = burst / len(replicas)
    # kv_aware: the holder takes the first few (their prefill is free there), then the other
    # replica prefills the prefix once and both share the burst.
    assert max(kv["counts"].values()) <= 1.5 * mean, kv
    # sgl-router's algorithm, as documented: while the load gap stays under its absolute
    # threshold (32 requests), every request above the match-rate threshold goes to the holder.
    assert sg["on_holder"] == burst, sg


async def _chat(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], **extra: Any):
    body = {"messages": messages, "max_tokens": 2, "temperature": 0, **extra}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        data = await response.json()
        return response.status, response.headers.get("x-prefixgate-replica"), data


def test_a_restarted_gateway_routes_by_the_replicas_snapshots(cluster, procs, gateway_cmd) -> None:
    replicas = cluster["replicas"]
    messages = [
        {"role": "system", "content": "restart test " + "alpha beta gamma delta " * 80},
        {"role": "user", "content": "hello"},
    ]

    async def go(url: str) -> tuple[int, str | None, Any]:
        async with aiohttp.ClientSession() as session:
            return await _chat(session, url, messages)

    status, holder, _ = asyncio.run(go(cluster["kv"].url))
    assert status == 200
    cluster["kv"].stop()
    fresh = procs(gateway_cmd(replicas))
    fresh.wait_ready(60)
    cluster["kv"] = fresh
    # Load balancing must not move it: only the index, rebuilt from snapshots, knows the holder.
    status, replica, data = asyncio.run(go(fresh.url))
    assert status == 200 and replica == holder
    assert data["usage"]["prompt_tokens_details"]["cached_tokens"] >= 320
    metrics = urlopen_text(fresh.url + "/metrics")
    assert 'prefixgate_gateway_routing_decisions_total{policy="kv_aware",reason="cache_hit"} 1.0' in metrics


def urlopen_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_kill9_replica_requests_move_to_the_other_and_it_rejoins_exact(cluster) -> None:
    replicas = cluster["replicas"]
    gateway = cluster["kv"]
    victim, survivor = replicas

    async def one(session: aiohttp.ClientSession, i: int, began: dict[int, float]) -> tuple[int, str, str]:
        messages = [
            {"role": "system", "content": f"kill test {i} " + "lorem ipsum dolor sit " * 120},
            {"role": "user", "content": "hi"},
        ]
        body = {"messages": messages, "max_tokens": 2, "temperature": 0, "stream": True}
        async with session.post(gateway.url + "/v1/chat/completions", json=body) as response:
            began[i] = time.monotonic()
            text = await response.text()
            return response.status, response.headers.get("x-prefixgate-replica", ""), text

    streaming = asyncio.Semaphore(0)

    async def long_stream(session: aiohttp.ClientSession, i: int) -> tuple[str, str]:
        messages = [{"role": "user", "content": f"Write a long story number {i}."}]
        body = {"messages": messages, "max_tokens": 200, "ignore_eos": True, "stream": True}
        async with session.post(gateway.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            streaming.release()
            return response.headers["x-prefixgate-replica"], await response.text()

    async def run() -> tuple[list[tuple[int, str, str]], dict[int, float], float, list[tuple[str, str]]]:
        began: dict[int, float] = {}
        async with aiohttp.ClientSession() as session:
            # Streams that are mid-way when the replica dies, on both replicas (load spreads them).
            streams = [asyncio.create_task(long_stream(session, i)) for i in range(4)]
            for _ in streams:  # all four streaming (routed by load alone) before anything else is sent
                await asyncio.wait_for(streaming.acquire(), 120)
            tasks = [asyncio.create_task(one(session, i, began)) for i in range(6)]
            await asyncio.sleep(0.5)
            victim.kill9()
            killed_at = time.monotonic()
            return await asyncio.gather(*tasks), began, killed_at, await asyncio.gather(*streams)

    results, began, killed_at, streams = asyncio.run(run())
    # A stream cut after its first token ends with an OpenAI-style error event, then [DONE].
    cut = [text for replica, text in streams if replica == victim.url]
    whole = [text for replica, text in streams if replica == survivor.url]
    assert cut and whole, [replica for replica, _ in streams]
    for text in cut:
        events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "replica_failed" and error["message"], error
    for text in whole:
        assert '"error"' not in text and text.endswith("data: [DONE]\n\n")
    for i, (status, replica, text) in enumerate(results):
        if began[i] > killed_at:  # not streaming when the replica died: must succeed elsewhere
            assert status == 200 and replica == survivor.url, (status, replica, text)
            assert '"error"' not in text and text.endswith("data: [DONE]\n\n"), text
    assert sum(1 for i in began if began[i] > killed_at) >= 1
    state = {r["url"]: r for r in gateway.get("/admin/replicas")["replicas"]}
    assert state[victim.url]["status"] == "unhealthy"
    assert "prefixgate_gateway_retries_total" in urlopen_text(gateway.url + "/metrics")

    victim.start().wait_ready()
    deadline = time.monotonic() + 30
    while gateway.get("/admin/replicas")["replicas"][0]["status"] != "healthy":
        assert time.monotonic() < deadline, gateway.get("/admin/replicas")
        time.sleep(0.2)

    async def traffic() -> set[str]:
        async with aiohttp.ClientSession() as session:
            out = await asyncio.gather(
                *(
                    _chat(session, gateway.url, [{"role": "user", "content": f"rejoin {i} " + "word " * 60}])
                    for i in range(4)
                )
            )
        return {replica for _, replica, _ in out if replica}

    assert victim.url in asyncio.run(traffic())
    time.sleep(0.5)
    held = set(victim.get("/debug/cache")["cached_block_hashes"])
    indexed = {r["url"]: r for r in gateway.get("/admin/replicas")["replicas"]}[victim.url]
    assert indexed["status"] == "healthy" and indexed["resyncs"] >= 2
    assert indexed["index_blocks"] == len(held) > 0
