"""POST /v1/chat/completions, POST /v1/completions, GET /v1/models: the replica's API, routed.

The gateway applies the chat template and tokenizes once, forwards token ids to the chosen
replica's /internal/generate, and detokenizes the frames (stop strings honoured here). The
request and response shapes are the replica's own (engine/server/openai_types.py), so an
OpenAI client cannot tell the two apart, except for the x-prefixgate-replica header (sent only
when the gateway has no API keys).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.response import Stream

from engine.server.chat_prompt import chat_plan, chat_prompt_ids
from engine.server.openai_types import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingFields,
    TopLogprob,
    Usage,
)
from engine.server.protocol import GenerateRequest, TokenLogprob
from engine.server.response_format import ChatOutputPlan
from engine.server.tool_calls import ToolDeltaStream, assistant_message, finish_reason, message_finish_reason
from gateway.auth import OPEN, TENANT_SCOPE_KEY, Tenant
from gateway.errors import ApiError, bad_request, decode_json, error_json
from gateway.openai_inputs import completion_ids, generate_request, stops
from gateway.pool import ModelPool
from gateway.proxy import ProxiedGeneration
from gateway.registry import Registry
from traces.spans import GatewaySpan

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0
_encoder = msgspec.json.Encoder()
_MAX_TOP_LOGPROBS = 20


def registry_of(request: Request[Any, Any, Any]) -> Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


def _sse(message: msgspec.Struct) -> bytes:
    return b"data: " + _encoder.encode(message) + b"\n\n"


def _session_id(request: Request[Any, Any, Any], body: SamplingFields, tenant: Tenant) -> str | None:
    session = request.headers.get("x-session-id") or body.user
    # Tenants' session ids are apart too: one's "user-1" must not steer another's routing.
    return f"{tenant.salt}/{session}" if session and tenant.salt is not None else session


async def _start(
    request: Request[Any, Any, Any],
    registry: Registry,
    pool: ModelPool,
    body: SamplingFields,
    token_ids: list[int],
    generate: GenerateRequest,
) -> ProxiedGeneration:
    generate.token_ids = token_ids
    # Set here, before routing hashes it, so the index and the replica see one salt.
    tenant = request.scope.get(TENANT_SCOPE_KEY, OPEN)
    generate.cache_salt = tenant.cache_salt(generate.cache_salt)
    span = GatewaySpan(
        "chat" if isinstance(body, ChatCompletionRequest) else "text_completion",
        body.model or pool.name,
        request.headers,
        max_tokens=generate.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        n=generate.n,
        seed=body.seed,
        stream=bool(body.stream),
    )
    generation = ProxiedGeneration(
        registry, pool, token_ids, generate, stops(body), _session_id(request, body, tenant), span
    )
    await generation.start()
    return generation


# --- responses ------------------------------------------------------------------------


class _Shaper:
    """Turns a generation's state into the OpenAI shapes (usage, logprobs, whole bodies)."""

    def __init__(self, generation: ProxiedGeneration, model: str, request_id: str) -> None:
        self.generation = generation
        self.tokenizer = generation.pool.tokenizer
        self.model = model
        self.id = request_id
        self.created = int(time.time())
        if generation.span is not None:
            generation.span.response_id(request_id)

    def usage(self) -> Usage:
        g = self.generation
        completion = g.completion_tokens
        return Usage(
            g.prompt_tokens, completion, g.prompt_tokens + completion, PromptTokensDetails(g.cached_tokens)
        )

    def _top(self, entry: TokenLogprob) -> list[tuple[str, float]]:
        return [(self.tokenizer.token_text(t), max(lp, _MIN_LOGPROB)) for t, lp in entry.top]

    def chat_logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        out = []
        for e in entries:
            token = self.tokenizer.token_text(e.token_id)
            top = [TopLogprob(t, lp, list(t.encode())) for t, lp in self._top(e)]
            out.append(ChatTokenLogprob(token, max(e.logprob, _MIN_LOGPROB), list(token.encode()), top))
        return ChatLogprobs(out)

    def completion_logprobs(self, entries: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
        tokens, values, tops, offsets = [], [], [], []
        for e in entries:
            token = self.tokenizer.token_text(e.token_id)
            tokens.append(token)
            values.append(max(e.logprob, _MIN_LOGPROB))
            tops.append(dict(self._top(e)))
            offsets.append(offset)
            offset += len(token)
        return CompletionLogprobs(tokens, values, tops, offsets)


def _headers(
    request: Request[Any, Any, Any], generation: ProxiedGeneration, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The replica that answered, for operators and tests, only on a gateway without API keys:
    a gateway that tells tenants apart is public, and a replica's address is internal."""
    assert generation.replica is not None
    if request.scope.get(TENANT_SCOPE_KEY, OPEN) is not OPEN:
        return extra or {}
    return {"x-prefixgate-replica": generation.replica.url, **(extra or {})}


async def _run_unless_disconnected(request: Request[Any, Any, Any], generation: ProxiedGeneration) -> None:
    # The generation runs in this task; one watcher task cancels it if the client goes away
    # (a second task and asyncio.wait per request cost more than the rest of the proxying).
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def disconnected() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        handler.cancel()

    watcher = asyncio.ensure_future(disconnected())
    try:
        await generation.run()
    except asyncio.CancelledError:
        if not gone:
            raise
        handler.uncancel()
        raise ApiError(499, "the client closed the connection") from None
    finally:
        watcher.cancel()
        generation.close("cancelled")


def _json(body: Any, headers: dict[str, str]) -> Response[bytes]:
    return Response(_encoder.encode(body), media_type="application/json", headers=headers)


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
    registry = registry_of(request)
    body = decode_json(await request.body(), ChatCompletionRequest)
    pool = registry.pool_for(body.model)
    plan = chat_plan(body)
    token_ids = chat_prompt_ids(body, pool.tokenizer, plan)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= _MAX_TOP_LOGPROBS:
        raise bad_request(f"top_logprobs must be between 0 and {_MAX_TOP_LOGPROBS}", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.max_completion_tokens is not None:
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, param = body.max_tokens, "max_tokens"
    generate = generate_request(
        body, pool, len(token_ids), max_tokens, param, logprobs, "messages", plan.grammar
    )
    generation = await _start(request, registry, pool, body, token_ids, generate)
    shaper = _Shaper(generation, body.model or pool.name, f"chatcmpl-{os.urandom(16).hex()}")
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        stream = _chat_stream(shaper, logprobs is not None, include_usage, plan)
        headers = _headers(request, generation, _SSE_HEADERS)
        return Stream(stream, media_type="text/event-stream", headers=headers)
    await _run_unless_disconnected(request, generation)
    choices = []
    for i, s in enumerate(generation.samples):
        text = "".join(s.text)
        if plan.parse_tool_calls:
            message = assistant_message(text, plan.tool_names, plan.max_calls)
        else:
            message = AssistantMessage(text)
        lp = shaper.chat_logprobs(s.logprobs) if logprobs is not None else None
        choices.append(ChatChoice(i, message, lp, message_finish_reason(message, s.finish_reason)))
    completion = ChatCompletion(
        id=shaper.id, created=shaper.created, model=shaper.model, choices=choices, usage=shaper.usage()
    )
    return _json(completion, _headers(request, generation))


async def _chat_stream(
    shaper: _Shaper, logprobs: bool, include_usage: bool, plan: ChatOutputPlan
) -> AsyncIterator[bytes]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        return _sse(
            ChatCompletionChunk(
                id=shaper.id, created=shaper.created, model=shaper.model, choices=choices, usage=usage
            )
        )

    generation = shaper.generation
    tools = None
    if plan.parse_tool_calls:
        tools = [ToolDeltaStream(plan.tool_names, plan.max_calls) for _ in generation.samples]
    try:
        for i in range(len(generation.samples)):
            yield chunk([ChatChunkChoice(i, ChatDelta(role="assistant", content=""))])
        async for delta in generation.deltas():
            if delta.finish_reason is not None:
                made_calls = False
                if tools is not None:
                    for out in tools[delta.index].finish():
                        yield chunk([ChatChunkChoice(delta.index, out)])
                    made_calls = tools[delta.index].made_calls
                reason = finish_reason(delta.finish_reason, made_calls)
                yield chunk([ChatChunkChoice(delta.index, ChatDelta(), None, reason)])
            elif tools is None:
                lp = shaper.chat_logprobs(delta.logprobs) if logprobs else None
                yield chunk([ChatChunkChoice(delta.index, ChatDelta(content=delta.text), lp)])
            else:
                lp = shaper.chat_logprobs(delta.logprobs) if logprobs and delta.logprobs else None
                deltas = tools[delta.index].feed(delta.text) or ([ChatDelta(content="")] if lp else [])
                for k, out in enumerate(deltas):
                    yield chunk([ChatChunkChoice(delta.index, out, lp if k == 0 else None)])
        if include_usage:
            yield chunk([], shaper.usage())
        yield _DONE
    except ApiError as err:
        yield b"data: " + error_json(err) + b"\n\n"
        yield _DONE
    finally:
        generation.close("cancelled")


@post("/v1/completions", status_code=200)
async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
    registry = registry_of(request)
    body = decode_json(await request.body(), CompletionRequest)
    pool = registry.pool_for(body.model)
    if body.echo:
        raise bad_request("echo is not supported", "echo")
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise bad_request("best_of is not supported (it must equal n)", "best_of")
    token_ids = completion_ids(body, pool)
    generate = generate_request(
        body, pool, len(token_ids), body.max_tokens, "max_tokens", body.logprobs, "prompt"
    )
    generation = await _start(request, registry, pool, body, token_ids, generate)
    shaper = _Shaper(generation, body.model or pool.name, f"cmpl-{os.urandom(16).hex()}")
    logprobs = body.logprobs is not None
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        stream = _completion_stream(shaper, logprobs, include_usage)
        headers = _headers(request, generation, _SSE_HEADERS)
        return Stream(stream, media_type="text/event-stream", headers=headers)
    await _run_unless_disconnected(request, generation)
    choices = [
        CompletionChoice(
            i, "".join(s.text), shaper.completion_logprobs(s.logprobs) if logprobs else None, s.finish_reason
        )
        for i, s in enumerate(generation.samples)
    ]
    completion = Completion(
        id=shaper.id, created=shaper.created, model=shaper.model, choices=choices, usage=shaper.usage()
    )
    return _json(completion, _headers(request, generation))


async def _completion_stream(shaper: _Shaper, logprobs: bool, include_usage: bool) -> AsyncIterator[bytes]:
    generation = shaper.generation
    offsets = [0] * len(generation.samples)

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return _sse(
            Completion(id=shaper.id, created=shaper.created, model=shaper.model, choices=choices, usage=usage)
        )

    try:
        async for delta in generation.deltas():
            if delta.finish_reason is not None:
                yield chunk([CompletionChoice(delta.index, "", None, delta.finish_reason)])
                continue
            lp = shaper.completion_logprobs(delta.logprobs, offsets[delta.index]) if logprobs else None
            offsets[delta.index] += len(delta.text)
            yield chunk([CompletionChoice(delta.index, delta.text, lp, None)])
        if include_usage:
            yield chunk([], shaper.usage())
        yield _DONE
    except ApiError as err:
        yield b"data: " + error_json(err) + b"\n\n"
        yield _DONE
    finally:
        generation.close("cancelled")


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any]) -> Response[Any]:
    pools = registry_of(request).pools
    cards = [
        ModelCard(id=name, created=0, max_model_len=p.info.max_model_len) for name, p in sorted(pools.items())
    ]
    return _json(ModelList(data=cards), {})


@get("/v1/models/{model:path}")
async def retrieve_model(request: Request[Any, Any, Any], model: str) -> Response[Any]:
    pool = registry_of(request).pool_for(model.lstrip("/"))
    return _json(ModelCard(id=pool.name, created=0, max_model_len=pool.info.max_model_len), {})


ROUTES = [chat_completions, completions, list_models, retrieve_model]
