"""POST /v1/chat/completions, POST /v1/completions, GET /v1/models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from litestar import Request, Response, get, post
from litestar.response import Stream

from engine.server.chat_prompt import chat_plan, chat_prompt_ids
from engine.server.errors import decode_json
from engine.server.openai_inputs import (
    Prompt,
    chat_logprobs,
    check_completion_options,
    completion_prompt_ids,
    engine_requests,
    sampling_params,
)
from engine.server.openai_outputs import (
    Generation,
    chat_completion,
    chat_stream,
    completion,
    completion_stream,
    new_id,
)
from engine.server.openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
)
from engine.server.replica import Replica, json_response, replica_of, unless_disconnected
from traces.spans import EngineSpan

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
    replica = replica_of(request)
    body = decode_json(await request.body(), ChatCompletionRequest)
    replica.check_model(body.model)
    plan = chat_plan(body)
    token_ids = chat_prompt_ids(body, replica.text, plan)
    logprobs = chat_logprobs(body)
    if body.max_completion_tokens is not None:
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, param = body.max_tokens, "max_tokens"
    params = sampling_params(
        body,
        prompt_len=len(token_ids),
        limits=replica.limits,
        max_tokens=max_tokens,
        max_tokens_param=param,
        logprobs=logprobs,
        prompt_param="messages",
        detokenize=replica.text.has_tokenizer,
        grammar=plan.grammar,
    )
    request_id = new_id("chatcmpl")
    generation = _start(replica, request_id, [Prompt(token_ids, params)], body, request.headers)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        stream = chat_stream(generation, request_id, logprobs is not None, include_usage, plan)
        return Stream(stream, media_type="text/event-stream", headers=_SSE_HEADERS)
    try:
        await unless_disconnected(request, generation.run())
    finally:
        generation.submission.close()
    return json_response(chat_completion(generation, request_id, logprobs is not None, plan))


@post("/v1/completions", status_code=200)
async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
    replica = replica_of(request)
    body = decode_json(await request.body(), CompletionRequest)
    replica.check_model(body.model)
    check_completion_options(body)
    limits = replica.limits
    prompts = []
    for token_ids in completion_prompt_ids(body, replica.text, limits.vocab_size):
        params = sampling_params(
            body,
            prompt_len=len(token_ids),
            limits=limits,
            max_tokens=body.max_tokens,
            max_tokens_param="max_tokens",
            logprobs=body.logprobs,
            prompt_param="prompt",
            detokenize=replica.text.has_tokenizer,
        )
        prompts.append(Prompt(token_ids, params))
    request_id = new_id("cmpl")
    generation = _start(replica, request_id, prompts, body, request.headers)
    logprobs = body.logprobs is not None
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        stream = completion_stream(generation, request_id, logprobs, include_usage)
        return Stream(stream, media_type="text/event-stream", headers=_SSE_HEADERS)
    try:
        await unless_disconnected(request, generation.run())
    finally:
        generation.submission.close()
    return json_response(completion(generation, request_id, logprobs))


def _start(
    replica: Replica,
    request_id: str,
    prompts: list[Prompt],
    body: SamplingFields,
    headers: Mapping[str, str],
) -> Generation:
    requests = engine_requests(request_id, prompts, body.cache_salt, detokenize=replica.text.has_tokenizer)
    span = EngineSpan(replica.model_name, headers, [r.request_id for r in requests])
    submission = replica.client.submit(requests, span)
    n = prompts[0].params.n
    return Generation(submission, [len(p.token_ids) for p in prompts], n, replica.model_name, replica.text)


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any]) -> Response[Any]:
    return json_response(ModelList(data=[_card(replica_of(request))]))


@get("/v1/models/{model:path}")
async def retrieve_model(request: Request[Any, Any, Any], model: str) -> Response[Any]:
    replica = replica_of(request)
    replica.check_model(model.lstrip("/"))
    return json_response(_card(replica))


def _card(replica: Replica) -> ModelCard:
    ready = replica.ready
    return ModelCard(id=replica.model_name, created=0, max_model_len=ready.max_model_len)


ROUTES = [chat_completions, completions, list_models, retrieve_model]
