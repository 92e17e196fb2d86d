"""The offline API: `LLM(model).generate(prompts, SamplingParams)`, plus streaming and chat."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.model_store import resolve_model
from engine.request import Request, TokenLogprob
from engine.sampling_params import SamplingParams
from engine.weights import ModelLoadError, load_model

Prompt = str | Sequence[int]
Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class RequestStats:
    prompt_tokens: int
    cached_tokens: int
    queue_time: float | None
    ttft: float | None
    token_times: tuple[float, ...]  # seconds since arrival at which each output token appeared
    e2e: float | None
    num_preemptions: int


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    stop_reason: int | str | None
    logprobs: tuple[TokenLogprob, ...] | None
    stats: RequestStats


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]

    @property
    def text(self) -> str:
        return self.outputs[0].text


@dataclass(frozen=True, slots=True)
class StreamChunk:
    request_id: str
    index: int  # which of the n samples
    text: str
    token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None


class LLM:
    def __init__(self, model: str | Path = "default", **engine_options: Any) -> None:
        config = EngineConfig(model=str(model), **engine_options)
        folder = resolve_model(config.model)
        started = time.perf_counter()
        device = config.torch_device()
        loaded = load_model(folder, dtype=config.torch_dtype(device), device=device)
        self.tokenizer = _load_tokenizer(folder)
        self.engine = EngineCore(config, loaded, self.tokenizer)
        # From a cached folder to an engine ready for requests: the figure the README quotes.
        self.load_seconds = time.perf_counter() - started
        self._ids = itertools.count()

    # -- prompts -----------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: pass token ids")
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return [int(t) for t in prompt]

    def apply_chat_template(self, messages: Sequence[Message], **template_options: Any) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        ids = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=True, **template_options
        )["input_ids"]
        return list(ids)

    # -- generation --------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        groups = self._submit(_as_prompt_list(prompts), params, cache_salt)
        while self.engine.has_unfinished:
            self.engine.step()
        return [self._result(group_id, requests) for group_id, requests in groups]

    def chat(
        self,
        conversations: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [self.apply_chat_template(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params, cache_salt=cache_salt)

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        cache_salt: str | None = None,
    ) -> Iterator[StreamChunk]:
        """Yield text and tokens as steps produce them; closing the iterator aborts what is left."""
        groups = self._submit(_as_prompt_list(prompts), params, cache_salt)
        index_of = {r.request_id: (group_id, i) for group_id, rs in groups for i, r in enumerate(rs)}
        pending = set(index_of)
        try:
            while pending:
                for delta in self.engine.step():
                    request_id = delta.request.request_id
                    if request_id not in pending:
                        continue
                    group_id, index = index_of[request_id]
                    if delta.finished:
                        pending.discard(request_id)
                    yield StreamChunk(
                        request_id=group_id,
                        index=index,
                        text=delta.new_text,
                        token_ids=delta.new_token_ids,
                        finished=delta.finished,
                        finish_reason=_reason(delta.request),
                    )
        finally:
            for request_id in pending:
                self.engine.abort(request_id)

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    # -- internals ---------------------------------------------------------------------
    def _submit(
        self,
        prompts: list[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None,
        cache_salt: str | None,
    ) -> list[tuple[str, list[Request]]]:
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        groups = []
        for prompt, sampling in zip(prompts, params_list, strict=True):
            token_ids = self.encode(prompt)
            group_id = f"req-{next(self._ids)}"
            requests = []
            for index in range(sampling.n):
                # Each of the n samples is its own request; they share the prompt's blocks
                # through the prefix cache, and a seed gives each sample its own stream.
                child = dataclasses.replace(
                    sampling, n=1, seed=None if sampling.seed is None else sampling.seed + index
                )
                request_id = group_id if sampling.n == 1 else f"{group_id}-{index}"
                requests.append(self.engine.add_request(token_ids, child, request_id, cache_salt))
            groups.append((group_id, requests))
        return groups

    def _result(self, group_id: str, requests: list[Request]) -> RequestOutput:
        outputs = []
        for index, request in enumerate(requests):
            outputs.append(
                CompletionOutput(
                    index=index,
                    text=self._final_text(request),
                    token_ids=tuple(request.output_token_ids),
                    finish_reason=_reason(request),
                    stop_reason=request.stop_reason,
                    logprobs=tuple(request.logprobs) if request.params.logprobs is not None else None,
                    stats=_stats(request),
                )
            )
        return RequestOutput(group_id, tuple(requests[0].prompt_token_ids), tuple(outputs))

    def _final_text(self, request: Request) -> str:
        """The whole output decoded at once, cut before a stop string that ended it."""
        text = self._decode(request.output_token_ids)
        if isinstance(request.stop_reason, str):
            cut = text.find(request.stop_reason)
            if cut >= 0:
                text = text[:cut]
        return text

    def _decode(self, token_ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # type: ignore[list-item]
    return prompts  # type: ignore[return-value]


def _reason(request: Request) -> str | None:
    return None if request.finish_reason is None else request.finish_reason.value


def _stats(request: Request) -> RequestStats:
    times = request.times
    return RequestStats(
        prompt_tokens=request.num_prompt_tokens,
        cached_tokens=max(request.num_cached_tokens, 0),
        queue_time=times.queue_time,
        ttft=times.ttft,
        token_times=tuple(t - times.arrival for t in times.tokens),
        e2e=None if times.finished is None else times.finished - times.arrival,
        num_preemptions=request.num_preemptions,
    )


def _load_tokenizer(folder: Path) -> Any:
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{folder / 'tokenizer.json'}: cannot load tokenizer ({err})") from err
