"""A fast mock replica for measuring what a router in front of it adds.

    python -m bench.mock_replica --port 8001

It serves, with no model and answers prepared at start:
- our replica API as the gateway uses it: GET /health, /internal/info, /kv/events (a
  CacheSnapshot, then Heartbeats), /load, and POST /internal/generate (NDJSON GenerateFrames,
  one per token, prompt_tokens / cached_tokens on the first, finish_reason on the last);
- what sglang-router asks of an SGLang worker: /health, /server_info, /model_info (and the
  /get_server_info, /get_model_info spellings), /get_load, /v1/models;
- OpenAI /v1/chat/completions and /v1/completions, streamed (one SSE chunk per token, after a
  role chunk, then a finish chunk and [DONE]) or not, and SGLang's native /generate.

Every answer is the same OUTPUT_TOKENS tokens of text (fewer when max_tokens asks for fewer),
so the only difference between two targets in front of this mock is the target itself.
`--token-interval-ms N` spaces streamed tokens (and /internal/generate frames) N ms apart, as
an engine's decode steps would, and holds a non-streamed answer for the same time; by default
everything is sent at once, a streamed answer in one write.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import msgspec
from aiohttp import web
from tokenizers import Tokenizer

from engine.server.protocol import (
    CacheSnapshot,
    GenerateFrame,
    GenerateRequest,
    Heartbeat,
    LoadReport,
    LoadSnapshot,
    ReplicaInfo,
)

OUTPUT_TOKENS = 16
MODEL_NAME = "SmolLM2-135M-Instruct"
BLOCK_SIZE = 16
_ANSWER = " The capital of France is Paris, a city known for its museums, cafes and the river Seine."
_HEARTBEAT_S = 1.0


class _Request(msgspec.Struct):
    """The few fields of an OpenAI or SGLang request body the mock looks at."""

    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    max_new_tokens: int | None = None
    sampling_params: dict[str, object] | None = None
    model: str | None = None


_json = msgspec.json.Encoder()
_request = msgspec.json.Decoder(_Request)
_generate = msgspec.json.Decoder(GenerateRequest)


def default_model_folder() -> Path:
    from engine.model_store import ensure_default_model

    return ensure_default_model()


class _Cadence:
    """One answer's token times: token i is due `interval_s` x i after the first, however long
    writing the ones before took, as an engine's decode steps keep their own pace (sleeping a
    whole interval after each write would charge a router for the mock's own writes)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.start = time.monotonic()
        self.tokens = 0

    async def next_token(self) -> None:
        """Wait for the next token's time (at once when unpaced)."""
        if not self.interval_s:
            return
        self.tokens += 1
        delay = self.start + self.tokens * self.interval_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class _Writer:
    """A streamed answer's writes: each as it comes when tokens are paced, else all in one.

    Unpaced, every frame is ready at once, and a server with frames ready together sends them
    together (as our gateway and replica do, joining the writes of one loop turn): one write
    per frame would measure aiohttp's per-write cost rather than the router in front."""

    def __init__(self, response: web.StreamResponse, paced: bool) -> None:
        self.response, self.paced = response, paced
        self.ready: list[bytes] = []

    async def write(self, data: bytes) -> None:
        if self.paced:
            await self.response.write(data)
        else:
            self.ready.append(data)

    async def close(self) -> None:
        if self.ready:
            await self.response.write(b"".join(self.ready))
        await self.response.write_eof()


class MockReplica:
    def __init__(self, model_folder: Path, token_interval_s: float = 0.0) -> None:
        self.model_folder = model_folder
        self.token_interval_s = token_interval_s
        tokenizer = Tokenizer.from_file(str(model_folder / "tokenizer.json"))
        self.token_ids: list[int] = tokenizer.encode(_ANSWER, add_special_tokens=False).ids[:OUTPUT_TOKENS]
        assert len(self.token_ids) == OUTPUT_TOKENS
        # Per-token text; pieces decoded one by one join to the same text here (plain words).
        self.pieces = [tokenizer.decode([t]) for t in self.token_ids]
        self.info = _json.encode(
            ReplicaInfo(
                model=MODEL_NAME,
                aliases=[],
                model_id=MODEL_NAME,
                block_size=BLOCK_SIZE,
                max_model_len=8192,
                vocab_size=tokenizer.get_vocab_size(),
                default_max_tokens=256,
                model_folder=str(model_folder),
            )
        )
        self.server_info = _json.encode(
            {
                "model_path": str(model_folder),
                "tokenizer_path": str(model_folder),
                "served_model_name": MODEL_NAME,
                "dp_size": 1,
                "tp_size": 1,
                "version": "0.0.0-mock",
                "max_total_num_tokens": 1 << 20,
            }
        )
        self.model_info = _json.encode(
            {
                "model_path": str(model_folder),
                "tokenizer_path": str(model_folder),
                "is_generation": True,
                "served_model_name": MODEL_NAME,
            }
        )
        self.models = _json.encode(
            {
                "object": "list",
                "data": [{"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "mock"}],
            }
        )
        self.load = _json.encode(
            LoadReport(
                model=MODEL_NAME,
                in_flight=0,
                max_in_flight=1024,
                engine=LoadSnapshot(
                    running=0,
                    waiting=0,
                    num_blocks=4096,
                    free_blocks=4096,
                    cached_blocks=0,
                    used_blocks=0,
                    kv_usage=0.0,
                    num_preemptions=0,
                    prompt_tokens_admitted=0,
                    cached_tokens_admitted=0,
                    steps=0,
                    kv_events_dropped=0,
                ),
            )
        )

    def app(self) -> web.Application:
        app = web.Application()
        get = {
            "/health": self.health,
            "/health_generate": self.health,
            "/internal/info": self.get_info,
            "/kv/events": self.kv_events,
            "/load": self.get_load,
            "/get_load": self.get_sglang_load,
            "/server_info": self.get_server_info,
            "/get_server_info": self.get_server_info,
            "/model_info": self.get_model_info,
            "/get_model_info": self.get_model_info,
            "/v1/models": self.get_models,
        }
        post = {
            "/internal/generate": self.internal_generate,
            "/v1/chat/completions": self.chat_completions,
            "/v1/completions": self.completions,
            "/generate": self.sglang_generate,
        }
        app.router.add_routes([web.get(path, handler) for path, handler in get.items()])
        app.router.add_routes([web.post(path, handler) for path, handler in post.items()])
        return app

    # ---- small GETs ------------------------------------------------------------------

    @staticmethod
    def _json(body: bytes) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return self._json(b'{"status":"ready"}')

    async def get_info(self, request: web.Request) -> web.Response:
        return self._json(self.info)

    async def get_load(self, request: web.Request) -> web.Response:
        return self._json(self.load)

    async def get_sglang_load(self, request: web.Request) -> web.Response:
        return self._json(b'{"load":0}')

    async def get_server_info(self, request: web.Request) -> web.Response:
        return self._json(self.server_info)

    async def get_model_info(self, request: web.Request) -> web.Response:
        return self._json(self.model_info)

    async def get_models(self, request: web.Request) -> web.Response:
        return self._json(self.models)

    async def kv_events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        snapshot = CacheSnapshot(seq=0, block_hashes=[], block_size=BLOCK_SIZE, model_id=MODEL_NAME)
        await response.write(_json.encode(snapshot) + b"\n")
        heartbeat = _json.encode(Heartbeat(seq=0)) + b"\n"
        while True:
            await asyncio.sleep(_HEARTBEAT_S)
            await response.write(heartbeat)

    # ---- generation ------------------------------------------------------------------

    def _cadence(self) -> _Cadence:
        return _Cadence(self.token_interval_s)

    def _count(self, *limits: int | None) -> int:
        given = [m for m in limits if isinstance(m, int) and m > 0]
        return min([OUTPUT_TOKENS, *given])

    async def internal_generate(self, request: web.Request) -> web.StreamResponse:
        body = _generate.decode(await request.read())
        count = self._count(body.max_tokens)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        out = _Writer(response, paced=bool(self.token_interval_s))
        for index in range(body.n):
            cadence = self._cadence()
            for i in range(count):
                frame = GenerateFrame(
                    index=index,
                    token_ids=[self.token_ids[i]],
                    finish_reason="length" if i == count - 1 else None,
                    prompt_tokens=len(body.token_ids) if i == 0 else None,
                    cached_tokens=0 if i == 0 else None,
                )
                if i:
                    await cadence.next_token()
                await out.write(_json.encode(frame) + b"\n")
        await out.close()
        return response

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=False)

    async def _openai(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = _request.decode(await request.read())
        count = self._count(body.max_tokens, body.max_completion_tokens)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-mock{time.perf_counter_ns()}"
        created = int(time.time())
        model = body.model or MODEL_NAME
        usage = {"prompt_tokens": 8, "completion_tokens": count, "total_tokens": 8 + count}
        kind = "chat.completion" if chat else "text_completion"
        cadence = self._cadence()
        if not body.stream:
            for _ in range(count - 1):
                await cadence.next_token()  # an engine answers once its last token is out
            text = "".join(self.pieces[:count])
            choice: dict[str, object] = {"index": 0, "finish_reason": "length", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            whole = {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}
            return self._json(_json.encode({**whole, "usage": usage}))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        head = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": model}

        def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return b"data: " + _json.encode({**head, "choices": [choice]}) + b"\n\n"

        out = _Writer(response, paced=bool(self.token_interval_s))
        if chat:
            await out.write(chunk(None, None, role=True))
        for i, piece in enumerate(self.pieces[:count]):
            if i:
                await cadence.next_token()
            await out.write(chunk(piece, None))
        await out.write(chunk(None, "length"))
        await out.write(b"data: [DONE]\n\n")
        await out.close()
        return response

    async def sglang_generate(self, request: web.Request) -> web.StreamResponse:
        body = _request.decode(await request.read())
        params = body.sampling_params or {}
        limit = params.get("max_new_tokens")
        count = self._count(limit if isinstance(limit, int) else None, body.max_new_tokens)
        meta = {"finish_reason": {"type": "length", "length": count}, "completion_tokens": count}
        cadence = self._cadence()
        if not body.stream:
            for _ in range(count - 1):
                await cadence.next_token()
            return self._json(_json.encode({"text": "".join(self.pieces[:count]), "meta_info": meta}))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        out = _Writer(response, paced=bool(self.token_interval_s))
        for i in range(1, count + 1):
            if i > 1:
                await cadence.next_token()
            payload = {"text": "".join(self.pieces[:i]), "meta_info": meta if i == count else {}}
            await out.write(b"data: " + _json.encode(payload) + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        await out.close()
        return response


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--model-folder", default=None, help="holds tokenizer.json (default: the embedded model)"
    )
    parser.add_argument(
        "--token-interval-ms", type=float, default=0.0, help="gap between two streamed tokens (default none)"
    )
    args = parser.parse_args(argv)
    folder = Path(args.model_folder) if args.model_folder else default_model_folder()
    loop = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        pass
    web.run_app(
        MockReplica(folder, args.token_interval_ms / 1e3).app(),
        host=args.host,
        port=args.port,
        access_log=None,
        shutdown_timeout=1.0,
        print=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
