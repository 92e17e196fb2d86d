"""Faults under load: a replica hung (SIGSTOP), its engine core hung, slow, restarted with a
cold cache; the gateway restarted. Real processes on 127.0.0.1, the real embedded model.

For each fault, a stream of concurrent requests runs through the gateway while the fault
hits. A request is lost when it fails before its first token (it could have been retried
on the other replica); a stream that had started may end with an error event, but only if
it started before the fault. Afterwards the system must be whole again by itself: every
replica healthy in the gateway, every KV block free or cached, nothing left in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.gateway.conftest import Proc

pytestmark = pytest.mark.slow

# The default core-stall bound (5 s of silence from the core process), said out loud.
ENGINE_EXTRA = ["--core-stall-timeout", "5"]


@dataclass
class Outcome:
    status: int
    replica: str
    began: float  # when the first byte of the answer arrived (monotonic); inf if never
    error: str | None  # the error event's code, for a stream cut mid-way
    done: bool  # ended with [DONE]


def _tree(pid: int) -> list[int]:
    """The process and its descendants (the replica's engine core is a child)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


async def _stream(session: aiohttp.ClientSession, url: str, i: int, max_tokens: int) -> Outcome:
    messages = [
        {"role": "system", "content": f"fault drill {i}: " + "harbor lantern signal tide " * 40},
        {"role": "user", "content": f"Report {i}."},
    ]
    body = {"messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            began = time.monotonic()
            replica = response.headers.get("x-prefixgate-replica", "")
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError) as err:
        return Outcome(0, "", float("inf"), f"{type(err).__name__}", False)
    if response.status != 200:
        return Outcome(response.status, replica, float("inf"), text[:300], False)
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    error = None
    if len(events) >= 2 and '"error"' in events[-2]:
        error = json.loads(events[-2])["error"]["code"]
    return Outcome(200, replica, began, error, bool(events) and events[-1] == "[DONE]")


def drill(
    gateway: Proc,
    fault: Callable[[], None],
    requests: int = 16,
    spacing_s: float = 0.25,
    fault_after_s: float = 1.0,
    max_tokens: int = 24,
) -> tuple[list[Outcome], float]:
    """`requests` streams sent `spacing_s` apart; `fault()` runs after `fault_after_s`."""

    async def run() -> tuple[list[Outcome], float]:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks = []
            fault_at = float("inf")
            started = time.monotonic()
            for i in range(requests):
                tasks.append(asyncio.create_task(_stream(session, gateway.url, i, max_tokens)))
                await asyncio.sleep(spacing_s)
                if fault_at == float("inf") and time.monotonic() - started >= fault_after_s:
                    await asyncio.to_thread(fault)
                    fault_at = time.monotonic()
            return await asyncio.gather(*tasks), fault_at

    return asyncio.run(run())


def assert_nothing_lost(outcomes: list[Outcome], fault_at: float) -> None:
    for outcome in outcomes:
        # Every request answered 200: one that had not started was retried elsewhere.
        assert outcome.status == 200, outcome
        assert outcome.done, outcome
        if outcome.error is not None:  # only a stream already running may be cut
            assert outcome.error == "replica_failed" and outcome.began < fault_at, outcome


def wait_whole(gateway: Proc, replicas: list[Proc], timeout: float = 60.0) -> None:
    """Every replica healthy in the gateway, idle, holding no block for a request, integrity ok."""
    deadline = time.monotonic() + timeout
    while True:
        state = {r["url"]: r for r in gateway.get("/admin/replicas")["replicas"]}
        debug = [replica.get("/debug/cache") for replica in replicas]
        healthy = all(state[r.url]["status"] == "healthy" for r in replicas)
        idle = all(not d["running"] and not d["waiting"] and d["in_flight"] == 0 for d in debug)
        if healthy and idle:
            break
        assert time.monotonic() < deadline, (state, debug)
        time.sleep(0.2)
    for d in debug:
        assert d["integrity_error"] is None, d
    assert all(r["in_flight"] == 0 for r in state.values()), state


@pytest.fixture(scope="module")
def faults_cluster(procs, engine_cmd, gateway_cmd):
    args, env = engine_cmd
    replicas = [procs([*args, *ENGINE_EXTRA], env) for _ in range(2)]
    for replica in replicas:
        replica.wait_ready()
    gateway = procs(gateway_cmd(replicas)).wait_ready(60)
    return {"replicas": replicas, "gateway": gateway}


def test_a_hung_replica_is_detected_by_its_silence_and_nothing_is_lost(faults_cluster) -> None:
    gateway, replicas = faults_cluster["gateway"], faults_cluster["replicas"]
    victim = replicas[0]
    stopped = _tree(victim.process.pid)
    try:
        outcomes, fault_at = drill(gateway, lambda: _signal(stopped, signal.SIGSTOP))
        assert_nothing_lost(outcomes, fault_at)
        state = {r["url"]: r for r in gateway.get("/admin/replicas")["replicas"]}
        assert state[victim.url]["status"] == "unhealthy", state
        assert "hung" in (state[victim.url]["last_error"] or ""), state
    finally:
        _signal(stopped, signal.SIGCONT)
    wait_whole(gateway, replicas)


def test_a_hung_engine_core_stops_the_heartbeats_and_is_failed_over(faults_cluster) -> None:
    gateway, replicas = faults_cluster["gateway"], faults_cluster["replicas"]
    victim = replicas[1]
    core = [pid for pid in _tree(victim.process.pid) if pid != victim.process.pid]
    assert core, "the replica's engine core process was not found"
    try:
        # Without the stall check its requests would wait on the live HTTP front forever.
        outcomes, fault_at = drill(gateway, lambda: _signal(core, signal.SIGSTOP), requests=12)
        assert_nothing_lost(outcomes, fault_at)
        assert any(o.replica == victim.url for o in outcomes if o.began < fault_at)
    finally:
        _signal(core, signal.SIGCONT)
    wait_whole(gateway, replicas)


def test_a_slow_replica_loses_nothing(faults_cluster) -> None:
    gateway, replicas = faults_cluster["gateway"], faults_cluster["replicas"]
    pids = _tree(replicas[0].process.pid)
    stop = asyncio.Event()

    async def slow_down() -> None:  # stopped 40% of the time: slow, still alive
        while not stop.is_set():
            _signal(pids, signal.SIGSTOP)
            await asyncio.sleep(0.4)
            _signal(pids, signal.SIGCONT)
            await asyncio.sleep(0.6)

    async def run() -> list[Outcome]:
        slow = asyncio.create_task(slow_down())
        try:
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                tasks = []
                for i in range(16):
                    tasks.append(asyncio.create_task(_stream(session, gateway.url, 100 + i, 24)))
                    await asyncio.sleep(0.25)
                return await asyncio.gather(*tasks)
        finally:
            stop.set()
            await slow
            _signal(pids, signal.SIGCONT)

    outcomes = asyncio.run(run())
    for outcome in outcomes:  # slow is not dead: no request fails, no stream is cut
        assert outcome.status == 200 and outcome.done and outcome.error is None, outcome
    wait_whole(gateway, replicas)


def test_a_replica_restarted_cold_under_load_rejoins_with_an_exact_index(faults_cluster) -> None:
    gateway, replicas = faults_cluster["gateway"], faults_cluster["replicas"]
    victim = replicas[0]

    def restart() -> None:
        victim.kill9()
        victim.start()

    outcomes, fault_at = drill(gateway, restart, requests=20, spacing_s=0.4)
    assert_nothing_lost(outcomes, fault_at)
    victim.wait_ready()
    wait_whole(gateway, replicas)
    # The restarted replica is cold: the gateway's index for it holds exactly what it caches.
    held = set(victim.get("/debug/cache")["cached_block_hashes"])
    state = {r["url"]: r for r in gateway.get("/admin/replicas")["replicas"]}[victim.url]
    assert state["resyncs"] >= 2 and state["index_blocks"] == len(held)


def test_a_gateway_restarted_under_load_loses_no_request(faults_cluster, procs, gateway_cmd) -> None:
    replicas, old = faults_cluster["replicas"], faults_cluster["gateway"]
    port = old.port

    async def ask(i: int) -> str:
        # The official SDK retries a refused or dropped connection (here up to 6 times, ~30 s).
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=6)
        async with client:
            await asyncio.sleep(0.3 * i)
            answer = await client.chat.completions.create(
                model="SmolLM2-135M-Instruct",
                messages=[{"role": "user", "content": f"restart drill {i} " + "quiet river " * 30}],
                max_tokens=16,
                extra_body={"ignore_eos": True},
            )
            return answer.choices[0].finish_reason

    async def run() -> list[str]:
        tasks = [asyncio.create_task(ask(i)) for i in range(12)]
        await asyncio.sleep(1.2)
        await asyncio.to_thread(old.kill9)
        await asyncio.to_thread(old.start)  # same port, a fresh process: empty state, snapshots
        return await asyncio.gather(*tasks)

    assert asyncio.run(run()) == ["length"] * 12
    old.wait_ready(60)
    wait_whole(old, replicas)


def test_the_idle_deadline_fails_over_what_heartbeats_do_not_catch(
    faults_cluster, procs, gateway_cmd
) -> None:
    replicas = faults_cluster["replicas"]
    # Liveness checks off in effect: only the per-request idle deadline can notice the hang.
    # The deadline must exceed the longest gap between bytes of a healthy request (a queued
    # prefill on this CPU takes seconds); the light load below keeps those gaps short.
    gateway = procs(
        gateway_cmd(replicas, extra=["--liveness-timeout", "600", "--upstream-idle-timeout", "8"])
    ).wait_ready(60)
    victim = replicas[1]
    stopped = _tree(victim.process.pid)
    try:
        outcomes, fault_at = drill(
            gateway, lambda: _signal(stopped, signal.SIGSTOP), requests=6, spacing_s=0.5
        )
        assert_nothing_lost(outcomes, fault_at)
    finally:
        _signal(stopped, signal.SIGCONT)
    wait_whole(gateway, replicas)
    gateway.stop()
