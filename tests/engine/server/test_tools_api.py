"""Tool calls and structured output against a real replica of the embedded model, through the
official openai SDK: forced calls with valid arguments, a parsed `auto` call and a full tool
round trip, streamed tool-call deltas, 400s. (JSON schema answers over 20 random prompts run
through the gateway, tests/gateway/test_tools_gateway.py, on a replica with room for them all.)"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
ADD_PARAMETERS = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {"name": "add", "description": "Add two integers", "parameters": ADD_PARAMETERS},
    },
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "add": ADD_PARAMETERS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def few_shot(question: str) -> list[dict[str, Any]]:
    """Three earlier weather turns (call, result, answer), then the question: enough for the
    135M model to answer with a call under tool_choice "auto"."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You answer weather questions by calling get_weather."}
    ]
    for i, city in enumerate(["London", "Tokyo", "Rome"]):
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
        }
        messages += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": json.dumps({"temperature": 20 + i})},
            {"role": "assistant", "content": f"It is {20 + i} degrees in {city}."},
        ]
    return [*messages, {"role": "user", "content": question}]


WEATHER_ONLY = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"],
            },
        },
    }
]


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def _valid_calls(message: Any) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def _streamed(client: openai.OpenAI, **request: Any) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """(content, [(name, arguments)], finish_reason) joined from a stream, checking the deltas' shape."""
    content: list[str] = []
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **request):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        content.append(choice.delta.content or "")
        for call in choice.delta.tool_calls or []:
            if call.id is not None:  # first delta of a call: id, type, name, arguments ""
                assert call.index == len(calls) and call.type == "function" and call.function.arguments == ""
                calls[call.index] = [call.function.name, ""]
            else:
                calls[call.index][1] += call.function.arguments
    listed = [(name, arguments) for name, arguments in calls.values()]
    return "".join(content) or None, listed, finish


def test_forced_tool_calls_have_arguments_matching_the_schema(smol_replica) -> None:
    client = _client(smol_replica.url)
    named = {"type": "function", "function": {"name": "add"}}
    for choice, parallel in (("required", False), (named, True), ("required", True)):
        reply = client.chat.completions.create(
            model="default",
            messages=QUESTION,
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=parallel,
            max_tokens=60,
            temperature=0,
        )
        message, finish = reply.choices[0].message, reply.choices[0].finish_reason
        calls = _valid_calls(message)
        assert calls and finish == "tool_calls", (choice, message)
        if choice == named:
            assert [name for name, _ in calls] == ["add"]
        if not parallel or choice == named:
            assert len(calls) == 1 and message.content is None


def test_auto_call_then_a_full_tool_round_trip(smol_replica) -> None:
    client = _client(smol_replica.url)
    messages = few_shot("What is the weather in Paris?")
    first = client.chat.completions.create(
        model="default", messages=messages, tools=WEATHER_ONLY, max_tokens=60, temperature=0
    )
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.content is None
    (call,) = message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    messages.append(message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 25})})
    answer = client.chat.completions.create(
        model="default", messages=messages, tools=WEATHER_ONLY, max_tokens=30, temperature=0
    )
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert "25" in answer.choices[0].message.content
    # The whole conversation up to the call is a cached prefix of the round trip's prompt.
    assert answer.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 16 * 16 - 16


def test_streamed_tool_call_deltas_reassemble_to_the_whole_answer(smol_replica) -> None:
    client = _client(smol_replica.url)
    requests = [
        {
            "messages": QUESTION,
            "tools": TOOLS,
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_tokens": 60,
        },
        {"messages": few_shot("What is the weather in Oslo?"), "tools": WEATHER_ONLY, "max_tokens": 60},
        {"messages": QUESTION, "tools": TOOLS, "tool_choice": "none", "max_tokens": 8},
    ]
    for request in requests:
        whole = client.chat.completions.create(model="default", temperature=0, **request).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
        streamed = _streamed(client, model="default", temperature=0, **request)
        assert streamed == (whole.message.content, calls, whole.finish_reason)
    assert calls == [] and whole.finish_reason == "length"  # tool_choice none: text, no parsing


def test_bad_tools_and_formats_are_400s_naming_the_param(smol_replica) -> None:
    client = _client(smol_replica.url)
    bad_schema = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}}},
    }
    cases = [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOLS[0], bad_schema], "tool_choice": "required"}, "tools[1].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"tools": "get_weather"}, "tools"),
    ]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="default", messages=QUESTION, max_tokens=4, **fields)
        assert err.value.body["param"] == param, (fields, err.value.body)
    assert smol_replica.wait_idle()["integrity_error"] is None
