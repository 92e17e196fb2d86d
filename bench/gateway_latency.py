"""What a router adds in front of a replica: our gateway against sglang-router, in one run.

    python -m bench.gateway_latency [--requests 1000] [--seconds 4] [--out bench/results]

Starts, as real processes on 127.0.0.1, a fast mock replica (bench/mock_replica.py), our
gateway (`python -m prefixgate.cli gateway --replica MOCK`) and sglang-router
(`python -m sglang_router.launch_router --worker-urls MOCK`, `pip install -e '.[bench]'`),
both with their default routing policy. One aiohttp client with keep-alive connections then
sends the same chat completion (16 output tokens) to each target (the mock directly, the
gateway, sglang-router), streamed and not:

- latency: requests one at a time; a stream is timed to its `data: [DONE]`. Targets take
  turns in small batches, so load from elsewhere on the machine hits all of them alike;
- throughput: 32 requests in flight for a few seconds, requests/s (also taking turns);
- two floors: bench/tcp_pipe.py, a Python process that only copies bytes between the client
  and the mock (no HTTP parsing): what any Python process in the path adds at the least; and
  bench/http_floor.py, one that parses HTTP both ways, sends a fixed token request to the
  mock and answers with fixed bytes: what a Python router that speaks HTTP adds at the least;
- paced: a second mock (with its own gateway and sglang-router) spaces its streamed tokens
  2 ms apart, as an engine's decode steps do, and holds a non-streamed answer as long: what a
  router adds when chunks arrive one at a time rather than all at once (write coalescing
  cannot help there, Nagle's algorithm and delayed ACKs can hurt), and what it adds to a
  non-streamed answer when, as from an engine, its tokens come over time (our gateway reads
  the replica's token frames as they come either way, so only the last one's work is left
  when the answer completes).

A router's added latency is its percentile minus the mock's own in the same run. Prints a
markdown table; writes gateway_latency.json and gateway_latency.md under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp

from bench.mock_replica import MODEL_NAME, OUTPUT_TOKENS

PACED_MS = 2.0
_TARGETS = ["mock (direct)", "Python TCP pipe", "Python HTTP floor", "prefixgate gateway", "sglang-router"]
_DONE = b"data: [DONE]\n\n"
_numbers = itertools.count()
_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France, and what is it known for?"},
]


@dataclass
class Figures:
    target: str
    mode: str
    latencies_ms: list[float] = field(default_factory=list)
    completed: int = 0
    busy_s: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)]

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.busy_s if self.busy_s else 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _spawn(started: list[subprocess.Popen[bytes]], args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        started.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT))


def _wait_up(url: str, process: subprocess.Popen[bytes], deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2.0) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not up after {deadline_s:.0f} s")


def _body(stream: bool, number: int = 0) -> bytes:
    """The request; its user message differs each time, as a real one would (the system prompt
    repeats: a tokenizer cache may keep that part, never the whole prompt)."""
    system, user = _MESSAGES
    messages = [system, {**user, "content": f"{user['content']} (question {number})"}]
    return json.dumps(
        {"model": MODEL_NAME, "messages": messages, "max_tokens": OUTPUT_TOKENS, "stream": stream}
    ).encode()


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> float:
    """Seconds until the whole answer (a stream: its [DONE]) has arrived."""
    started = time.perf_counter()
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {(await response.read())[:300]!r}")
        if not stream:
            payload = await response.read()
            elapsed = time.perf_counter() - started
            if b'"choices"' not in payload:
                raise RuntimeError(f"{url}: no choices in {payload[:300]!r}")
            return elapsed
        tail = b""
        elapsed = None
        async for chunk in response.content.iter_any():
            tail = (tail + chunk)[-len(_DONE) :]
            if elapsed is None and tail.endswith(_DONE):
                elapsed = time.perf_counter() - started
        if elapsed is None:
            raise RuntimeError(f"{url}: the stream ended without [DONE]")
        return elapsed


async def _wait_ready(session: aiohttp.ClientSession, url: str, deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            await _one(session, url, _body(False), False)
            await _one(session, url, _body(True), True)
            return
        except (aiohttp.ClientError, RuntimeError, OSError) as err:
            last = err
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {deadline_s:.0f} s: {last}")


async def _sequential(
    session: aiohttp.ClientSession, url: str, stream: bool, figures: Figures, n: int
) -> None:
    for _ in range(n):
        body = _body(stream, next(_numbers))
        figures.latencies_ms.append(await _one(session, url, body, stream) * 1e3)


async def _concurrent(
    session: aiohttp.ClientSession, url: str, stream: bool, figures: Figures, concurrency: int, seconds: float
) -> None:
    deadline = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await _one(session, url, _body(stream, next(_numbers)), stream)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    figures.busy_s += time.perf_counter() - started
    figures.completed += done


@dataclass(frozen=True)
class Mode:
    name: str
    stream: bool
    paced: bool  # against the mock that spaces its tokens (latency only)


MODES = (
    Mode("non-streaming", False, False),
    Mode("streaming", True, False),
    Mode(f"non-streaming, {PACED_MS:g} ms between tokens", False, True),
    Mode(f"streaming, {PACED_MS:g} ms between tokens", True, True),
)


async def measure(
    fast: dict[str, str],
    paced: dict[str, str],
    requests: int,
    seconds: float,
    concurrency: int,
    rounds: int,
) -> dict[tuple[str, str], Figures]:
    figures = {(t, m.name): Figures(t, m.name) for t in fast for m in MODES}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for url in [*fast.values(), *paced.values()]:
            await _wait_ready(session, url)
        for url in fast.values():  # warm up: connections, caches, lazy imports
            for stream in (False, True):
                await _sequential(session, url, stream, Figures("", ""), 100)
                await _concurrent(session, url, stream, Figures("", ""), concurrency, 0.5)
        for url in paced.values():
            await _sequential(session, url, True, Figures("", ""), 5)
        for _ in range(rounds):
            for mode in MODES:
                targets = paced if mode.paced else fast
                # A paced request lasts ~20 ms more: fewer of them keep the run short.
                count = max(requests // rounds // (8 if mode.paced else 1), 1)
                for name, url in targets.items():
                    await _sequential(session, url, mode.stream, figures[name, mode.name], count)
        for _ in range(2):
            for mode in MODES:
                if mode.paced:
                    continue
                for name, url in fast.items():
                    await _concurrent(
                        session, url, mode.stream, figures[name, mode.name], concurrency, seconds / 2
                    )
    return figures


def _machine() -> dict[str, Any]:
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("aiohttp", "uvicorn", "litestar", "msgspec", "sglang-router", "uvloop", "httptools"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "packages": versions,
    }


def _rows(figures: dict[tuple[str, str], Figures]) -> list[dict[str, Any]]:
    rows = []
    for (target, mode), f in figures.items():
        base = figures["mock (direct)", mode]
        p50, p99 = f.percentile(0.5), f.percentile(0.99)
        rows.append(
            {
                "target": target,
                "mode": mode,
                "requests": len(f.latencies_ms),
                "p50_ms": p50,
                "p99_ms": p99,
                "mean_ms": statistics.fmean(f.latencies_ms),
                "added_p50_ms": p50 - base.percentile(0.5),
                "added_p99_ms": p99 - base.percentile(0.99),
                "requests_per_s": f.requests_per_s,
            }
        )
    return sorted(
        rows,
        key=lambda r: ([m.name for m in MODES].index(r["mode"]), _TARGETS.index(r["target"])),
    )


def markdown(
    rows: list[dict[str, Any]], machine: dict[str, Any], load: tuple[float, float], concurrency: int
) -> str:
    lines = [
        f"Machine: {machine['arch']}, {machine['cores']} cores ({machine['cpu']}), shared with other work "
        f"(load average {load[0]:.2f} before, {load[1]:.2f} after); Python {machine['python']}; "
        f"sglang-router {machine['packages'].get('sglang-router', '?')}.",
        f"A chat completion with {OUTPUT_TOKENS} output tokens from a mock replica (answering at once, or "
        f"with {PACED_MS:g} ms between streamed tokens as an engine would); latency one request at a time "
        f"on a keep-alive connection (a stream: until `data: [DONE]`); req/s at {concurrency} in flight. "
        "Added = the target's percentile minus the mock's own, in the same run; both routers run their "
        "default policy (ours kv_aware, sglang-router cache_aware).",
        "",
        "| mode | target | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        direct = r["target"] == "mock (direct)"
        added = ("—", "—") if direct else (f"{r['added_p50_ms']:.2f}", f"{r['added_p99_ms']:.2f}")
        lines.append(
            f"| {r['mode']} | {r['target']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {added[0]} "
            f"| {added[1]} | {f'{rate:,.0f}' if (rate := r['requests_per_s']) else '—'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per target and mode")
    parser.add_argument("--seconds", type=float, default=4.0, help="throughput time per target and mode")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20, help="turns the targets take in the latency part")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--no-sglang", action="store_true", help="measure only the mock and our gateway")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="gateway_latency-"))
    print(f"process logs: {logs}", file=sys.stderr)
    python = sys.executable
    load_before = os.getloadavg()[0]
    with _processes() as started:

        def targets(pace_ms: float, tag: str) -> dict[str, str]:
            """A mock, our gateway and sglang-router in front of it: name -> chat URL."""
            mock_port, gateway_port, sglang_port, pipe_port, floor_port = (_free_port() for _ in range(5))
            mock = f"http://127.0.0.1:{mock_port}"
            mock_args = ["--port", str(mock_port), "--token-interval-ms", str(pace_ms)]
            _spawn(started, [python, "-m", "bench.mock_replica", *mock_args], logs / f"mock{tag}.log")
            _wait_up(f"{mock}/health", started[-1])  # sglang-router retries a missing worker slowly
            gateway_args = ["--replica", mock, "--port", str(gateway_port), "--log-level", "warning"]
            gateway = [python, "-m", "prefixgate.cli", "gateway", *gateway_args]
            _spawn(started, gateway, logs / f"gateway{tag}.log")
            pipe = [python, "-m", "bench.tcp_pipe", "--port", str(pipe_port), "--upstream", mock[7:]]
            _spawn(started, pipe, logs / f"tcp_pipe{tag}.log")
            floor = [python, "-m", "bench.http_floor", "--port", str(floor_port), "--upstream", mock[7:]]
            _spawn(started, floor, logs / f"http_floor{tag}.log")
            found = {
                "mock (direct)": f"{mock}/v1/chat/completions",
                "Python TCP pipe": f"http://127.0.0.1:{pipe_port}/v1/chat/completions",
                "Python HTTP floor": f"http://127.0.0.1:{floor_port}/v1/chat/completions",
                "prefixgate gateway": f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
            }
            if not args.no_sglang:
                router = ["--host", "127.0.0.1", "--port", str(sglang_port), "--worker-urls", mock]
                router += ["--prometheus-port", str(_free_port())]  # its default, 29000, is shared
                launch = [python, "-m", "sglang_router.launch_router", *router, "--log-level", "warn"]
                _spawn(started, launch, logs / f"sglang_router{tag}.log")
                found["sglang-router"] = f"http://127.0.0.1:{sglang_port}/v1/chat/completions"
            return found

        fast, paced = targets(0.0, ""), targets(PACED_MS, "-paced")
        figures = asyncio.run(
            measure(fast, paced, args.requests, args.seconds, args.concurrency, args.rounds)
        )
    load_after = os.getloadavg()[0]
    machine = _machine()
    rows = _rows(figures)
    table = markdown(rows, machine, (load_before, load_after), args.concurrency)
    print(table)
    result = {
        "machine": machine,
        "load_average": {"before": load_before, "after": load_after},
        "settings": {
            "output_tokens": OUTPUT_TOKENS,
            "sequential_requests": args.requests,
            "throughput_seconds": args.seconds,
            "concurrency": args.concurrency,
        },
        "rows": rows,
    }
    (out / "gateway_latency.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "gateway_latency.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
