"""OpenAI requests -> what the gateway forwards: prompt token ids and a GenerateRequest.

Checks that need the model (context length, vocabulary) happen here, from the replica's
/internal/info; range checks of sampling fields stay with the replica, whose 400 the
gateway passes through unchanged.
"""

from __future__ import annotations

import os

from engine.server.openai_types import (
    CompletionRequest,
    SamplingFields,
)
from engine.server.protocol import GenerateRequest, GrammarSpec
from gateway.errors import bad_request
from gateway.pool import ModelPool


def completion_ids(body: CompletionRequest, pool: ModelPool) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        return pool.tokenizer.encode(prompt)
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = pool.info.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
        return list(prompt)
    raise bad_request("the gateway takes one prompt per request: a string or a list of token ids", "prompt")


def generate_request(
    body: SamplingFields,
    pool: ModelPool,
    prompt_len: int,
    max_tokens: int | None,
    param: str,
    logprobs: int | None,
    prompt_param: str,
    grammar: GrammarSpec | None = None,
) -> GenerateRequest:
    if body.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options may only be set when stream is true", "stream_options")
    info = pool.info
    room = info.max_model_len - prompt_len
    if room < 1:
        raise bad_request(
            f"the prompt has {prompt_len} tokens; this model's maximum context length is "
            f"{info.max_model_len} tokens, and at least one must be left to generate",
            prompt_param,
        )
    if max_tokens is None:
        max_tokens = min(info.default_max_tokens, room)
    elif max_tokens > room:
        raise bad_request(
            f"{param}={max_tokens} does not fit: the prompt has {prompt_len} tokens and this model's "
            f"maximum context length is {info.max_model_len} tokens ({room} left to generate)",
            param,
        )
    elif max_tokens < 1:
        raise bad_request(f"{param} must be at least 1, got {max_tokens}", param)
    n = 1 if body.n is None else body.n
    if not 1 <= n <= 128:
        raise bad_request(f"n must be between 1 and 128, got {n}", "n")
    return GenerateRequest(
        token_ids=[],  # filled in by the caller, to keep one copy
        max_tokens=max_tokens,
        n=n,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        min_p=0.0 if body.min_p is None else body.min_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=0.0 if body.presence_penalty is None else body.presence_penalty,
        frequency_penalty=0.0 if body.frequency_penalty is None else body.frequency_penalty,
        seed=body.seed,
        stop_token_ids=list(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        cache_salt=body.cache_salt,
        request_id=os.urandom(16).hex(),  # as random as uuid4().hex, a quarter of its cost
        grammar=grammar,
    )


def stops(body: SamplingFields) -> tuple[str, ...]:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise bad_request("stop strings must not be empty", "stop")
    return stop
