"""Wire types between a replica and the gateway: /internal/generate, /kv/events, /load.

Only msgspec and cache/events.py here (no torch, no engine internals), so the gateway can
decode what a replica sends with the very same types. JSON by default; /internal/generate also takes msgpack.

KV events follow vLLM's schema (BlockStored / BlockRemoved / AllBlocksCleared with block
hashes, parent hash, token ids, block size and medium), each with the replica's sequence
number. A /kv/events stream starts with one CacheSnapshot, consistent with sequence number
`seq`; the events that follow have seq + 1, seq + 2, ... with no gap, so applying them to the
snapshot's hash set keeps an exact copy of the replica's cache.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias

from msgspec import Meta, Struct

from cache import events as cache_events

# --- KV events ------------------------------------------------------------------------


class BlockStored(Struct, tag="BlockStored", tag_field="type", kw_only=True):
    seq: int
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str = "GPU"


class BlockRemoved(Struct, tag="BlockRemoved", tag_field="type", kw_only=True):
    seq: int
    block_hashes: list[int]
    medium: str = "GPU"


class AllBlocksCleared(Struct, tag="AllBlocksCleared", tag_field="type", kw_only=True):
    seq: int


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


class CacheSnapshot(Struct, tag="CacheSnapshot", tag_field="type", kw_only=True):
    """Every block hash cached after event `seq` was applied (and before seq + 1)."""

    seq: int
    block_hashes: list[int]
    block_size: int
    model_id: str  # folded into block 0's hash, with the request's cache_salt
    medium: str = "GPU"


class Heartbeat(Struct, tag="Heartbeat", tag_field="type", kw_only=True):
    seq: int  # the last event sent so far


KVStreamMessage: TypeAlias = CacheSnapshot | BlockStored | BlockRemoved | AllBlocksCleared | Heartbeat


def to_wire(seq: int, event: cache_events.KVEvent) -> KVEvent:
    """A cache event (cache/events.py) as it goes on the wire, stamped with its seq."""
    if isinstance(event, cache_events.BlockStored):
        return BlockStored(
            seq=seq,
            block_hashes=list(event.block_hashes),
            parent_block_hash=event.parent_block_hash,
            token_ids=list(event.token_ids),
            block_size=event.block_size,
            medium=event.medium,
        )
    if isinstance(event, cache_events.BlockRemoved):
        return BlockRemoved(seq=seq, block_hashes=list(event.block_hashes), medium=event.medium)
    return AllBlocksCleared(seq=seq)


def from_wire(message: KVEvent) -> tuple[int, cache_events.KVEvent]:
    """(seq, cache event): what cache/replica_index.py's ReplicaPrefixIndex.apply takes."""
    if isinstance(message, BlockStored):
        event: cache_events.KVEvent = cache_events.BlockStored(
            tuple(message.block_hashes),
            message.parent_block_hash,
            tuple(message.token_ids),
            message.block_size,
            message.medium,
        )
    elif isinstance(message, BlockRemoved):
        event = cache_events.BlockRemoved(tuple(message.block_hashes), message.medium)
    else:
        event = cache_events.AllBlocksCleared()
    return message.seq, event


def apply_kv_message(hashes: set[int], message: KVStreamMessage) -> None:
    """Keep a set of cached hashes up to date: how a subscriber uses the stream."""
    if isinstance(message, CacheSnapshot):
        hashes.clear()
        hashes.update(message.block_hashes)
    elif isinstance(message, BlockStored):
        hashes.update(message.block_hashes)
    elif isinstance(message, BlockRemoved):
        hashes.difference_update(message.block_hashes)
    elif isinstance(message, AllBlocksCleared):
        hashes.clear()


# --- load -----------------------------------------------------------------------------


class LoadSnapshot(Struct, kw_only=True):
    running: int
    waiting: int
    num_blocks: int
    free_blocks: int  # on the free list
    cached_blocks: int  # in the prefix cache (some may also be in use by running requests)
    used_blocks: int  # held by requests: neither free nor evictable
    kv_usage: float  # used_blocks / num_blocks
    num_preemptions: int  # cumulative
    prompt_tokens_admitted: int  # cumulative, counted at first admission
    cached_tokens_admitted: int  # cumulative prefix-cache hits, in tokens
    steps: int
    kv_events_dropped: int


class LoadReport(Struct, kw_only=True):
    """GET /load: the core's latest snapshot plus what the API process holds."""

    model: str
    in_flight: int  # engine requests the API process has submitted and not seen finish
    max_in_flight: int
    engine: LoadSnapshot


class ReplicaInfo(Struct, kw_only=True):
    """GET /internal/info: what a gateway needs to tokenize and hash exactly as this replica does."""

    model: str  # the served model name (what clients send)
    aliases: list[str]  # other names clients may send for it
    model_id: str  # folded into block 0's hash (cache/hashing.py)
    block_size: int
    max_model_len: int
    vocab_size: int
    default_max_tokens: int
    model_folder: str  # holds the tokenizer files, for a gateway on the same host


class DebugState(Struct, kw_only=True):
    """GET /debug/cache: the core's state between two steps, for tests and operators."""

    running: list[str]
    waiting: list[str]
    in_flight: int  # engine requests the API process still tracks
    load: LoadSnapshot
    cached_block_hashes: list[int]
    last_seq: int
    integrity_error: str | None  # None when every block is accounted for


# --- token-level generation -----------------------------------------------------------

TokenId = Annotated[int, Meta(ge=0)]


class GrammarSpec(Struct, frozen=True, kw_only=True):
    """A constraint on the output. json_schema: `text` is the schema as JSON text; lark: an
    llguidance Lark grammar (it may embed %json{...}); json_object: `text` is empty."""

    kind: Literal["json_schema", "json_object", "lark"]
    text: str = ""


class GenerateRequest(Struct, kw_only=True, forbid_unknown_fields=False):
    """POST /internal/generate. No stop strings: the gateway detokenizes and stops itself
    (closing the stream aborts the request)."""

    token_ids: list[TokenId]
    max_tokens: int = 16
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[TokenId] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    cache_salt: str | None = None
    request_id: str | None = None
    grammar: GrammarSpec | None = None


class TokenLogprob(Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


class GenerateFrame(Struct, kw_only=True, omit_defaults=True):
    """One step's output for one of the n samples; the last frame of a sample has finish_reason."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None  # the stop token id, when one ended the sample
    prompt_tokens: int | None = None  # on a sample's first frame
    cached_tokens: int | None = None  # on a sample's first frame


class ErrorBody(Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorFrame(Struct, kw_only=True):
    error: ErrorBody
