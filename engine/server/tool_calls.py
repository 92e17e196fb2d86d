"""Tool calls at the OpenAI API: the request's tools checked, tool calls parsed out of the
text into OpenAI's shapes (whole messages and stream deltas). Torch-free: the replica and
the gateway share it, so a request behaves the same through either. The prompt side is in
tool_prompt.py, the grammar that forces a call in response_format.py.

Output: Hermes/Qwen `<tool_call>{json}</tool_call>` blocks anywhere in the text, or a whole
answer that is Llama 3.1 JSON (`{"name": ..., "parameters": {...}}`, optionally after
`<|python_tag|>`, several separated by `;`). Anything that does not parse as a call to a
known tool stays content, so malformed output is never an error.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.server.openai_types import (
    AssistantMessage,
    ChatDelta,
    FunctionCall,
    FunctionDelta,
    ToolCall,
    ToolCallDelta,
    ToolDefinition,
)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


class RequestFieldError(ValueError):
    """A tools / tool_choice / response_format problem, for a 400 naming the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    parameters: dict[str, Any]  # the JSON schema of the arguments
    definition: dict[str, Any]  # {"type": "function", "function": {...}}, as templates take it


def check_tools(tools: Sequence[ToolDefinition] | None) -> tuple[Tool, ...]:
    out: list[Tool] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools or ()):
        if tool.type != "function":
            raise RequestFieldError(f"tool type must be 'function', got {tool.type!r}", f"tools[{i}].type")
        function = tool.function
        if not _FUNCTION_NAME.match(function.name):
            raise RequestFieldError(
                "function names must be 1 to 64 letters, digits, underscores or dashes, "
                f"got {function.name!r}",
                f"tools[{i}].function.name",
            )
        if function.name in seen:
            raise RequestFieldError(f"two tools are named {function.name!r}", f"tools[{i}].function.name")
        seen.add(function.name)
        parameters = function.parameters if function.parameters is not None else {"type": "object"}
        if parameters.get("type", "object") != "object":
            raise RequestFieldError(
                "a function's parameters must be a JSON schema of type 'object'",
                f"tools[{i}].function.parameters",
            )
        definition: dict[str, Any] = {"name": function.name}
        if function.description is not None:
            definition["description"] = function.description
        definition["parameters"] = parameters
        out.append(Tool(function.name, parameters, {"type": "function", "function": definition}))
    return tuple(out)


# --- output -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContentPiece:
    text: str


@dataclass(frozen=True, slots=True)
class ParsedCall:
    index: int
    id: str
    name: str
    arguments: str  # JSON text


Event = ContentPiece | ParsedCall


class ToolCallParser:
    """Text deltas in, content pieces and whole tool calls out, in order.

    A `<tool_call>` block is held until it closes and is then checked, so a malformed block
    still goes out as content rather than as half a call. An answer that starts with `{` or
    `<|python_tag|>` is held to the end (it may be Llama-style JSON calls). Whitespace right
    before a call, or at the end of an answer with calls, is dropped. Feeding a whole text
    at once gives the same events as feeding it in pieces: the non-streamed answer is built
    by this same parser, so a stream always reassembles to it.
    """

    def __init__(self, names: frozenset[str], max_calls: int | None = None) -> None:
        self._names = names
        self._max_calls = max_calls
        self._mode = "start"  # start | text | call | json
        self._buffer = ""
        self._pending_space = ""
        self.num_calls = 0

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        out: list[Event] = []
        self._advance(out, final=False)
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._mode == "json":
            calls = _json_calls(self._buffer, self._names)
            if calls:
                for name, arguments in calls:
                    self._call(name, arguments, out)
            else:
                self._content(self._buffer, out)
            self._buffer = ""
        else:
            self._advance(out, final=True)
        if self._pending_space and self.num_calls == 0:
            out.append(ContentPiece(self._pending_space))
        self._pending_space = ""
        return out

    def _advance(self, out: list[Event], final: bool) -> None:
        while True:
            if self._mode == "start":
                head = self._buffer.lstrip()
                if head.startswith(("{", PYTHON_TAG)):
                    self._mode = "json"
                elif (not head or PYTHON_TAG.startswith(head)) and not final:
                    return  # too early to tell
                else:
                    self._mode = "text"
            elif self._mode == "json":
                return
            elif self._mode == "text":
                at = self._buffer.find(TOOL_CALL_OPEN)
                if at < 0:
                    keep = 0 if final else _partial_suffix(self._buffer, TOOL_CALL_OPEN)
                    self._content(self._buffer[: len(self._buffer) - keep], out)
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return
                self._content(self._buffer[:at], out)
                self._buffer = self._buffer[at + len(TOOL_CALL_OPEN) :]
                self._mode = "call"
            else:
                end = self._buffer.find(TOOL_CALL_CLOSE)
                if end < 0 and not final:
                    return
                if end < 0:  # the answer ended inside the block (a stop string, or no closing tag)
                    inner, rest, raw = self._buffer, "", TOOL_CALL_OPEN + self._buffer
                else:
                    close = end + len(TOOL_CALL_CLOSE)
                    inner, rest = self._buffer[:end], self._buffer[close:]
                    raw = TOOL_CALL_OPEN + self._buffer[:close]
                call = _call_of(_loads(inner.strip()), self._names)
                if call is None:
                    self._content(raw, out)
                else:
                    self._call(*call, out)
                self._buffer = rest
                self._mode = "text"

    def _content(self, text: str, out: list[Event]) -> None:
        text = self._pending_space + text
        head = text.rstrip()
        self._pending_space = text[len(head) :]
        if head:
            out.append(ContentPiece(head))

    def _call(self, name: str, arguments: str, out: list[Event]) -> None:
        self._pending_space = ""
        if self._max_calls is not None and self.num_calls >= self._max_calls:
            return  # parallel_tool_calls=false: only the first call counts
        out.append(ParsedCall(self.num_calls, new_call_id(), name, arguments))
        self.num_calls += 1


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_suffix(text: str, tag: str) -> int:
    """How many trailing characters of text could be the start of tag."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


_MISSING = object()


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return _MISSING


def _call_of(value: Any, names: frozenset[str]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) when value is a call of a known tool, else None."""
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _loads(arguments)
    if not isinstance(name, str) or name not in names or not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)


def _json_calls(text: str, names: frozenset[str]) -> list[tuple[str, str]]:
    """Llama-style calls making up the whole text, or [] when it is anything else."""
    text = text.strip()
    text = text.removeprefix(PYTHON_TAG).strip()
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at = 0
    while at < len(text):
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return []
        values.extend(value if isinstance(value, list) else [value])
        while at < len(text) and text[at] in " \t\r\n;,":
            at += 1
    calls = [_call_of(value, names) for value in values]
    if not calls or any(call is None for call in calls):
        return []
    return [call for call in calls if call is not None]


# --- OpenAI shapes ------------------------------------------------------------------------


def assistant_message(text: str, names: frozenset[str], max_calls: int | None) -> AssistantMessage:
    """The whole answer's message: content and parsed tool calls (none parsed: text as is)."""
    parser = ToolCallParser(names, max_calls)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentPiece))
    calls = [
        ToolCall(id=e.id, function=FunctionCall(e.name, e.arguments))
        for e in events
        if isinstance(e, ParsedCall)
    ]
    if not calls:
        return AssistantMessage(content)
    return AssistantMessage(content or None, tool_calls=calls)


def finish_reason(reason: str | None, made_calls: bool) -> str | None:
    return "tool_calls" if made_calls and reason is not None else reason


def message_finish_reason(message: AssistantMessage, reason: str | None) -> str | None:
    return finish_reason(reason, isinstance(message.tool_calls, list) and bool(message.tool_calls))


class ToolDeltaStream:
    """Streamed text -> OpenAI chat deltas: content as it comes, each call as it completes
    (a first delta with id, type, name and arguments "", then the arguments)."""

    def __init__(self, names: frozenset[str], max_calls: int | None) -> None:
        self.parser = ToolCallParser(names, max_calls)

    @property
    def made_calls(self) -> bool:
        return self.parser.num_calls > 0

    def feed(self, text: str) -> list[ChatDelta]:
        return _deltas(self.parser.feed(text))

    def finish(self) -> list[ChatDelta]:
        return _deltas(self.parser.finish())


def _deltas(events: list[Event]) -> list[ChatDelta]:
    out = []
    for event in events:
        if isinstance(event, ContentPiece):
            out.append(ChatDelta(content=event.text))
            continue
        opening = ToolCallDelta(
            index=event.index, id=event.id, type="function", function=FunctionDelta(event.name, "")
        )
        out.append(ChatDelta(tool_calls=[opening]))
        out.append(
            ChatDelta(
                tool_calls=[
                    ToolCallDelta(index=event.index, function=FunctionDelta(arguments=event.arguments))
                ]
            )
        )
    return out
