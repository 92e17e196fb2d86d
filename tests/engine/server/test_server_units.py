"""The replica server's pure pieces, without a process: wire types, request mapping, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from engine.sampling_params import SamplingParams
from engine.server import ipc
from engine.server.errors import ApiError, decode_json
from engine.server.openai_inputs import (
    Limits,
    Prompt,
    chat_logprobs,
    completion_prompt_ids,
    engine_requests,
    sampling_params,
)
from engine.server.openai_types import ChatCompletionRequest, CompletionRequest
from engine.server.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CacheSnapshot,
    KVStreamMessage,
    LoadSnapshot,
    apply_kv_message,
)
from engine.server.tokenizer import TextTools

LIMITS = Limits(max_model_len=100, vocab_size=500, default_max_tokens=32)


def test_kv_stream_messages_rebuild_the_hash_set() -> None:
    lines = [
        CacheSnapshot(seq=4, block_hashes=[1, 2], block_size=16, model_id="m"),
        BlockStored(
            seq=5, block_hashes=[3, 4], parent_block_hash=2, token_ids=list(range(32)), block_size=16
        ),
        BlockRemoved(seq=6, block_hashes=[4, 1]),
    ]
    decoder = msgspec.json.Decoder(KVStreamMessage)
    hashes: set[int] = set()
    for message in lines:
        apply_kv_message(hashes, decoder.decode(msgspec.json.encode(message)))
    assert hashes == {2, 3}
    assert b'"type":"BlockStored"' in msgspec.json.encode(lines[1])
    apply_kv_message(hashes, AllBlocksCleared(seq=7))
    assert hashes == set()
    # u64 hashes survive JSON.
    big = BlockRemoved(seq=1, block_hashes=[2**64 - 1])
    assert decoder.decode(msgspec.json.encode(big)) == big


def test_ipc_round_trip_keeps_sampling_params() -> None:
    params = SamplingParams(max_tokens=3, temperature=0.5, seed=9, stop=("x",), logprobs=2)
    message = ipc.AddRequests([ipc.NewRequest("r-0-0", [1, 2, 3], params, "salt", True)])
    assert ipc.decode_to_core(ipc.encode(message)) == message
    load = LoadSnapshot(
        running=1,
        waiting=0,
        num_blocks=8,
        free_blocks=6,
        cached_blocks=1,
        used_blocks=1,
        kv_usage=0.125,
        num_preemptions=0,
        prompt_tokens_admitted=3,
        cached_tokens_admitted=0,
        steps=2,
        kv_events_dropped=0,
    )
    step = ipc.StepOutput([ipc.Delta("r-0-0", [7], "hi", None, None, None, 3, 0, 0.01)], [], load, 0.02)
    assert ipc.decode_from_core(ipc.encode(step)) == step


def test_completion_prompt_shapes() -> None:
    text = TextTools(None)

    def ids(prompt: object) -> list[list[int]]:
        return completion_prompt_ids(CompletionRequest(prompt=prompt), text, 500)  # type: ignore[arg-type]

    assert ids([1, 2, 3]) == [[1, 2, 3]]
    assert ids([[1], [2, 3]]) == [[1], [2, 3]]
    for bad in ([], [True, 2], [[1], "a"], [1, 999], [[]], "text needs a tokenizer"):
        with pytest.raises(ApiError) as caught:
            ids(bad)
        assert caught.value.status == 400 and caught.value.param == "prompt"


def test_sampling_params_defaults_limits_and_errors() -> None:
    request = decode_json(b'{"messages": [{"role": "user", "content": "x"}]}', ChatCompletionRequest)

    def params(**overrides: object) -> SamplingParams:
        options: dict[str, object] = {
            "prompt_len": 90,
            "limits": LIMITS,
            "max_tokens": None,
            "max_tokens_param": "max_tokens",
            "logprobs": None,
            "prompt_param": "messages",
        }
        return sampling_params(request, **(options | overrides))  # type: ignore[arg-type]

    assert params().max_tokens == 10  # what fits in the context
    assert params(prompt_len=10).max_tokens == 32  # the configured cap
    with pytest.raises(ApiError, match="does not fit") as caught:
        params(max_tokens=11)
    assert caught.value.param == "max_tokens"
    with pytest.raises(ApiError, match="maximum context length") as caught:
        params(prompt_len=100)
    assert caught.value.param == "messages"
    with pytest.raises(ApiError, match="max_completion_tokens must be at least 1") as caught:
        params(max_tokens=0, max_tokens_param="max_completion_tokens")
    assert caught.value.param == "max_completion_tokens"


def test_n_samples_get_consecutive_seeds() -> None:
    params = SamplingParams(n=3, seed=2**64 - 2, max_tokens=1)
    requests = engine_requests("chatcmpl-1", [Prompt([1, 2], params)], None)
    assert [r.request_id for r in requests] == ["chatcmpl-1-0-0", "chatcmpl-1-0-1", "chatcmpl-1-0-2"]
    assert [r.params.seed for r in requests] == [2**64 - 2, 2**64 - 1, 0]  # wraps, as torch takes u64
    assert all(r.params.n == 1 for r in requests)


def test_chat_logprobs_mapping() -> None:
    def request(**fields: object) -> ChatCompletionRequest:
        return ChatCompletionRequest(messages=[], **fields)  # type: ignore[arg-type]

    assert chat_logprobs(request()) is None
    assert chat_logprobs(request(logprobs=True)) == 0
    assert chat_logprobs(request(logprobs=True, top_logprobs=5)) == 5
    with pytest.raises(ApiError, match="needs logprobs"):
        chat_logprobs(request(top_logprobs=1))


def test_decode_errors_name_the_field() -> None:
    with pytest.raises(ApiError) as caught:
        decode_json(b'{"messages": [{"content": "x"}]}', ChatCompletionRequest)
    assert caught.value.param == "messages[0].role"
    with pytest.raises(ApiError, match="not valid JSON"):
        decode_json(b"{", ChatCompletionRequest)


def test_core_process_has_no_web_dependency() -> None:
    code = (
        "import sys, engine.server.core_process\n"
        "web = [m for m in ('litestar', 'uvicorn', 'aiohttp', 'prometheus_client') if m in sys.modules]\n"
        "assert not web, web\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[3])
