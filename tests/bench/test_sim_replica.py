"""Simulated replicas (bench/sim_replica) behind the real gateway, as real processes.

Two simulated replicas in one process, the gateway (kv_aware) in front, the official openai
SDK as the client: a shared prefix goes where it is cached and usage reports it; the
gateway's index follows the replica's KV events, evictions included; /load shows queued work.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from tokenizers import Tokenizer

from bench.sim_replica.words import WordVocab

REPO = Path(__file__).resolve().parents[2]
MODEL = "sim-llama3-8b"
CAPACITY_BLOCKS = 320  # 5,120 tokens: a few long prompts evict the oldest
MAX_NUM_SEQS = 4


def _port_pair() -> int:
    """A port p with p and p + 1 both free."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _wait_up(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[dict[str, object]]:
    logs = tmp_path_factory.mktemp("sim_replica")
    port = _port_pair()
    replicas = [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
    gateway_port = _free_port()
    sim_args = ["--port", str(port), "--replicas", "2", "--capacity-blocks", str(CAPACITY_BLOCKS)]
    sim_args += ["--max-num-seqs", str(MAX_NUM_SEQS), "--time-scale", "1", "--model-folder", str(smollm2_dir)]
    gateway_args = ["gateway", "--policy", "kv_aware", "--port", str(gateway_port), "--log-level", "warning"]
    for url in replicas:
        gateway_args += ["--replica", url]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started: list[subprocess.Popen[bytes]] = []
    try:
        for name, args in (
            ("sim", ["-m", "bench.sim_replica", *sim_args]),
            ("gateway", ["-m", "prefixgate.cli", *gateway_args]),
        ):
            log = logs / f"{name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            started.append(process)
            first = replicas[0] if name == "sim" else f"http://127.0.0.1:{gateway_port}"
            _wait_up(first + "/health", process, log)
        gateway = f"http://127.0.0.1:{gateway_port}"
        deadline = time.monotonic() + 30
        while _get(gateway + "/ready").get("status") != "ready" or len(_healthy(gateway)) < 2:
            assert time.monotonic() < deadline, "the gateway never saw both simulated replicas"
            time.sleep(0.1)
        yield {
            "replicas": replicas,
            "gateway": gateway,
            "words": WordVocab(Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))),
        }
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def _healthy(gateway: str) -> list[str]:
    try:
        listed = _get(gateway + "/admin/replicas")
    except urllib.error.HTTPError:
        return []
    rows = listed if isinstance(listed, list) else listed.get("replicas", listed.get("data", []))
    return [r["url"] for r in rows if r.get("status") == "healthy"]


def _metric(gateway: str, name: str) -> dict[str, float]:
    with urllib.request.urlopen(gateway + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for match in re.finditer(rf'^{name}\{{replica="([^"]+)"\}} (\S+)$', text, re.M):
        out[match.group(1)] = float(match.group(2))
    return out


def _words(cluster: dict[str, object], count: int, seed: int) -> str:
    words: WordVocab = cluster["words"]  # type: ignore[assignment]
    return words.text_for(np.random.default_rng(seed).integers(0, 1 << 30, size=count))


def _chat(client: openai.OpenAI, system: str, question: str, max_tokens: int = 4) -> tuple[str, int, int]:
    """(replica, prompt tokens, cached tokens) of one chat completion through the gateway."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=max_tokens,
    )
    completion = raw.parse()
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert completion.choices[0].finish_reason == "length"
    assert usage.completion_tokens == max_tokens
    return (
        raw.headers["x-prefixgate-replica"],
        usage.prompt_tokens,
        usage.prompt_tokens_details.cached_tokens or 0,
    )


def _client(cluster: dict[str, object]) -> openai.OpenAI:
    # A replica whose step loop died never answers: fail within a minute, not the SDK's ten.
    return openai.OpenAI(base_url=f"{cluster['gateway']}/v1", api_key="none", max_retries=0, timeout=60)


def test_shared_prefix_goes_to_the_replica_that_holds_it(cluster: dict[str, object]) -> None:
    client = _client(cluster)
    system = _words(cluster, 1500, seed=1)
    holder, prompt_tokens, cached = _chat(client, system, "first question")
    assert cached == 0 and prompt_tokens > 1500
    time.sleep(1.2)  # two /load refreshes: the first request's load has left the snapshot
    for i in range(3):
        replica, prompt_tokens, cached = _chat(client, system, f"question number {i}")
        assert replica == holder
        # Every full block of the system prompt is reused; the question's blocks are not.
        assert 1500 - 16 <= cached <= prompt_tokens - 1 and cached % 16 == 0
    # Streamed: usage in the last chunk, with the same cached tokens.
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "streamed"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 6 and len(text.split()) == 6
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens >= 1500 - 16


def test_an_evicted_prefix_is_no_longer_predicted(cluster: dict[str, object]) -> None:
    client = _client(cluster)
    gateway = str(cluster["gateway"])
    system = _words(cluster, 1200, seed=2)
    holder, _, _ = _chat(client, system, "warm up")
    time.sleep(1.2)
    before = sum(_metric(gateway, "prefixgate_gateway_predicted_cached_tokens_total").values())
    replica, _, cached = _chat(client, system, "is it still there")
    predicted = sum(_metric(gateway, "prefixgate_gateway_predicted_cached_tokens_total").values()) - before
    assert replica == holder and cached >= 1200 - 16 and predicted == cached
    # Fill the holder's cache with other prompts, straight to the replica: LRU evicts the prefix.
    direct = openai.OpenAI(base_url=f"{holder}/v1", api_key="none", max_retries=0, timeout=60)
    for seed in range(10, 16):
        direct.completions.create(model=MODEL, prompt=_words(cluster, 1000, seed=seed), max_tokens=2)
    time.sleep(0.5)  # the KV events reach the gateway's index
    before = sum(_metric(gateway, "prefixgate_gateway_predicted_cached_tokens_total").values())
    _, _, cached = _chat(client, system, "gone now")
    predicted = sum(_metric(gateway, "prefixgate_gateway_predicted_cached_tokens_total").values()) - before
    assert predicted == 0 and cached == 0


def test_load_reflects_queued_work(cluster: dict[str, object]) -> None:
    replica = str(cluster["replicas"][1])  # type: ignore[index]
    direct = openai.OpenAI(base_url=f"{replica}/v1", api_key="none", max_retries=0, timeout=60)
    count = MAX_NUM_SEQS * 3

    def one(seed: int) -> int:
        done = direct.completions.create(model=MODEL, prompt=_words(cluster, 40, seed=seed), max_tokens=150)
        assert done.usage is not None
        return done.usage.completion_tokens

    seen_waiting = seen_running = 0
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(one, 100 + i) for i in range(count)]
        deadline = time.monotonic() + 20
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            load = _get(replica + "/load")
            engine = load["engine"]
            assert engine["running"] <= MAX_NUM_SEQS
            assert engine["running"] + engine["waiting"] <= load["in_flight"] <= count
            seen_waiting = max(seen_waiting, engine["waiting"])
            seen_running = max(seen_running, engine["running"])
            time.sleep(0.05)
        assert [f.result() for f in futures] == [150] * count
    assert seen_running == MAX_NUM_SEQS and seen_waiting >= count - 2 * MAX_NUM_SEQS
    idle = _get(replica + "/load")
    assert idle["in_flight"] == 0 and idle["engine"]["running"] == idle["engine"]["waiting"] == 0
    assert idle["engine"]["used_blocks"] == 0  # every block given back (cached ones stay evictable)
