"""The HTTP face of one simulated replica: the replica API the gateway uses, and what
sglang-router asks of an SGLang worker.

- ours: GET /health, /internal/info, /kv/events (CacheSnapshot, then every KV event in seq
  order, Heartbeats when idle), /load, POST /internal/generate (NDJSON GenerateFrames);
- OpenAI: POST /v1/chat/completions, /v1/completions (bench/sim_replica/openai_routes.py),
  GET /v1/models;
- SGLang's probes: /health_generate, /server_info, /model_info (and the get_ spellings),
  /get_load;
- GET /sim/stats: simulated time, busy time, steps, lag behind the wall clock, hits.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

from bench.sim_replica.engine import RequestTooLarge, SimEngine
from bench.sim_replica.words import WordVocab
from engine.server.errors import ApiError, bad_request, decode_json, error_json
from engine.server.protocol import (
    CacheSnapshot,
    GenerateFrame,
    GenerateRequest,
    Heartbeat,
    ReplicaInfo,
)
from gateway.text import GatewayTokenizer

NDJSON = "application/x-ndjson"
_json = msgspec.json.Encoder()


def _plain_int(value: Any) -> int:
    """Token ids in KV events come from the simulator's numpy arrays."""
    if isinstance(value, np.integer):
        return int(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


_events_json = msgspec.json.Encoder(enc_hook=_plain_int)


@dataclass(frozen=True)
class ServedModel:
    """What every replica of the process serves: names, limits and the tokenizer."""

    name: str
    model_id: str
    folder: str
    max_model_len: int
    default_max_tokens: int
    heartbeat_s: float
    tokenizer: GatewayTokenizer
    words: WordVocab


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, content_type="application/json")


def error_response(err: ApiError) -> web.Response:
    return web.Response(body=error_json(err), status=err.status, content_type="application/json")


class SimReplicaServer:
    def __init__(self, engine: SimEngine, model: ServedModel) -> None:
        self.engine = engine
        self.model = model
        self._answers = itertools.count()
        vocab = model.tokenizer.tokenizer.get_vocab_size()
        self.vocab_size = vocab
        self.info = _json.encode(
            ReplicaInfo(
                model=model.name,
                aliases=[],
                model_id=model.model_id,
                block_size=engine.config.block_size,
                max_model_len=model.max_model_len,
                vocab_size=vocab,
                default_max_tokens=model.default_max_tokens,
                model_folder=model.folder,
            )
        )

    def app(self) -> web.Application:
        from bench.sim_replica.openai_routes import OpenAIRoutes

        openai = OpenAIRoutes(self)
        app = web.Application(client_max_size=64 << 20)
        get = {
            "/health": self.health,
            "/health_generate": self.health,
            "/internal/info": self.get_info,
            "/kv/events": self.kv_events,
            "/load": self.get_load,
            "/get_load": self.get_sglang_load,
            "/server_info": self.get_server_info,
            "/get_server_info": self.get_server_info,
            "/model_info": self.get_server_info,
            "/get_model_info": self.get_server_info,
            "/v1/models": self.get_models,
            "/sim/stats": self.get_stats,
        }
        post = {
            "/internal/generate": self.internal_generate,
            "/v1/chat/completions": openai.chat_completions,
            "/v1/completions": openai.completions,
        }
        app.router.add_routes([web.get(path, handler) for path, handler in get.items()])
        app.router.add_routes([web.post(path, handler) for path, handler in post.items()])
        return app

    # ---- generation, shared with the OpenAI routes -------------------------------------

    def start(self, token_ids: list[int], max_tokens: int, cache_salt: str | None, request_id: str) -> Any:
        """Submit a prompt; the answer is `max_tokens` word ids (the sim never stops early)."""
        room = self.model.max_model_len - len(token_ids)
        if room < 1:
            raise bad_request(
                f"the prompt has {len(token_ids)} tokens; the maximum context length is "
                f"{self.model.max_model_len}",
                "prompt",
            )
        if max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        answer = self.model.words.answer(min(max_tokens, room), seed=next(self._answers) * 1009 + 17)
        try:
            return self.engine.submit(token_ids, answer, cache_salt, request_id)
        except RequestTooLarge as err:
            raise bad_request(str(err), "max_tokens") from None

    # ---- our replica API ---------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ready"}', content_type="application/json")

    async def get_info(self, request: web.Request) -> web.Response:
        return web.Response(body=self.info, content_type="application/json")

    async def get_load(self, request: web.Request) -> web.Response:
        return json_response(self.engine.load(self.model.name))

    async def get_stats(self, request: web.Request) -> web.Response:
        return json_response(self.engine.stats())

    async def internal_generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = decode_json(await request.read(), GenerateRequest)
            if not body.token_ids:
                raise bad_request("token_ids must not be empty", "token_ids")
            bad = next((t for t in body.token_ids if t >= self.vocab_size), None)
            if bad is not None:
                raise bad_request(f"token id {bad} is outside the vocabulary", "token_ids")
            if body.n != 1:
                raise bad_request("the simulated replica serves n=1 only", "n")
            live = self.start(
                list(body.token_ids), body.max_tokens, body.cache_salt, body.request_id or "gen"
            )
        except ApiError as err:
            return error_response(err)
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        try:
            await response.prepare(request)
            while True:
                output = await live.outputs.get()
                frame = GenerateFrame(
                    index=0,
                    token_ids=output.token_ids,
                    finish_reason=output.finish_reason,
                    prompt_tokens=output.prompt_tokens,
                    cached_tokens=output.cached_tokens,
                )
                await response.write(_json.encode(frame) + b"\n")
                if output.finish_reason is not None:
                    break
            await response.write_eof()
        finally:
            self.engine.abort(live)  # a no-op once finished; frees the blocks of a dropped stream
        return response

    async def kv_events(self, request: web.Request) -> web.StreamResponse:
        engine = self.engine
        subscriber, seq, hashes = engine.subscribe()
        response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            snapshot = CacheSnapshot(
                seq=seq,
                block_hashes=hashes,
                block_size=engine.config.block_size,
                model_id=self.model.model_id,
            )
            await response.write(_json.encode(snapshot) + b"\n")
            last_seq = seq
            while True:
                try:
                    batch = await asyncio.wait_for(subscriber.queue.get(), self.model.heartbeat_s)
                except TimeoutError:
                    await response.write(_json.encode(Heartbeat(seq=last_seq)) + b"\n")
                    continue
                if batch is None:
                    break  # too slow or shutting down: the subscriber reconnects and resyncs
                lines = [_events_json.encode(event) for event in batch if event.seq > last_seq]
                if lines:
                    last_seq = batch[-1].seq
                    await response.write(b"\n".join(lines) + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            engine.unsubscribe(subscriber)
        return response

    # ---- what sglang-router asks ---------------------------------------------------------

    async def get_sglang_load(self, request: web.Request) -> web.Response:
        load = self.engine.load(self.model.name)
        return json_response({"load": load.engine.running + load.engine.waiting})

    async def get_server_info(self, request: web.Request) -> web.Response:
        model = self.model
        return json_response(
            {
                "model_path": model.folder,
                "tokenizer_path": model.folder,
                "served_model_name": model.name,
                "is_generation": True,
                "dp_size": 1,
                "tp_size": 1,
                "version": "0.0.0-sim",
                "max_total_num_tokens": self.engine.config.num_blocks * self.engine.config.block_size,
            }
        )

    async def get_models(self, request: web.Request) -> web.Response:
        card = {"id": self.model.name, "object": "model", "created": 0, "owned_by": "sim"}
        return json_response(
            {"object": "list", "data": [{**card, "max_model_len": self.model.max_model_len}]}
        )
