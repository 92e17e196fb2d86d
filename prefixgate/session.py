"""`Session` / `AsyncSession`: one multi-turn conversation or agent loop, kept byte-stable.

The prefix cache reuses a turn's KV only if the next request starts with exactly the same
tokens. So a session stores every message exactly as it was sent or returned (an assistant
reply is appended verbatim, tool calls and their JSON arguments included), sends the same
tools and parameters every turn, and sends one session id (generated once) as x-session-id,
which the gateway uses to keep the conversation on the replica that holds its KV.

    session = Session(client, system="You are terse.", max_tokens=64)
    session.send("What is 2 + 2?")
    session.send("And times 3?")
    print([(t.prompt_tokens, t.cached_tokens) for t in session.turns])
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefixgate.async_client import AsyncClient
from prefixgate.client import Client
from prefixgate.types import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    FunctionCall,
    ToolCall,
    ToolCallDelta,
    Usage,
)


@dataclass(frozen=True)
class Turn:
    """One request of the session and what the server reported for it."""

    index: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None
    reply: AssistantMessage

    @property
    def cached_fraction(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class _Conversation:
    """The message list and turn records both session kinds share."""

    def __init__(
        self,
        messages: Sequence[Mapping[str, Any]] | None,
        system: str | None,
        session_id: str | None,
        tools: list[dict[str, Any]] | None,
        params: dict[str, Any],
    ) -> None:
        self.session_id = session_id or uuid.uuid4().hex
        self.messages: list[Mapping[str, Any]] = []
        if system is not None:
            self.messages.append({"role": "system", "content": system})
        self.messages.extend(messages or ())
        self.tools = tools
        self.params = params  # sent with every turn, so that the request prefix never changes
        self.turns: list[Turn] = []

    # --- building the conversation ------------------------------------------------------

    def add(self, message: Mapping[str, Any]) -> None:
        """Append a message as is (it is sent exactly like this from now on)."""
        self.messages.append(message)

    def add_user(self, content: str) -> None:
        self.messages.append({"role": "user", "content": content})

    def add_tool_result(self, tool_call_id: str, content: str, name: str | None = None) -> None:
        """The result of one tool call the last reply asked for."""
        message: dict[str, Any] = {"role": "tool", "tool_call_id": tool_call_id, "content": content}
        if name is not None:
            message["name"] = name
        self.messages.append(message)

    @property
    def last_reply(self) -> AssistantMessage | None:
        return self.turns[-1].reply if self.turns else None

    @property
    def pending_tool_calls(self) -> list[ToolCall]:
        """The tool calls of the last reply that no tool message answers yet."""
        reply = self.last_reply
        if reply is None or not reply.tool_calls:
            return []
        answered = {m.get("tool_call_id") for m in self.messages if m.get("role") == "tool"}
        return [call for call in reply.tool_calls if call.id not in answered]

    # --- requests -----------------------------------------------------------------------

    def _request(self, content: str | None, params: Mapping[str, Any]) -> dict[str, Any]:
        if content is not None:
            self.add_user(content)
        merged: dict[str, Any] = {**self.params, **params}
        if self.tools is not None:
            merged.setdefault("tools", self.tools)
        return merged

    def _record(self, reply: AssistantMessage, finish_reason: str | None, usage: Usage | None) -> Turn:
        self.messages.append(reply.to_dict())
        turn = Turn(
            index=len(self.turns),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            cached_tokens=usage.cached_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=finish_reason,
            reply=reply,
        )
        self.turns.append(turn)
        return turn

    def _record_completion(self, completion: ChatCompletion) -> None:
        choice = completion.choices[0]
        self._record(choice.message, choice.finish_reason, completion.usage)


class _StreamedReply:
    """Puts a streamed reply back together (content and tool calls) as the server sent it."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def feed(self, chunk: ChatCompletionChunk) -> None:
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            if choice.delta.content:
                self.content.append(choice.delta.content)
            for delta in choice.delta.tool_calls or ():
                self._feed_call(delta)
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason

    def _feed_call(self, delta: ToolCallDelta) -> None:
        call = self.calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
        call["id"] = delta.id or call["id"]
        if delta.function is not None:
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""

    def message(self) -> AssistantMessage:
        calls = [
            ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
            for _, c in sorted(self.calls.items())
        ]
        content = "".join(self.content)
        return AssistantMessage(content=content if content or not calls else None, tool_calls=calls or None)


class Session(_Conversation):
    def __init__(
        self,
        client: Client,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        system: str | None = None,
        session_id: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **params: Any,
    ) -> None:
        """`params` (max_tokens, temperature, cache_salt, ...) go with every turn."""
        super().__init__(messages, system, session_id, tools, params)
        self.client = client

    def send(self, content: str | None = None, **params: Any) -> ChatCompletion:
        """Add `content` as a user message (if given), ask, append the reply; returns the answer."""
        merged = self._request(content, params)
        completion = self.client.chat(self.messages, session_id=self.session_id, **merged)
        self._record_completion(completion)
        return completion

    def stream(self, content: str | None = None, **params: Any) -> Iterator[ChatCompletionChunk]:
        """Like send, chunk by chunk; the reply is appended once the stream ends."""
        merged = self._request(content, params)
        reply = _StreamedReply()
        with self.client.chat_stream(self.messages, session_id=self.session_id, **merged) as chunks:
            for chunk in chunks:
                reply.feed(chunk)
                yield chunk
        self._record(reply.message(), reply.finish_reason, reply.usage)


class AsyncSession(_Conversation):
    def __init__(
        self,
        client: AsyncClient,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        system: str | None = None,
        session_id: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **params: Any,
    ) -> None:
        super().__init__(messages, system, session_id, tools, params)
        self.client = client

    async def send(self, content: str | None = None, **params: Any) -> ChatCompletion:
        merged = self._request(content, params)
        completion = await self.client.chat(self.messages, session_id=self.session_id, **merged)
        self._record_completion(completion)
        return completion

    async def stream(self, content: str | None = None, **params: Any) -> AsyncIterator[ChatCompletionChunk]:
        merged = self._request(content, params)
        reply = _StreamedReply()
        async with await self.client.chat_stream(
            self.messages, session_id=self.session_id, **merged
        ) as chunks:
            async for chunk in chunks:
                reply.feed(chunk)
                yield chunk
        self._record(reply.message(), reply.finish_reason, reply.usage)
