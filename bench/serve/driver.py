"""The load driver: sends a trace's requests on schedule over aiohttp and streams every answer.

Each request is an OpenAI streaming call with `stream_options.include_usage`, `max_tokens`
set to the trace's output length and `ignore_eos` (so the answer has exactly that many tokens
where the server honours it), and the trace's session id as the `x-session-id` header. The
gateway's /metrics is scraped before and after the run (see gateway_stats.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec
from tqdm import tqdm

from bench.serve.gateway_stats import diff_stats, scrape
from bench.serve.metrics import RequestOutcome, compute_metrics
from bench.serve.plan import Plan, PlannedRequest, load_tokenizer, plan_requests
from bench.serve.report import BenchmarkResult, CacheStats, RequestRecord
from bench.workloads.trace import Trace

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class ServeConfig:
    base_url: str  # the server's root, e.g. http://127.0.0.1:8080 (no /v1)
    endpoint: str = "completions"  # or "chat"
    model: str | None = None  # None: the first of GET /v1/models
    request_rate: float | None = None  # requests/s; None: the trace's own arrival times
    burstiness: float = 1.0  # gamma shape of the gaps; 1 = Poisson
    max_concurrency: int | None = None
    seed: int = 0  # arrival draws
    slo_ms: dict[str, float] = field(default_factory=dict)  # ttft / tpot / e2el -> ms, for goodput
    ignore_eos: bool = True
    max_output_len: int | None = None  # caps the trace's output lengths
    tokenizer: str | None = None  # model folder: the vocabulary to fold ids into; text for chat
    vocab_size: int | None = None  # overrides the tokenizer's vocabulary size
    label: str = ""  # e.g. the routing policy; default: the policy the gateway reports
    api_key: str | None = None
    key_salt: int = 0  # > 0: other token ids with the same sharing structure (fresh caches)
    progress: bool = True
    keep_requests: bool = True  # per-request records in the result
    request_timeout_s: float = 6 * 3600.0


async def first_model(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]) -> str:
    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with session.get(url, headers=headers) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {url} answered {response.status}: {body[:200]!r}")
    except aiohttp.ClientError as err:
        raise RuntimeError(f"cannot reach {url}: {err}") from None
    models = _decode(body).get("data") or []
    if not models:
        raise RuntimeError(f"{url} lists no model")
    return str(models[0]["id"])


def _body(config: ServeConfig, model: str, prompt: list[int] | str, request: PlannedRequest) -> bytes:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    if config.ignore_eos:
        payload["ignore_eos"] = True
    return _encode(payload)


def _error_text(status: int, body: bytes) -> str:
    try:
        message = _decode(body)["error"]["message"]
    except (msgspec.DecodeError, KeyError, TypeError):
        message = body[:300].decode("utf-8", "replace")
    return f"HTTP {status}: {message}"


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    request: PlannedRequest,
    run_start: float,
    chat: bool,
) -> RequestOutcome:
    """One streamed request, timed as vLLM times it (see metrics.py for the definitions)."""
    sent = time.perf_counter()
    first: float | None = None
    last_output = last_choice = sent
    itls: list[float] = []
    chunks = 0
    usage: dict[str, Any] | None = None
    error = ""
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                error = _error_text(response.status, await response.read())
            else:
                buffer = b""
                async for received in response.content.iter_any():
                    buffer += received
                    while (newline := buffer.find(b"\n")) >= 0:
                        line, buffer = buffer[:newline].strip(), buffer[newline + 1 :]
                        if not line.startswith(b"data:"):
                            continue  # blank separators, SSE comments (pings)
                        data_bytes = line[5:].strip()
                        if data_bytes == b"[DONE]":
                            continue
                        now = time.perf_counter()
                        event = _decode(data_bytes)
                        if not isinstance(event, dict):
                            continue
                        if event.get("error"):
                            error = str(event["error"].get("message", event["error"]))
                            continue
                        choices = event.get("choices")
                        if choices:
                            choice = choices[0]
                            if chat:
                                delta = choice.get("delta") or {}
                                has_output = bool(
                                    delta.get("content")
                                    or delta.get("tool_calls")
                                    or delta.get("reasoning_content")
                                )
                            else:
                                has_output = bool(choice.get("text"))
                            if has_output:
                                if first is None:
                                    first = now
                                else:
                                    itls.append(now - last_output)
                                last_output = now
                                chunks += 1
                            last_choice = now
                        if event.get("usage"):
                            usage = event["usage"]
    except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as err:
        error = f"{type(err).__name__}: {err}"
    if first is None and not error:
        error = "the stream ended without output"
    success = not error
    prompt_tokens = request.prompt_len  # unless the usage says otherwise (chat templates add some)
    cached: int | None = None
    if usage is not None:
        prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            cached = int(details["cached_tokens"])
    output_tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else chunks
    return RequestOutcome(
        request_id=request.request_id,
        success=success,
        start_s=sent - run_start,
        ttft_s=(first - sent) if first is not None else 0.0,
        latency_s=last_choice - sent if success else 0.0,
        itl_s=tuple(itls),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens if success else 0,
        cached_tokens=cached,
        usage_reported=usage is not None,
        session_id=request.session_id,
        error=error,
    )


async def _replay(
    session: aiohttp.ClientSession, config: ServeConfig, model: str, plan: Plan
) -> tuple[list[RequestOutcome], float]:
    url = config.base_url.rstrip("/") + (
        "/v1/chat/completions" if config.endpoint == "chat" else "/v1/completions"
    )
    base_headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limit: Any = (
        asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext()
    )
    planned = plan.requests
    chat = config.endpoint == "chat"
    finished: dict[str, asyncio.Event] = {r.request_id: asyncio.Event() for r in planned}
    finished_at: dict[str, float] = {}
    rate = "trace" if config.request_rate is None else f"{config.request_rate:g}/s"
    bar = tqdm(
        total=len(planned),
        disable=not config.progress,
        desc=f"{config.label or 'serve'} @ {rate}",
        unit="req",
    )
    start = time.perf_counter()

    async def one(request: PlannedRequest) -> RequestOutcome:
        ready = request.arrival_s or 0.0
        if request.after:
            await asyncio.gather(*(finished[d].wait() for d in request.after))
            ready = max(max(finished_at[d] for d in request.after) + request.think_time_s, ready)
        delay = start + ready - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        headers = {**base_headers, "Content-Type": "application/json"}
        if request.session_id:
            headers["x-session-id"] = request.session_id
        try:
            async with limit:
                # Built once the request may go: at an infinite rate with a concurrency cap,
                # thousands wait here, and their prompts would otherwise all sit in memory.
                body = _body(config, model, plan.prompt(request), request)
                return await send_request(session, url, body, headers, request, start, chat)
        finally:
            finished_at[request.request_id] = time.perf_counter() - start
            finished[request.request_id].set()
            bar.update(1)

    try:
        outcomes = await asyncio.gather(*(one(r) for r in planned))
    finally:
        bar.close()
    return list(outcomes), time.perf_counter() - start


def _rate_label(rate: float | None) -> float | str:
    if rate is None:
        return "trace"
    return "inf" if math.isinf(rate) else rate


async def run_benchmark_async(trace: Trace, config: ServeConfig) -> BenchmarkResult:
    """Replay `trace` against `config.base_url` once and measure it."""
    # The tokenizer turns ids into text for chat, and gives the vocabulary to fold ids into.
    wants_tokenizer = config.tokenizer or config.endpoint == "chat" or config.vocab_size is None
    tokenizer = load_tokenizer(config.tokenizer) if wants_tokenizer else None
    plan = plan_requests(
        trace,
        endpoint=config.endpoint,
        vocab_size=config.vocab_size,
        tokenizer=tokenizer,
        request_rate=config.request_rate,
        burstiness=config.burstiness,
        seed=config.seed,
        max_output_len=config.max_output_len,
        key_salt=config.key_salt,
    )
    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        auth = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        model = config.model or await first_model(session, config.base_url, auth)
        before = await scrape(session, config.base_url)
        outcomes, duration = await _replay(session, config, model, plan)
        after = await scrape(session, config.base_url) if before is not None else None
    gateway = diff_stats(before, after) if before is not None and after is not None else None
    label = config.label or (
        max(gateway.policies, key=gateway.policies.__getitem__) if gateway and gateway.policies else "serve"
    )
    done = [o for o in outcomes if o.success]
    prompt_total = sum(o.prompt_tokens for o in done if o.cached_tokens is not None)
    cached_total = sum(o.cached_tokens or 0 for o in done)
    errors = list(dict.fromkeys(o.error[:300] for o in outcomes if o.error))[:10]
    return BenchmarkResult(
        label=label,
        started_at=started_at,
        base_url=config.base_url,
        endpoint=config.endpoint,
        model=model,
        workload=trace.header.workload,
        trace_seed=trace.header.seed,
        num_requests=len(plan.requests),
        request_rate=_rate_label(config.request_rate),
        burstiness=config.burstiness,
        max_concurrency=config.max_concurrency,
        slo_ms=dict(config.slo_ms),
        metrics=compute_metrics(outcomes, duration, config.slo_ms),
        cache=CacheStats(
            prompt_tokens=prompt_total,
            cached_tokens=cached_total,
            hit_rate=cached_total / prompt_total if prompt_total else 0.0,
            requests_reporting=sum(o.cached_tokens is not None for o in done),
        ),
        gateway=gateway,
        errors=errors,
        requests=[RequestRecord.of(o) for o in outcomes] if config.keep_requests else [],
    )


def run_benchmark(trace: Trace, config: ServeConfig) -> BenchmarkResult:
    """`run_benchmark_async` from synchronous code (starts its own event loop)."""
    return asyncio.run(run_benchmark_async(trace, config))


def run_sweep(trace: Trace, config: ServeConfig, rates: Sequence[float]) -> list[BenchmarkResult]:
    """One run per rate, in order; run i replays the trace salted with i (fresh prefixes)."""
    return [
        run_benchmark(trace, replace(config, request_rate=rate, key_salt=config.key_salt + i))
        for i, rate in enumerate(rates)
    ]
