"""Messages between the API process and the engine core process: msgpack over two pipes.

The core sends one StepOutput per step (every request's delta of that step, the KV events
the step caused and a load snapshot), so the API side wakes once per step, not per token.
Replies (snapshots, state) travel in the same ordered pipe as StepOutputs: a reply is
consistent with every StepOutput sent before it.
"""

from __future__ import annotations

from typing import TypeAlias

import msgspec
from msgspec import Struct

from engine.sampling_params import SamplingParams
from engine.server.protocol import KVEvent, LoadSnapshot, TokenLogprob

# --- API process -> core ----------------------------------------------------------------


class NewRequest(Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    detokenize: bool


class AddRequests(Struct, tag="add"):
    """Added together, in one step, so the n samples of a request share prefill (in-flight dedup)."""

    requests: list[NewRequest]


class AbortRequests(Struct, tag="abort"):
    request_ids: list[str]


class SnapshotCache(Struct, tag="snapshot"):
    token: int


class InspectState(Struct, tag="inspect"):
    token: int


class Shutdown(Struct, tag="shutdown"):
    pass


ToCore: TypeAlias = AddRequests | AbortRequests | SnapshotCache | InspectState | Shutdown

# --- core -> API process ----------------------------------------------------------------


class Ready(Struct, tag="ready", kw_only=True):
    model_id: str
    max_model_len: int
    num_blocks: int
    block_size: int
    vocab_size: int
    description: str
    load_seconds: float


class StartFailed(Struct, tag="failed"):
    message: str


class Delta(Struct, array_like=True):
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # stop, length, or abort (the core gave up on it: an error)
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    queue_time: float | None  # seconds from arrival at the core to first scheduling; first delta only
    prefill_chunks: int | None = None  # steps that ran part of the prompt; first delta only


class StepOutput(Struct, tag="step"):
    deltas: list[Delta]
    events: list[KVEvent]
    load: LoadSnapshot
    step_seconds: float  # the step's model time; 0 when no step ran


class Rejected(Struct, tag="rejected"):
    request_id: str
    message: str


class CacheSnapshotReply(Struct, tag="snapshot_reply"):
    token: int
    seq: int
    block_hashes: list[int]


class StateReply(Struct, tag="state_reply", kw_only=True):
    token: int
    running: list[str]
    waiting: list[str]
    load: LoadSnapshot
    cached_block_hashes: list[int]
    last_seq: int
    integrity_error: str | None


FromCore: TypeAlias = Ready | StartFailed | StepOutput | Rejected | CacheSnapshotReply | StateReply

_encoder = msgspec.msgpack.Encoder()
_to_core = msgspec.msgpack.Decoder(ToCore)
_from_core = msgspec.msgpack.Decoder(FromCore)


def encode(message: ToCore | FromCore) -> bytes:
    return _encoder.encode(message)


def decode_to_core(data: bytes) -> ToCore:
    return _to_core.decode(data)


def decode_from_core(data: bytes) -> FromCore:
    return _from_core.decode(data)
