"""LangChain against a real gateway and replica: the official langchain-openai ChatOpenAI
pointed at it, and prefixgate's ChatPrefixgate with its defaults."""

from __future__ import annotations

import uuid
from functools import reduce

import pytest
from langchain_core.messages import AIMessageChunk, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from prefixgate.langchain import ChatPrefixgate

pytestmark = pytest.mark.slow

FRANCE = "What is the capital of France?"


def _joined(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    return reduce(lambda a, b: a + b, chunks)


def _context() -> list[SystemMessage | HumanMessage]:
    tag = uuid.uuid4().hex
    notes = " ".join(f"Note {i}: parcel {tag[i % 32]}{i} leaves from dock {i % 5}." for i in range(24))
    return [
        SystemMessage(f"You are a dispatcher ({tag}). Be brief.\n{notes}"),
        HumanMessage("Where is parcel 7?"),
    ]


@pytest.fixture(scope="module")
def chat_openai(gateway_url: str) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=gateway_url + "/v1",
        api_key="none",
        model="default",
        temperature=0,
        max_tokens=12,
        max_retries=0,
    )


def test_chat_openai_invoke_stream_and_batch(chat_openai: ChatOpenAI) -> None:
    reply = chat_openai.invoke(FRANCE)
    assert str(reply.content).startswith("The capital of France is Paris")
    usage = reply.usage_metadata
    assert usage is not None and usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert "cache_read" in usage.get("input_token_details", {})

    # langchain-openai asks for no usage while streaming unless stream_usage is on.
    chunks = list(chat_openai.stream(FRANCE))
    assert len(chunks) > 2 and _joined(chunks).content == reply.content
    assert _joined(chunks).usage_metadata is None
    counted = _joined(list(chat_openai.stream(FRANCE, stream_usage=True)))
    assert counted.content == reply.content and counted.usage_metadata is not None
    assert counted.usage_metadata["input_tokens"] == usage["input_tokens"]
    assert counted.usage_metadata["output_tokens"] == usage["output_tokens"]

    questions = [FRANCE, "What is the capital of Italy?", "Name a colour."]
    answers = chat_openai.batch(questions)
    assert answers[0].content == reply.content
    assert [a.content for a in answers[1:]] == [chat_openai.invoke(q).content for q in questions[1:]]


def test_chat_prefixgate_reports_cache_reads(gateway_url: str) -> None:
    model = ChatPrefixgate(base_url=gateway_url + "/v1", temperature=0, max_tokens=8, session_id="lc-test")
    messages = _context()
    first = model.invoke(messages)
    again = model.invoke(messages)
    for reply in (first, again):
        assert reply.usage_metadata is not None
    prompt = again.usage_metadata["input_tokens"]  # type: ignore[index]
    assert prompt > 300 and first.usage_metadata["input_token_details"]["cache_read"] < 32  # type: ignore[index]
    assert again.usage_metadata["input_token_details"]["cache_read"] >= 0.8 * prompt  # type: ignore[index]
    assert again.content == first.content
    # Usage is streamed by default, cache reads included.
    streamed = _joined(list(model.stream(messages)))
    assert streamed.content == first.content and streamed.usage_metadata is not None
    assert streamed.usage_metadata["input_token_details"]["cache_read"] >= 0.8 * prompt


def test_chat_prefixgate_cache_salt_separates_tenants(gateway_url: str) -> None:
    messages = _context()
    tenant_a = ChatPrefixgate(base_url=gateway_url, temperature=0, max_tokens=2, cache_salt="tenant-a")
    tenant_b = ChatPrefixgate(
        base_url=gateway_url + "/v1", temperature=0, max_tokens=2, cache_salt="tenant-b"
    )

    def cache_read(model: ChatPrefixgate) -> int:
        return model.invoke(messages).usage_metadata["input_token_details"]["cache_read"]  # type: ignore[index]

    assert cache_read(tenant_a) < 32
    assert cache_read(tenant_b) < 32  # the same prompt under another salt shares nothing
    assert cache_read(tenant_a) > 300


class Capital(BaseModel):
    """A country and its capital city."""

    country: str
    capital: str


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"Sunny, 24 C in {city}"


def test_bind_tools_round_trip(gateway_url: str) -> None:
    model = ChatPrefixgate(base_url=gateway_url, temperature=0, max_tokens=40, session_id="lc-tools")
    with_tools = model.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False)
    messages: list[BaseMessage] = [*_context()[:1], HumanMessage("What is the weather in Lyon?")]
    asked = with_tools.invoke(messages)
    [call] = asked.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    messages += [asked, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    answer = model.invoke(messages)
    assert isinstance(answer.content, str) and not answer.tool_calls
    usage = answer.usage_metadata
    assert usage is not None and usage["input_token_details"]["cache_read"] >= 0.8 * usage["input_tokens"]


def test_with_structured_output(gateway_url: str) -> None:
    model = ChatOpenAI(
        base_url=gateway_url + "/v1",
        api_key="none",
        model="default",
        temperature=0,
        max_tokens=48,
        max_retries=0,
    )
    question = "What is the capital of France? Give the country and its capital."
    for method in ("json_schema", "function_calling"):
        answer = model.with_structured_output(Capital, method=method).invoke(question)
        assert isinstance(answer, Capital), (method, answer)
        assert answer.country and answer.capital
    raw = model.with_structured_output(Capital, include_raw=True).invoke(question)
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], Capital)  # type: ignore[index]
