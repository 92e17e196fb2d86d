"""OpenAI requests -> engine requests: prompts to token ids, fields to SamplingParams, limits.

Every check a user can fail happens here, before the engine sees the request, and raises
ApiError naming the field. Ranges come from SamplingParams.problem(), the one place that
defines them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.sampling_params import MAX_TOP_LOGPROBS, Grammar, SamplingParams
from engine.server import ipc
from engine.server.errors import ApiError, bad_request
from engine.server.openai_types import (
    MIN_REPETITION_PENALTY,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from engine.server.protocol import GrammarSpec
from engine.server.tokenizer import PromptError, TextTools

_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes


@dataclass(frozen=True, slots=True)
class Limits:
    max_model_len: int
    vocab_size: int
    default_max_tokens: int


@dataclass(frozen=True, slots=True)
class Prompt:
    token_ids: list[int]
    params: SamplingParams


# --- prompts ----------------------------------------------------------------------------


def completion_prompt_ids(request: CompletionRequest, text: TextTools, vocab_size: int) -> list[list[int]]:
    """The prompt field in any of its four shapes, as one token list per prompt."""
    prompt = request.prompt
    shapes = "a string, a list of strings, a list of token ids or a list of token id lists"
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    elif all(_is_token(t) for t in prompt):
        prompts = [prompt]
    elif all(isinstance(p, str) for p in prompt) or all(
        isinstance(p, list) and all(_is_token(t) for t in p) for p in prompt
    ):
        prompts = list(prompt)
    else:
        raise bad_request(f"prompt must be {shapes}", "prompt")
    out = []
    for p in prompts:
        if isinstance(p, str):
            try:
                ids = text.encode(p) if p else []
            except PromptError as err:
                raise bad_request(str(err), "prompt") from None
        else:
            ids = list(p)
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise bad_request(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        out.append(ids)
    return out


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- sampling ---------------------------------------------------------------------------


def sampling_params(
    request: SamplingFields,
    *,
    prompt_len: int,
    limits: Limits,
    max_tokens: int | None,
    max_tokens_param: str,
    logprobs: int | None,
    prompt_param: str,
    detokenize: bool = True,
    grammar: GrammarSpec | None = None,
) -> SamplingParams:
    if request.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options may only be set when stream is true", "stream_options")
    if request.seed is not None and not _SEED_MIN <= request.seed <= _SEED_MAX:
        raise bad_request(f"seed must be between {_SEED_MIN} and {_SEED_MAX}", "seed")
    penalty = request.repetition_penalty
    if penalty is not None and penalty < MIN_REPETITION_PENALTY:
        message = f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, 100], got {penalty}"
        raise bad_request(message, "repetition_penalty")
    top_k = request.top_k if request.top_k is not None else 0
    if top_k < -1:
        raise bad_request(f"top_k must be -1 (off), 0 (off) or positive, got {top_k}", "top_k")
    stop_token_ids = tuple(request.stop_token_ids or ())
    bad = next((t for t in stop_token_ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise bad_request(f"stop token id {bad} is outside the vocabulary", "stop_token_ids")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if stop and not detokenize:
        raise bad_request("stop strings need detokenization; send stop_token_ids", "stop")
    room = limits.max_model_len - prompt_len
    if room < 1:
        raise bad_request(
            f"the prompt has {prompt_len} tokens; this model's maximum context length is "
            f"{limits.max_model_len} tokens, and at least one must be left to generate",
            prompt_param,
        )
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    elif max_tokens > room:
        raise bad_request(
            f"{max_tokens_param}={max_tokens} does not fit: the prompt has {prompt_len} tokens and this "
            f"model's maximum context length is {limits.max_model_len} tokens ({room} left to generate)",
            max_tokens_param,
        )
    fields: dict[str, Any] = {
        "n": 1 if request.n is None else request.n,
        "max_tokens": max_tokens,
        "temperature": _or(request.temperature, 1.0),
        "top_p": _or(request.top_p, 1.0),
        "top_k": min(max(top_k, 0), limits.vocab_size),  # past the vocabulary top-k is off anyway
        "min_p": _or(request.min_p, 0.0),
        "repetition_penalty": _or(request.repetition_penalty, 1.0),
        "presence_penalty": _or(request.presence_penalty, 0.0),
        "frequency_penalty": _or(request.frequency_penalty, 0.0),
        "seed": request.seed,
        "stop": stop,
        "stop_token_ids": stop_token_ids,
        "ignore_eos": request.ignore_eos,
        "logprobs": logprobs,
        "grammar": None if grammar is None else Grammar(grammar.kind, grammar.text),
    }
    try:
        return SamplingParams(**fields)
    except ValueError as err:
        message = str(err)
        field = message.split(" ", 1)[0]
        if field == "max_tokens":
            message = message.replace("max_tokens", max_tokens_param, 1)
        param = max_tokens_param if field == "max_tokens" else field if field in fields else None
        raise bad_request(message, param) from None


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def chat_logprobs(request: ChatCompletionRequest) -> int | None:
    if request.top_logprobs is not None:
        if not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad_request(
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {request.top_logprobs}",
                "top_logprobs",
            )
    return (request.top_logprobs or 0) if request.logprobs else None


def check_completion_options(request: CompletionRequest) -> None:
    if request.echo:
        raise bad_request("echo is not supported", "echo")
    if request.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise bad_request("best_of is not supported (it must equal n)", "best_of")


# --- engine requests --------------------------------------------------------------------


def engine_requests(
    request_id: str, prompts: Sequence[Prompt], cache_salt: str | None, detokenize: bool = True
) -> list[ipc.NewRequest]:
    """One engine request per sample: choice index = prompt index * n + sample index.

    Each sample is its own request (as engine/llm.py does); they share the prompt's blocks
    through the prefix cache, and a seed gives sample i the seed + i.
    """
    out = []
    for p, prompt in enumerate(prompts):
        params = prompt.params
        for i in range(params.n):
            child = dataclasses.replace(params, n=1, seed=_child_seed(params.seed, i))
            out.append(
                ipc.NewRequest(f"{request_id}-{p}-{i}", prompt.token_ids, child, cache_salt, detokenize)
            )
    return out


def _child_seed(seed: int | None, index: int) -> int | None:
    if seed is None:
        return None
    child = seed + index
    return child if child <= _SEED_MAX else child - (1 << 64)


def check_model(requested: str | None, served: str, aliases: frozenset[str]) -> None:
    if requested is not None and requested != served and requested not in aliases:
        raise ApiError(
            404,
            f"the model {requested!r} does not exist; this replica serves {served!r}",
            param="model",
            code="model_not_found",
        )
