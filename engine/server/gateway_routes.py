"""What the gateway uses: POST /internal/generate (token ids in and out) and GET /kv/events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.response import Stream

from engine.server import ipc
from engine.server.core_client import CoreClient, KVSubscription
from engine.server.errors import ApiError, bad_request, decode_json, decode_msgpack
from engine.server.openai_inputs import Prompt, engine_requests, sampling_params
from engine.server.openai_outputs import new_id
from engine.server.openai_types import SamplingFields
from engine.server.protocol import (
    CacheSnapshot,
    ErrorFrame,
    GenerateFrame,
    GenerateRequest,
    Heartbeat,
    ReplicaInfo,
)
from engine.server.replica import json_response, replica_of
from traces.spans import EngineSpan

log = logging.getLogger("prefixgate.engine.server")

_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()
MSGPACK_STREAM = "application/vnd.msgpack"  # frames: 4-byte big-endian length, then msgpack
NDJSON = "application/x-ndjson"


@post("/internal/generate", status_code=200)
async def internal_generate(request: Request[Any, Any, Any]) -> Response[Any]:
    """Token ids + sampling params + salt in; one frame per step per sample out, no text."""
    replica = replica_of(request)
    raw = await request.body()
    if "msgpack" in request.headers.get("content-type", ""):
        body = decode_msgpack(raw, GenerateRequest)
    else:
        body = decode_json(raw, GenerateRequest)
    limits = replica.limits
    if not body.token_ids:
        raise bad_request("token_ids must not be empty", "token_ids")
    bad = next((t for t in body.token_ids if t >= limits.vocab_size), None)
    if bad is not None:
        raise bad_request(
            f"token id {bad} is outside the vocabulary (0..{limits.vocab_size - 1})", "token_ids"
        )
    fields = SamplingFields(
        n=body.n,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos,
    )
    params = sampling_params(
        fields,
        prompt_len=len(body.token_ids),
        limits=limits,
        max_tokens=body.max_tokens,
        max_tokens_param="max_tokens",
        logprobs=body.logprobs,
        prompt_param="token_ids",
        detokenize=False,
        grammar=body.grammar,  # checked against the tokenizer by the core: a bad one is a 400
    )
    request_id = body.request_id or new_id("gen")
    requests = engine_requests(request_id, [Prompt(list(body.token_ids), params)], body.cache_salt, False)
    span = EngineSpan(replica.model_name, request.headers, [r.request_id for r in requests])
    submission = replica.client.submit(requests, span)
    index = {r.request_id: i for i, r in enumerate(requests)}
    as_msgpack = "msgpack" in request.headers.get("accept", "")
    frames = _generate_frames(submission, index, as_msgpack)
    return Stream(frames, media_type=MSGPACK_STREAM if as_msgpack else NDJSON)


def _frame_bytes(frame: msgspec.Struct, as_msgpack: bool) -> bytes:
    if as_msgpack:
        payload = _msgpack.encode(frame)
        return len(payload).to_bytes(4, "big") + payload
    return _json.encode(frame) + b"\n"


async def _generate_frames(submission: Any, index: dict[str, int], as_msgpack: bool) -> AsyncIterator[bytes]:
    started: set[str] = set()
    try:
        while not submission.done:
            delta: ipc.Delta = await submission.next()
            first = delta.request_id not in started
            started.add(delta.request_id)
            frame = GenerateFrame(
                index=index[delta.request_id],
                token_ids=delta.token_ids,
                logprobs=delta.logprobs,
                finish_reason=delta.finish_reason,
                stop_reason=delta.stop_reason if isinstance(delta.stop_reason, int) else None,
                prompt_tokens=delta.num_prompt_tokens if first else None,
                cached_tokens=delta.num_cached_tokens if first else None,
            )
            yield _frame_bytes(frame, as_msgpack)
    except ApiError as err:
        yield _frame_bytes(ErrorFrame(error=err.body()), as_msgpack)
    finally:
        submission.close()


@get("/kv/events")
async def kv_events(request: Request[Any, Any, Any]) -> Response[Any]:
    """NDJSON: one CacheSnapshot, then every KV event in sequence order, heartbeats when idle."""
    replica = replica_of(request)
    ready = replica.ready
    client = replica.client
    # Subscribe before asking for the snapshot: events the core emits meanwhile are buffered,
    # and the ones the snapshot already covers (seq <= its seq) are skipped.
    subscription = client.subscribe()
    try:
        reply = await client.cache_snapshot()
    except BaseException:
        client.unsubscribe(subscription)
        raise
    snapshot = CacheSnapshot(
        seq=reply.seq, block_hashes=reply.block_hashes, block_size=ready.block_size, model_id=ready.model_id
    )
    lines = _kv_lines(client, subscription, snapshot, replica.config.kv_heartbeat_s)
    return Stream(lines, media_type=NDJSON, headers={"Cache-Control": "no-cache"})


async def _kv_lines(
    client: CoreClient, subscription: KVSubscription, snapshot: CacheSnapshot, heartbeat_s: float
) -> AsyncIterator[bytes]:
    last_seq = snapshot.seq
    try:
        yield _json.encode(snapshot) + b"\n"
        while True:
            try:
                batch = await asyncio.wait_for(subscription.queue.get(), heartbeat_s)
            except TimeoutError:
                if not client.stalled:  # a hung core gets no heartbeat: its gateways fail over
                    yield _json.encode(Heartbeat(seq=last_seq)) + b"\n"
                continue
            if batch is None or subscription.overflowed:
                return  # draining, core gone, or too slow: the subscriber reconnects
            out = []
            for event in batch:
                if event.seq <= last_seq:
                    continue
                if event.seq != last_seq + 1:
                    log.warning("KV event gap (%d after %d): ending the stream", event.seq, last_seq)
                    return
                last_seq = event.seq
                out.append(_json.encode(event))
            if out:
                yield b"\n".join(out) + b"\n"
    finally:
        client.unsubscribe(subscription)


@get("/internal/info")
async def internal_info(request: Request[Any, Any, Any]) -> Response[Any]:
    """The model name, hash model id, block size and limits a gateway needs (503 until ready)."""
    replica = replica_of(request)
    ready = replica.ready
    return json_response(
        ReplicaInfo(
            model=replica.model_name,
            aliases=sorted(replica.aliases() - {replica.model_name}),
            model_id=ready.model_id,
            block_size=ready.block_size,
            max_model_len=ready.max_model_len,
            vocab_size=ready.vocab_size,
            default_max_tokens=replica.config.default_max_tokens,
            model_folder=replica.model_folder,
        )
    )


ROUTES = [internal_generate, kv_events, internal_info]
