"""Tools and structured output through the gateway, which renders the prompt, plans the
grammar and parses the calls itself: every answer must equal the replica's own for the same
request (greedy), streamed or not, errors included; and JSON schema answers through it
validate on 20 random prompts (sampled, all in flight at once)."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY},
    },
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
WEATHER_ONLY = TOOLS[:1]
SCHEMAS = {"get_weather": CITY, "add": ADD}
QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]
PROFILE = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Rome", "Tokyo", "Lima", "Oslo"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
}


def few_shot(question: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You answer weather questions by calling get_weather."}
    ]
    for i, city in enumerate(["London", "Tokyo", "Rome"]):
        arguments = json.dumps({"city": city})
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": arguments},
        }
        messages += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": json.dumps({"temperature": 20 + i})},
            {"role": "assistant", "content": f"It is {20 + i} degrees in {city}."},
        ]
    return [*messages, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def pair(procs, engine_cmd, gateway_cmd):
    replica = procs(*engine_cmd).wait_ready()
    gateway = procs(gateway_cmd([replica])).wait_ready(60)
    clients = {
        name: openai.OpenAI(base_url=p.url + "/v1", api_key="none", max_retries=0)
        for name, p in (("gateway", gateway), ("replica", replica))
    }
    yield {**clients, "gateway_url": gateway.url}
    gateway.stop()
    replica.stop()


def _answer(client: openai.OpenAI, **request: Any) -> tuple[str | None, list[tuple[str, str]], str | None]:
    choice = client.chat.completions.create(model="default", temperature=0, **request).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    return choice.message.content, calls, choice.finish_reason


def _streamed(client: openai.OpenAI, **request: Any) -> tuple[str | None, list[tuple[str, str]], str | None]:
    content, calls, finish = [], {}, None
    for chunk in client.chat.completions.create(model="default", temperature=0, stream=True, **request):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        content.append(choice.delta.content or "")
        for call in choice.delta.tool_calls or []:
            if call.id is not None:
                assert call.type == "function" and call.function.arguments == ""
                calls[call.index] = [call.function.name, ""]
            else:
                calls[call.index][1] += call.function.arguments
    return "".join(content) or None, [(n, a) for n, a in calls.values()], finish


def test_tool_answers_through_the_gateway_equal_the_replicas(pair) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    requests = [
        {"messages": QUESTION, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
        {"messages": QUESTION, "tools": TOOLS, "tool_choice": named},
        {"messages": few_shot("What is the weather in Paris?"), "tools": WEATHER_ONLY},
    ]
    for request in requests:
        via_gateway = _answer(pair["gateway"], max_tokens=60, **request)
        assert via_gateway == _answer(pair["replica"], max_tokens=60, **request)
        assert via_gateway[1] and via_gateway[2] == "tool_calls"
        assert _streamed(pair["gateway"], max_tokens=60, **request) == via_gateway
    # the round trip: the call from the last request, its result, then the answer
    messages = few_shot("What is the weather in Paris?")
    _, [(name, arguments)], _ = via_gateway
    call = {"id": "call_x", "type": "function", "function": {"name": name, "arguments": arguments}}
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_x", "content": json.dumps({"temperature": 25})},
    ]
    answer = _answer(pair["gateway"], messages=messages, tools=WEATHER_ONLY, max_tokens=30)
    assert answer == _answer(pair["replica"], messages=messages, tools=WEATHER_ONLY, max_tokens=30)
    assert answer[1] == [] and answer[2] == "stop" and "25" in answer[0]


def test_json_schema_through_the_gateway_equals_the_replicas(pair) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"],
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    for prompt in ("Describe Ana, a 31-year-old pilot.", "Invent a person."):
        request = {"messages": [{"role": "user", "content": prompt}], "response_format": response_format}
        content, _, finish = _answer(pair["gateway"], max_tokens=80, **request)
        assert (content, finish) == _answer(pair["replica"], max_tokens=80, **request)[::2]
        jsonschema.validate(json.loads(content), schema)
        assert finish == "stop"


def test_the_gateway_refuses_bad_tools_as_the_replica_does(pair) -> None:
    bad = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}}},
    }
    for fields in (
        {"tools": [bad], "tool_choice": "required"},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
    ):
        bodies = []
        for client in (pair["gateway"], pair["replica"]):
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model="default", messages=QUESTION, max_tokens=4, **fields)
            bodies.append(err.value.body)
        assert bodies[0] == bodies[1] and bodies[0]["param"], bodies


def test_json_schema_answers_validate_on_random_prompts(pair) -> None:
    rng = random.Random(20)
    names, jobs = (
        ["Ana", "Bo", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jun"],
        ["baker", "pilot", "nurse", "farmer", "coder"],
    )
    prompts = [
        f"Describe {rng.choice(names)}, a {rng.randint(18, 90)}-year-old {rng.choice(jobs)}, as JSON."
        for _ in range(20)
    ]
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "profile", "schema": PROFILE, "strict": True},
    }

    async def ask() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=pair["gateway_url"] + "/v1", api_key="none", max_retries=0)
        replies = [
            client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": prompt}],
                response_format=response_format,
                max_tokens=200,
                temperature=1.0,
                seed=i,
            )
            for i, prompt in enumerate(prompts)
        ]
        return list(await asyncio.gather(*replies))

    for reply in asyncio.run(ask()):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PROFILE)
