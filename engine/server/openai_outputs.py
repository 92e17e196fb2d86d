"""Engine deltas -> OpenAI responses: whole (non-streamed) bodies and SSE chunks.

A Generation follows the engine requests of one HTTP request and keeps, per choice, what a
whole response needs; the streaming generators turn each delta into chunks as it arrives.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import msgspec

from engine.server import ipc
from engine.server.core_client import Submission
from engine.server.errors import ApiError
from engine.server.openai_types import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    ErrorResponse,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from engine.server.protocol import TokenLogprob
from engine.server.response_format import ChatOutputPlan
from engine.server.tokenizer import TextTools
from engine.server.tool_calls import ToolDeltaStream, assistant_message, finish_reason, message_finish_reason

# JSON has no -inf; OpenAI clients expect a number, as vLLM sends.
_MIN_LOGPROB = -9999.0
_DONE = b"data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(message: msgspec.Struct) -> bytes:
    return b"data: " + _encoder.encode(message) + b"\n\n"


@dataclass(slots=True)
class Choice:
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class Generation:
    """The n samples of each prompt of one HTTP request, as OpenAI choices."""

    def __init__(
        self, submission: Submission, prompt_lens: Sequence[int], n: int, model: str, text: TextTools
    ) -> None:
        self.submission = submission
        self.model = model
        self.text = text
        self.created = int(time.time())
        self.prompt_lens = list(prompt_lens)
        self.n = n
        self.choices = [Choice() for _ in range(len(prompt_lens) * n)]
        self.cached_tokens = [0] * len(prompt_lens)
        self._index = {request_id: i for i, request_id in enumerate(submission.request_ids)}

    async def next(self) -> tuple[int, ipc.Delta]:
        delta = await self.submission.next()
        index = self._index[delta.request_id]
        choice = self.choices[index]
        if index % self.n == 0 and choice.num_tokens == 0:
            # What the prompt found cached on arrival: sample 0's view (later samples of the
            # same prompt would count blocks sample 0 just computed).
            self.cached_tokens[index // self.n] = delta.num_cached_tokens
        choice.text.append(delta.text)
        choice.num_tokens += len(delta.token_ids)
        if delta.logprobs:
            choice.logprobs.extend(delta.logprobs)
        choice.finish_reason = delta.finish_reason
        return index, delta

    async def run(self) -> None:
        while not self.submission.done:
            await self.next()

    def usage(self) -> Usage:
        prompt = sum(self.prompt_lens)
        completion = sum(c.num_tokens for c in self.choices)
        return Usage(prompt, completion, prompt + completion, PromptTokensDetails(sum(self.cached_tokens)))

    # -- logprobs in the two OpenAI shapes ----------------------------------------------
    def chat_logprobs(self, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs([self._chat_entry(e) for e in entries])

    def _chat_entry(self, entry: TokenLogprob) -> ChatTokenLogprob:
        token = self.text.token_text(entry.token_id)
        return ChatTokenLogprob(
            token,
            max(entry.logprob, _MIN_LOGPROB),
            list(token.encode()),
            [TopLogprob(t, max(lp, _MIN_LOGPROB), list(t.encode())) for t, lp in self._top(entry)],
        )

    def completion_logprobs(self, entries: Sequence[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
        tokens, values, tops, offsets = [], [], [], []
        for entry in entries:
            token = self.text.token_text(entry.token_id)
            tokens.append(token)
            values.append(max(entry.logprob, _MIN_LOGPROB))
            tops.append({t: max(lp, _MIN_LOGPROB) for t, lp in self._top(entry)})
            offsets.append(offset)
            offset += len(token)
        return CompletionLogprobs(tokens, values, tops, offsets)

    def _top(self, entry: TokenLogprob) -> list[tuple[str, float]]:
        return [(self.text.token_text(token_id), lp) for token_id, lp in entry.top]


# --- whole responses -------------------------------------------------------------------


def chat_completion(
    generation: Generation, request_id: str, logprobs: bool, plan: ChatOutputPlan | None = None
) -> ChatCompletion:
    choices = []
    for i, c in enumerate(generation.choices):
        text = "".join(c.text)
        if plan is not None and plan.parse_tool_calls:
            message = assistant_message(text, plan.tool_names, plan.max_calls)
        else:
            message = AssistantMessage(text)
        lp = generation.chat_logprobs(c.logprobs) if logprobs else None
        choices.append(ChatChoice(i, message, lp, message_finish_reason(message, c.finish_reason)))
    return ChatCompletion(
        id=request_id,
        created=generation.created,
        model=generation.model,
        choices=choices,
        usage=generation.usage(),
    )


def completion(generation: Generation, request_id: str, logprobs: bool) -> Completion:
    choices = [
        CompletionChoice(
            i,
            "".join(c.text),
            generation.completion_logprobs(c.logprobs) if logprobs else None,
            c.finish_reason,
        )
        for i, c in enumerate(generation.choices)
    ]
    return Completion(
        id=request_id,
        created=generation.created,
        model=generation.model,
        choices=choices,
        usage=generation.usage(),
    )


# --- streams ---------------------------------------------------------------------------


async def chat_stream(
    generation: Generation,
    request_id: str,
    logprobs: bool,
    include_usage: bool,
    plan: ChatOutputPlan | None = None,
) -> AsyncIterator[bytes]:
    """Role delta per choice, content (and tool call) deltas, a finish chunk per choice, usage, [DONE]."""

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        return sse(
            ChatCompletionChunk(
                id=request_id,
                created=generation.created,
                model=generation.model,
                choices=choices,
                usage=usage,
            )
        )

    tools = None
    if plan is not None and plan.parse_tool_calls:
        tools = [ToolDeltaStream(plan.tool_names, plan.max_calls) for _ in generation.choices]
    try:
        for i in range(len(generation.choices)):
            yield chunk([ChatChunkChoice(i, ChatDelta(role="assistant", content=""))])
        while not generation.submission.done:
            index, delta = await generation.next()
            lp = generation.chat_logprobs(delta.logprobs or []) if logprobs and delta.logprobs else None
            if tools is None:
                deltas = [ChatDelta(content=delta.text)] if delta.text else []
            else:
                deltas = tools[index].feed(delta.text)
                if delta.finish_reason is not None:
                    deltas += tools[index].finish()
            if lp is not None and not deltas:
                deltas = [ChatDelta(content="")]
            for k, out in enumerate(deltas):
                yield chunk([ChatChunkChoice(index, out, lp if k == 0 else None)])
            if delta.finish_reason is not None:
                reason = finish_reason(delta.finish_reason, tools is not None and tools[index].made_calls)
                yield chunk([ChatChunkChoice(index, ChatDelta(), None, reason)])
        if include_usage:
            yield chunk([], generation.usage())
        yield _DONE
    except ApiError as err:
        yield sse(ErrorResponse(err.body()))
        yield _DONE
    finally:
        generation.submission.close()


async def completion_stream(
    generation: Generation, request_id: str, logprobs: bool, include_usage: bool
) -> AsyncIterator[bytes]:
    """Text deltas, a finish chunk per choice, usage, [DONE]."""
    offsets = [0] * len(generation.choices)

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return sse(
            Completion(
                id=request_id,
                created=generation.created,
                model=generation.model,
                choices=choices,
                usage=usage,
            )
        )

    try:
        while not generation.submission.done:
            index, delta = await generation.next()
            if delta.text or (logprobs and delta.logprobs):
                lp = None
                if logprobs:
                    lp = generation.completion_logprobs(delta.logprobs or [], offsets[index])
                offsets[index] += len(delta.text)
                yield chunk([CompletionChoice(index, delta.text, lp, None)])
            if delta.finish_reason is not None:
                yield chunk([CompletionChoice(index, "", None, delta.finish_reason)])
        if include_usage:
            yield chunk([], generation.usage())
        yield _DONE
    except ApiError as err:
        yield sse(ErrorResponse(err.body()))
        yield _DONE
    finally:
        generation.submission.close()
