"""Tool calls and structured output at the API, without a server: parsing recorded outputs of
each format (malformed ones included), stream delta assembly, grammars checked by llguidance
against the real tokenizer, request validation, and the tool prompt on both tokenizers."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import llguidance
import msgspec
import pytest

from engine.server.openai_types import AssistantMessage, ChatCompletionRequest
from engine.server.response_format import chat_output_plan, closed_schema
from engine.server.tokenizer import TextTools, load_tokenizer
from engine.server.tool_calls import RequestFieldError, ToolDeltaStream, assistant_message
from engine.server.tool_prompt import render_call, template_inputs
from gateway.text import GatewayTokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
NAMES = frozenset({"get_weather", "add"})
PARIS = '{"city": "Paris"}'

# (model output, expected content, expected [(name, arguments)])
RECORDED: list[tuple[str, str | None, list[tuple[str, str]]]] = [
    # Hermes / Qwen 2.5
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        None,
        [("get_weather", PARIS)],
    ),
    (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n',
        "Let me check.",
        [("get_weather", PARIS)],
    ),
    (
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        None,
        [("add", '{"a": 1, "b": 2}'), ("get_weather", PARIS)],
    ),
    # arguments as a JSON string, compact JSON, no newlines inside the tags
    (
        '<tool_call>{"name":"get_weather","arguments":"{\\"city\\":\\"Paris\\"}"}</tool_call>',
        None,
        [("get_weather", PARIS)],
    ),
    # the answer ended before the closing tag (stop string, EOS)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [("get_weather", PARIS)]),
    # Llama 3.1 JSON, with and without <|python_tag|>, two calls separated by ';'
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", PARIS)]),
    (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", PARIS)],
    ),
    (
        '{"name": "add", "parameters": {"a": 1, "b": 2}}; '
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("add", '{"a": 1, "b": 2}'), ("get_weather", PARIS)],
    ),
    ('  {"name": "get_weather", "arguments": {"city": "Paris"}}\n', None, [("get_weather", PARIS)]),
    # malformed: all plain content, exactly as generated
    ("The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    ("  spaced out  \n", "  spaced out  \n", []),
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
        [],
    ),
    (
        '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>',
        [],
    ),
    (
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',
        [],
    ),
    ("<tool_call>not json</tool_call> then", "<tool_call>not json</tool_call> then", []),
    ('{"answer": 42}', '{"answer": 42}', []),
    (
        '{"name": "get_weather", "parameters": {"city": "Paris"}} and more',
        '{"name": "get_weather", "parameters": {"city": "Paris"}} and more',
        [],
    ),
    ("I use <tool_cal", "I use <tool_cal", []),
    ("<|python_tag", "<|python_tag", []),
    ("", "", []),
    # a broken block beside a good one: the good one is a call, the broken one stays content
    (
        "<tool_call>oops</tool_call>\n"
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        "<tool_call>oops</tool_call>",
        [("add", '{"a": 1, "b": 2}')],
    ),
]


def _calls(message: AssistantMessage) -> list[tuple[str, str]]:
    calls = message.tool_calls if isinstance(message.tool_calls, list) else []
    return [(c.function.name, c.function.arguments) for c in calls]


@pytest.mark.parametrize(("text", "content", "calls"), RECORDED)
def test_recorded_outputs_parse_into_content_and_calls(text: str, content: str | None, calls: list) -> None:
    message = assistant_message(text, NAMES, None)
    assert message.content == content
    assert _calls(message) == calls
    for call in message.tool_calls if calls else []:
        assert call.id.startswith("call_") and call.type == "function"
        json.loads(call.function.arguments)


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    text = RECORDED[2][0]
    assert _calls(assistant_message(text, NAMES, 1)) == [("add", '{"a": 1, "b": 2}')]


def _assemble(deltas: list[Any]) -> tuple[str | None, list[tuple[str, str]]]:
    content: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        if delta.content:
            content.append(delta.content)
        for call in delta.tool_calls or []:
            if call.id is not None:  # a call's first delta: id, type, name, arguments ""
                assert call.index not in calls and call.type == "function"
                assert call.function.name and call.function.arguments == ""
                calls[call.index] = {"name": call.function.name, "arguments": ""}
            else:
                assert call.function.name is None
                calls[call.index]["arguments"] += call.function.arguments
    joined = "".join(content)
    listed = [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    return (joined or None) if listed else joined, listed


@pytest.mark.parametrize(("text", "content", "calls"), RECORDED)
def test_streamed_deltas_reassemble_to_the_whole_message(text: str, content: str | None, calls: list) -> None:
    rng = random.Random(text)
    for split in range(6):
        stream = ToolDeltaStream(NAMES, None)
        deltas = []
        at = 0
        while at < len(text):  # one character at a time first, then random pieces
            size = 1 if split == 0 else rng.randint(1, 8)
            deltas += stream.feed(text[at : at + size])
            at += size
        deltas += stream.finish()
        assert _assemble(deltas) == (content, calls)
        assert stream.made_calls == bool(calls)


def test_content_before_a_call_streams_before_the_call_completes() -> None:
    stream = ToolDeltaStream(NAMES, None)
    first = stream.feed("Checking the weather. <tool_call>\n{")
    assert [d.content for d in first] == ["Checking the weather."]
    assert stream.feed('"name": "get_weather", "arguments": {}}') == []
    done = stream.feed("\n</tool_call>")
    assert (
        done[0].tool_calls[0].function.name == "get_weather"
        and done[1].tool_calls[0].function.arguments == "{}"
    )


# --- grammars -----------------------------------------------------------------------------


def _request(**fields: Any) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.json.decode(json.dumps(body), type=ChatCompletionRequest)


@pytest.fixture(scope="module")
def ll_tokenizer(smollm2_dir: Path) -> Any:
    return llguidance.LLTokenizer(str(smollm2_dir / "tokenizer.json"))


def _accepts(ll_tokenizer: Any, grammar: Any, text: str, hf: GatewayTokenizer) -> bool:
    source = llguidance.grammar_from("json_schema" if grammar.kind == "json_schema" else "lark", grammar.text)
    matcher = llguidance.LLMatcher(ll_tokenizer, source)
    assert not matcher.get_error()
    tokens = hf.encode(text, add_special_tokens=False)
    return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


def test_tool_choice_grammars_force_calls_matching_the_schemas(ll_tokenizer: Any, smollm2_dir: Path) -> None:
    hf = GatewayTokenizer(smollm2_dir)
    add = render_call("add", {"a": 1, "b": 2})
    weather = render_call("get_weather", {"city": "Paris", "unit": "celsius"})
    required = chat_output_plan(_request(tools=[WEATHER, ADD], tool_choice="required")).grammar
    assert required is not None and required.kind == "lark"
    assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", required.text)) == ""
    assert _accepts(ll_tokenizer, required, add, hf)
    assert _accepts(ll_tokenizer, required, f"{add}\n{weather}", hf)
    assert not _accepts(ll_tokenizer, required, "Sure! " + add, hf)
    assert not _accepts(ll_tokenizer, required, render_call("add", {"a": "one", "b": 2}), hf)
    assert not _accepts(ll_tokenizer, required, render_call("add", {"a": 1, "b": 2, "c": 3}), hf)  # closed
    single = chat_output_plan(
        _request(tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False)
    )
    assert single.max_calls == 1 and not _accepts(ll_tokenizer, single.grammar, f"{add}\n{weather}", hf)
    named = chat_output_plan(
        _request(tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}})
    )
    assert named.max_calls == 1 and _accepts(ll_tokenizer, named.grammar, add, hf)
    assert not _accepts(ll_tokenizer, named.grammar, weather, hf)
    either = chat_output_plan(_request(tools=[ADD], response_format={"type": "json_object"})).grammar
    assert _accepts(ll_tokenizer, either, add, hf) and _accepts(ll_tokenizer, either, '{"x": [1, 2]}', hf)
    assert not _accepts(ll_tokenizer, either, "plain words", hf)


def test_response_format_plans() -> None:
    assert chat_output_plan(_request(response_format={"type": "text"})).grammar is None
    assert chat_output_plan(_request(response_format={"type": "json_object"})).grammar.kind == "json_object"
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    grammar = chat_output_plan(_request(response_format=fmt)).grammar
    assert grammar.kind == "json_schema" and json.loads(grammar.text) == {
        **schema,
        "additionalProperties": False,
    }
    plan = chat_output_plan(_request(tools=[WEATHER], tool_choice="none", response_format=fmt))
    assert not plan.parse_tool_calls and plan.grammar == grammar
    plain = chat_output_plan(_request(tools=[WEATHER]))  # auto, no format: parse, no grammar
    assert plain.parse_tool_calls and plain.grammar is None and plain.max_calls is None


def test_closed_schema_closes_objects_that_do_not_say_otherwise() -> None:
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
            "meta": {"type": "object", "additionalProperties": {"type": "integer"}},
            "either": {"anyOf": [{"type": "object", "properties": {"a": {}}}, {"type": "null"}]},
        },
        "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"}}}},
    }
    closed = closed_schema(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["tags"]["items"]["additionalProperties"] is False
    assert closed["properties"]["meta"]["additionalProperties"] == {"type": "integer"}
    assert closed["properties"]["either"]["anyOf"][0]["additionalProperties"] is False
    assert closed["$defs"]["pt"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is left alone


BAD = [
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
        "tools[0].function.parameters",
    ),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
    ),
    (
        {
            "tools": [
                ADD,
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}},
                    },
                },
            ],
            "tool_choice": "required",
        },
        "tools[1].function.parameters",
    ),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format.json_schema.schema",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "format": "bogus"}},
            }
        },
        "response_format.json_schema.schema",
    ),
]


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_bad_tool_and_format_fields_name_the_param(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestFieldError) as err:
        chat_output_plan(_request(**fields))
    assert err.value.param == param


# --- the prompt ---------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}},
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "24 C"},
]


def test_hermes_rendering_when_the_template_ignores_tools(smollm2_dir: Path) -> None:
    body = _request(tools=[WEATHER, ADD])
    body.messages = _request(messages=CONVERSATION).messages
    tools = chat_output_plan(body).tools
    template = GatewayTokenizer(smollm2_dir).chat_template
    messages, template_tools = template_inputs(body.messages, tools, template)
    assert template_tools is None  # the SmolLM2 template never reads them: rendered here instead
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("You are a weather bot.\n\n# Tools")
    assert json.dumps(WEATHER) in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert messages[2]["content"] == render_call("get_weather", {"city": "Paris"}) + "\n" + render_call(
        "get_weather", {"city": "Rome"}
    )
    assert (
        messages[3]["content"]
        == "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n24 C\n</tool_response>"
    )
    no_system, _ = template_inputs(body.messages[1:2], tools, template)
    assert no_system[0]["role"] == "system" and no_system[0]["content"].startswith("# Tools")
    plain, _ = template_inputs(body.messages[1:2], (), template)
    assert plain == [{"role": "user", "content": "Weather in Paris and Rome?"}]


@pytest.fixture(scope="module")
def tools_template_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2 tokenizer with a chat template that renders tools and tool turns itself."""
    folder = tmp_path_factory.mktemp("tools-template")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, folder / name)
    (folder / "chat_template.jinja").write_text(
        "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}="
        "{{ t.function.parameters | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.name }} "
        "{{ c.function.arguments | tojson }}]{% endfor %}"
        "{% if m.tool_call_id %} for {{ m.tool_call_id }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return folder


@pytest.mark.parametrize("native", [False, True])
def test_gateway_and_replica_render_tools_to_the_same_ids(
    native: bool, smollm2_dir: Path, tools_template_dir: Path
) -> None:
    folder = tools_template_dir if native else smollm2_dir
    gateway, replica = GatewayTokenizer(folder), TextTools(load_tokenizer(folder))
    body = _request(messages=CONVERSATION, tools=[WEATHER, ADD])
    plan = chat_output_plan(body)
    ids = []
    for tokenizer in (gateway, replica):
        messages, tools = template_inputs(body.messages, plan.tools, tokenizer.chat_template)
        ids.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools))
    assert ids[0] == ids[1]
    text = gateway.tokenizer.decode(ids[0], skip_special_tokens=False)
    if native:
        assert (
            '[get_weather {"city": "Paris"}]' in text
            and " for call_2" in text
            and "Tools: get_weather=" in text
        )
    else:
        assert "<tool_response>\n24 C\n</tool_response>" in text
    # tool_choice does not change the prompt: the same prefix stays cached across choices
    for choice in ("none", "required", {"type": "function", "function": {"name": "add"}}):
        again = _request(messages=CONVERSATION, tools=[WEATHER, ADD], tool_choice=choice)
        messages, tools = template_inputs(
            again.messages, chat_output_plan(again).tools, gateway.chat_template
        )
        assert gateway.apply_chat_template(messages, tools=tools) == ids[0]
