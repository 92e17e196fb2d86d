"""A /kv/events subscriber keeps an exact copy of the replica's cached block hashes."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import aiohttp
import msgspec
import pytest

from cache.replica_index import ApplyOutcome, ReplicaPrefixIndex
from engine.server.protocol import (
    BlockRemoved,
    BlockStored,
    CacheSnapshot,
    Heartbeat,
    KVStreamMessage,
    apply_kv_message,
    from_wire,
)

pytestmark = pytest.mark.slow

_decoder = msgspec.json.Decoder(KVStreamMessage)


class Mirror:
    """What a gateway keeps: the snapshot, then every event applied in order.

    Two copies: a plain set, and the gateway's own ReplicaPrefixIndex fed the same stream.
    """

    def __init__(self) -> None:
        self.hashes: set[int] = set()
        self.index = ReplicaPrefixIndex()
        self.last_seq: int | None = None
        self.stored = 0
        self.removed = 0
        self.snapshot_seq: int | None = None
        self.changed = asyncio.Event()
        self.error: BaseException | None = None

    def apply(self, line: bytes) -> None:
        message = _decoder.decode(line)
        if isinstance(message, CacheSnapshot):
            self.snapshot_seq = message.seq
            self.index.load_snapshot(message.block_hashes, message.seq)
        elif isinstance(message, Heartbeat):
            assert not self.index.note_heartbeat(message.seq)
        else:
            assert self.last_seq is not None and message.seq == self.last_seq + 1, "gap in sequence numbers"
            assert self.index.apply(*from_wire(message)) is ApplyOutcome.APPLIED
        if isinstance(message, BlockStored):
            self.stored += 1
            assert len(message.token_ids) == len(message.block_hashes) * message.block_size
            assert message.medium == "GPU"
        if isinstance(message, BlockRemoved):
            self.removed += 1
        apply_kv_message(self.hashes, message)
        self.last_seq = message.seq
        self.changed.set()

    async def follow(self, session: aiohttp.ClientSession, url: str) -> None:
        try:
            async with session.get(url + "/kv/events") as response:
                assert response.status == 200
                assert response.headers["content-type"].startswith("application/x-ndjson")
                async for line in response.content:
                    if line.strip():
                        self.apply(line)
        except Exception as err:  # surfaced by wait_for, in the test's own task
            self.error = err
            self.changed.set()

    async def wait_for(self, seq: int, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while self.last_seq is None or self.last_seq < seq:
                self.changed.clear()
                await self.changed.wait()
                if self.error is not None:
                    raise self.error


async def debug_state(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/debug/cache") as response:
        assert response.status == 200
        return json.loads(await response.read())  # type: ignore[no-any-return]


async def assert_exact(session: aiohttp.ClientSession, url: str, *mirrors: Mirror) -> dict[str, Any]:
    """With no request in flight, every mirror equals the replica's cache at its last seq."""
    state = await debug_state(session, url)
    assert not state["running"] and not state["waiting"], state
    assert state["integrity_error"] is None
    for mirror in mirrors:
        await mirror.wait_for(state["last_seq"])
        assert mirror.last_seq == state["last_seq"]
        assert mirror.hashes == set(state["cached_block_hashes"])
        assert set(mirror.index) == mirror.hashes and mirror.index.orphaned_blocks == 0
    return state


async def complete(session: aiohttp.ClientSession, url: str, prompt: list[int]) -> None:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    async with session.post(url + "/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["usage"]["completion_tokens"] == 2


def prompts(rng: random.Random, count: int, length: int) -> list[list[int]]:
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(count)]


async def scenario(url: str) -> None:
    rng = random.Random(4)
    async with aiohttp.ClientSession() as session:
        # 20 requests of 3 blocks each into a 64-block pool already used by other tests.
        for _ in range(4):
            await asyncio.gather(*(complete(session, url, p) for p in prompts(rng, 5, 48)))
        late = Mirror()
        follower = asyncio.create_task(late.follow(session, url))
        state = await assert_exact(session, url, late)
        assert late.snapshot_seq is not None and state["cached_block_hashes"]
        assert late.snapshot_seq >= 20  # it connected after the traffic: the snapshot carries it

        # Live traffic that must evict (36 more blocks); a second subscriber joins meanwhile.
        wave = [asyncio.create_task(complete(session, url, p)) for p in prompts(rng, 6, 96)]
        await asyncio.sleep(0.2)
        joiner = Mirror()
        joiner_task = asyncio.create_task(joiner.follow(session, url))
        await asyncio.gather(*wave)
        # Shared prefixes: later prompts extend earlier ones, so the tree splits and grows.
        base = prompts(rng, 1, 48)[0]
        for extra in range(3):
            await complete(session, url, base + prompts(rng, 1, 16 * (extra + 1))[0])
        await assert_exact(session, url, late, joiner)
        assert late.stored >= 6 and late.removed > 0, (late.stored, late.removed)
        for task in (follower, joiner_task):
            task.cancel()


def test_late_subscriber_stays_exact_through_evictions(smol_replica) -> None:
    asyncio.run(scenario(smol_replica.url))
    assert smol_replica.debug()["load"]["num_blocks"] == 64
