"""POST /v1/chat/completions and /v1/completions on a simulated replica, streamed or not.

A router that forwards OpenAI requests (sglang-router) reaches the replica here. Prompts are
turned into token ids by the gateway's own code (gateway/text.py's tokenizer and chat
template, engine/server/chat_prompt.py), so a prompt gets the same ids, and the same block
hashes, whichever way it came in. Usage reports prompt_tokens_details.cached_tokens; a stream
sends it in a last chunk when stream_options.include_usage is set.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from engine.server.chat_prompt import chat_plan, chat_prompt_ids
from engine.server.errors import ApiError, bad_request, decode_json
from engine.server.openai_types import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    PromptTokensDetails,
    SamplingFields,
    Usage,
)

if TYPE_CHECKING:
    from bench.sim_replica.engine import LiveRequest
    from bench.sim_replica.server import SimReplicaServer

_json = msgspec.json.Encoder()
_DONE = b"data: [DONE]\n\n"


def _sse(message: msgspec.Struct) -> bytes:
    return b"data: " + _json.encode(message) + b"\n\n"


class OpenAIRoutes:
    def __init__(self, server: SimReplicaServer) -> None:
        self.server = server

    def _completion_ids(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            return self.server.model.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            vocab = self.server.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise bad_request("a token id is outside the vocabulary", "prompt")
            return list(prompt)
        raise bad_request("prompt must be a non-empty string or list of token ids", "prompt")

    def _start(self, body: SamplingFields, token_ids: list[int], max_tokens: int | None) -> LiveRequest:
        if body.n not in (None, 1):
            raise bad_request("the simulated replica serves n=1 only", "n")
        if max_tokens is None:
            max_tokens = self.server.model.default_max_tokens
        return self.server.start(token_ids, max_tokens, body.cache_salt, uuid.uuid4().hex)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        from bench.sim_replica.server import error_response

        try:
            body = decode_json(await request.read(), ChatCompletionRequest)
            token_ids = chat_prompt_ids(body, self.server.model.tokenizer, chat_plan(body))
            limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            live = self._start(body, token_ids, limit)
        except ApiError as err:
            return error_response(err)
        return await self._respond(request, body, live, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        from bench.sim_replica.server import error_response

        try:
            body = decode_json(await request.read(), CompletionRequest)
            live = self._start(body, self._completion_ids(body), body.max_tokens)
        except ApiError as err:
            return error_response(err)
        return await self._respond(request, body, live, chat=False)

    async def _respond(
        self, request: web.Request, body: SamplingFields, live: LiveRequest, chat: bool
    ) -> web.StreamResponse:
        words = self.server.model.words
        model = body.model or self.server.model.name
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        prompt_tokens = cached_tokens = completion_tokens = 0
        finish: str | None = None

        def usage() -> Usage:
            total = prompt_tokens + completion_tokens
            return Usage(prompt_tokens, completion_tokens, total, PromptTokensDetails(cached_tokens))

        def chunk(text: str | None, reason: str | None = None, role: bool = False) -> bytes:
            if chat:
                delta = ChatDelta(role="assistant", content="") if role else ChatDelta(content=text)
                choices = [ChatChunkChoice(0, delta, None, reason)]
                return _sse(ChatCompletionChunk(id=ident, created=created, model=model, choices=choices))
            choice = CompletionChoice(0, text or "", None, reason)
            return _sse(Completion(id=ident, created=created, model=model, choices=[choice]))

        response: web.StreamResponse | None = None
        texts: list[str] = []
        try:
            if body.stream:
                response = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await response.prepare(request)
                if chat:
                    await response.write(chunk(None, role=True))
            while finish is None:
                output = await live.outputs.get()
                if output.prompt_tokens is not None:
                    prompt_tokens = output.prompt_tokens
                    cached_tokens = output.cached_tokens or 0
                completion_tokens += len(output.token_ids)
                finish = output.finish_reason
                text = words.decode(output.token_ids)
                if response is None:
                    texts.append(text)
                    continue
                out = chunk(text)
                if finish is not None:
                    out += chunk(None if chat else "", finish)
                    if body.stream_options is not None and body.stream_options.include_usage:
                        out += self._usage_chunk(ident, created, model, usage(), chat)
                    out += _DONE
                await response.write(out)
            if response is not None:
                await response.write_eof()
                return response
        finally:
            self.server.engine.abort(live)
        text = "".join(texts)
        if chat:
            whole: msgspec.Struct = ChatCompletion(
                id=ident,
                created=created,
                model=model,
                choices=[ChatChoice(0, AssistantMessage(text), None, finish)],
                usage=usage(),
            )
        else:
            choice = CompletionChoice(0, text, None, finish)
            whole = Completion(id=ident, created=created, model=model, choices=[choice], usage=usage())
        return web.Response(body=_json.encode(whole), content_type="application/json")

    @staticmethod
    def _usage_chunk(ident: str, created: int, model: str, usage: Usage, chat: bool) -> bytes:
        if chat:
            return _sse(ChatCompletionChunk(id=ident, created=created, model=model, choices=[], usage=usage))
        return _sse(Completion(id=ident, created=created, model=model, choices=[], usage=usage))
