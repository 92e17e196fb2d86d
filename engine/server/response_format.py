"""What a chat request wants of its output: tool calls to parse, and the grammar that forces it.

- `response_format` {"type": "json_object"} / {"type": "json_schema", ...} -> a JSON grammar.
- `tool_choice` "required" or a named function -> a Lark grammar (llguidance syntax) that
  forces `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` blocks whose JSON
  matches {"name": const, "arguments": the tool's parameters schema}, so the arguments are
  valid JSON every time: one call of any tool ("required", one or more with parallel calls)
  or one call of the named tool.
- `tool_choice` "auto" with a response_format: a call or the formatted answer.

Grammars are checked with llguidance here, so a bad schema is a 400 naming the field before
the request reaches an engine. Torch-free: the gateway builds the same plan the replica does.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.server.openai_types import ChatCompletionRequest, NamedToolChoice, ResponseFormat
from engine.server.protocol import GrammarSpec
from engine.server.tool_calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, RequestFieldError, Tool, check_tools

# Inside a Lark grammar the engine's JSON defaults do not reach a %json block, so it carries
# its own: one space after ',' and ':' (what json.dumps writes, and what a tool call in an
# earlier turn renders as), never free whitespace a small model can loop on.
_COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True, slots=True)
class ChatOutputPlan:
    tools: tuple[Tool, ...]
    parse_tool_calls: bool  # tools given and tool_choice is not "none"
    max_calls: int | None  # 1 when parallel_tool_calls is false or a function is named
    grammar: GrammarSpec | None

    @property
    def tool_names(self) -> frozenset[str]:
        return frozenset(tool.name for tool in self.tools)


def chat_output_plan(body: ChatCompletionRequest) -> ChatOutputPlan:
    """The plan for one chat request; RequestFieldError names the field that is wrong."""
    tools = check_tools(body.tools)
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    answer = response_format_grammar(body.response_format)
    many = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        tool = _named_tool(choice, tools)
        grammar = _checked(
            GrammarSpec(kind="lark", text=tool_call_grammar([tool], many=False)), "tool_choice"
        )
        return ChatOutputPlan(tools, True, 1, grammar)
    if choice not in _TOOL_CHOICES:
        raise RequestFieldError(
            f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}",
            "tool_choice",
        )
    if choice == "none" or not tools:
        if choice == "required":
            raise RequestFieldError("tool_choice 'required' needs tools", "tool_choice")
        return ChatOutputPlan(tools, False, None, answer)
    max_calls = None if many else 1
    if choice == "required":
        _check_tool_schemas(tools)
        grammar = GrammarSpec(kind="lark", text=tool_call_grammar(tools, many=many))
        return ChatOutputPlan(tools, True, max_calls, _checked(grammar, "tools"))
    if answer is None:
        return ChatOutputPlan(tools, True, max_calls, None)
    _check_tool_schemas(tools)
    either = GrammarSpec(kind="lark", text=tool_call_grammar(tools, many=many, answer=_answer_schema(answer)))
    return ChatOutputPlan(tools, True, max_calls, _checked(either, "response_format"))


def response_format_grammar(response_format: ResponseFormat | None) -> GrammarSpec | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return GrammarSpec(kind="json_object")
    if response_format.type != "json_schema":
        raise RequestFieldError(
            "response_format type must be 'text', 'json_object' or 'json_schema', "
            f"got {response_format.type!r}",
            "response_format.type",
        )
    spec = response_format.json_schema
    if spec is None:
        raise RequestFieldError(
            "response_format json_schema needs its json_schema", "response_format.json_schema"
        )
    if spec.schema is None:
        raise RequestFieldError(
            "response_format json_schema needs a schema", "response_format.json_schema.schema"
        )
    grammar = GrammarSpec(kind="json_schema", text=json.dumps(closed_schema(spec.schema), ensure_ascii=False))
    return _checked(grammar, "response_format.json_schema.schema")


def tool_call_grammar(tools: Sequence[Tool], *, many: bool, answer: dict[str, Any] | None = None) -> str:
    """A Lark grammar for one or more tool calls, or (with answer) a call or that JSON answer."""
    schemas = [_call_schema(tool) for tool in tools]
    call_json = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    lines = [
        "start: calls" if answer is None else "start: calls | answer",
        'calls: call ("\\n" call)*' if many else "calls: call",
        f"call: {json.dumps(TOOL_CALL_OPEN + chr(10))} call_json {json.dumps(chr(10) + TOOL_CALL_CLOSE)}",
        f"call_json: %json {_json_text({**call_json, 'x-guidance': _COMPACT_JSON})}",
    ]
    if answer is not None:
        lines.append(f"answer: %json {_json_text(answer)}")
    return "\n".join(lines) + "\n"


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": closed_schema(tool.parameters)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf")
_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed_schema(schema: Any) -> Any:
    """The schema with every object that lists properties closed to other keys, unless it says
    otherwise (additionalProperties and friends), as xgrammar's strict mode does.

    JSON schema lets an object hold any extra key by default; a small model under such a
    grammar invents keys until max_tokens. allOf branches stay as they are: closing each
    would make their intersection unsatisfiable.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_schema(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = closed_schema(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(sub) for sub in out[key]]
    if "properties" in out and "allOf" not in out and not any(key in out for key in _OPEN_KEYS):
        out["additionalProperties"] = False
    return out


def _answer_schema(answer: GrammarSpec) -> dict[str, Any]:
    schema = json.loads(answer.text) if answer.kind == "json_schema" else {"type": "object"}
    return {"x-guidance": _COMPACT_JSON, **schema}


def _json_text(value: Any) -> str:
    # Lark reads the %json block as JSON; "//" or "#" inside strings are safe there, and
    # non-ASCII stays escaped so the grammar text is plain ASCII.
    return json.dumps(value)


def _named_tool(choice: NamedToolChoice, tools: tuple[Tool, ...]) -> Tool:
    if choice.type != "function":
        raise RequestFieldError(
            f"tool_choice type must be 'function', got {choice.type!r}", "tool_choice.type"
        )
    tool = next((t for t in tools if t.name == choice.function.name), None)
    if tool is None:
        known = ", ".join(repr(t.name) for t in tools) or "none"
        raise RequestFieldError(
            f"tool_choice names the function {choice.function.name!r}, which is not among the tools "
            f"(tools: {known})",
            "tool_choice.function.name",
        )
    _check_tool_schemas([tool], tools)
    return tool


def _check_tool_schemas(tools: Sequence[Tool], all_tools: Sequence[Tool] | None = None) -> None:
    """Each forced tool's parameters compile: a bad one is named by its index in `tools`."""
    order = list(all_tools if all_tools is not None else tools)
    for tool in tools:
        problem = _problem("json_schema", json.dumps(tool.parameters))
        if problem is not None:
            i = order.index(tool)
            raise RequestFieldError(
                f"tools[{i}].function.parameters is not a usable JSON schema: {problem}",
                f"tools[{i}].function.parameters",
            )


def _checked(grammar: GrammarSpec, param: str) -> GrammarSpec:
    problem = _problem(grammar.kind, grammar.text)
    if problem is not None:
        what = "JSON schema" if grammar.kind == "json_schema" else "grammar"
        raise RequestFieldError(f"invalid {what}: {problem}", param)
    return grammar


@functools.lru_cache(maxsize=512)  # agents send the same tools and schemas turn after turn
def _problem(kind: str, text: str) -> str | None:
    """llguidance's objection to a grammar (checked without a tokenizer), or None."""
    import llguidance

    matcher = llguidance.LLMatcher
    if kind == "lark":
        source = matcher.grammar_from_lark(text)
    else:
        try:
            schema = json.loads(text) if kind == "json_schema" else {"type": "object"}
            source = matcher.grammar_from_json_schema(schema, defaults=_COMPACT_JSON)
        except (ValueError, TypeError) as err:
            return str(err)
    message = matcher.validate_grammar(source)
    return message.strip() or None
