"""prefixgate.Client, AsyncClient and Session against a real gateway and replica of the
embedded model (tests/prefixgate/conftest.py), greedy unless a test says otherwise."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid

import pytest

from prefixgate import (
    AsyncClient,
    AsyncSession,
    BadRequestError,
    Client,
    NotFoundError,
    Session,
)

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
BLOCK = 16


def long_system_prompt(facts: int = 24) -> str:
    """A prompt no other test sends (so its first turn finds nothing cached)."""
    tag = uuid.uuid4().hex
    facts = " ".join(f"Fact {i}: item {tag[i % 32]}{i} is kept on shelf {i % 7}." for i in range(facts))
    return f"You are a careful store assistant ({tag}). Answer in one short sentence.\n{facts}"


@pytest.fixture(scope="module")
def client(gateway_url: str):
    with Client(gateway_url, max_retries=0) as made:
        yield made


def test_models_and_chat(client: Client) -> None:
    assert [m.id for m in client.models()] == ["SmolLM2-135M-Instruct"]
    reply = client.chat(FRANCE, max_tokens=12, temperature=0)
    assert reply.text.startswith("The capital of France is Paris")
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.message.role == "assistant"
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    again = client.chat(FRANCE, max_tokens=2, temperature=0)
    assert again.usage is not None
    assert again.usage.cached_tokens == (again.usage.prompt_tokens - 1) // BLOCK * BLOCK


def test_streaming_with_usage_matches_the_whole_answer(client: Client) -> None:
    whole = client.chat(FRANCE, max_tokens=12, temperature=0)
    chunks = list(client.chat_stream(FRANCE, max_tokens=12, temperature=0))
    assert "".join(c.text for c in chunks) == whole.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]
    assert usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    # Without include_usage, no chunk carries usage.
    bare = list(client.chat_stream(FRANCE, max_tokens=4, temperature=0, extra_body={"stream_options": None}))
    assert all(c.usage is None for c in bare) and "".join(c.text for c in bare)


def test_stop_n_seed_and_logprobs(client: Client) -> None:
    stopped = client.chat(FRANCE, max_tokens=12, temperature=0, stop=["Paris"])
    assert stopped.text == "The capital of France is "
    assert stopped.choices[0].finish_reason == "stop"
    sampled = client.chat(FRANCE, max_tokens=8, temperature=1.0, n=3, seed=1234)
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    assert sampled.usage is not None and sampled.usage.completion_tokens <= 3 * 8
    repeat = client.chat(FRANCE, max_tokens=8, temperature=1.0, n=3, seed=1234)
    assert [c.message.content for c in repeat.choices] == [c.message.content for c in sampled.choices]
    scored = client.chat(FRANCE, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    entries = scored.choices[0].logprobs.content  # type: ignore[union-attr]
    assert entries is not None and len(entries) == scored.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(e.token for e in entries) == scored.text
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_completions(client: Client) -> None:
    prompt = "The capital of France is"
    whole = client.complete(prompt, max_tokens=4, temperature=0, logprobs=2)
    assert whole.text and whole.usage is not None and whole.usage.completion_tokens == 4
    scored = whole.choices[0].logprobs
    assert scored is not None and "".join(scored.tokens) == whole.text
    assert all(len(top or {}) >= 1 for top in scored.top_logprobs or [])
    chunks = list(client.complete_stream(prompt, max_tokens=4, temperature=0))
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_bad_requests_raise_typed_errors(client: Client) -> None:
    with pytest.raises(BadRequestError) as err:
        client.chat(FRANCE, max_tokens=2, temperature=-1)
    assert err.value.status == 400 and err.value.param == "temperature"
    assert err.value.type == "invalid_request_error" and "temperature" in err.value.message
    with pytest.raises(BadRequestError) as err:
        client.chat([{"role": "wizard", "content": "hi"}], max_tokens=2)
    assert err.value.status == 400
    with pytest.raises(NotFoundError) as err:
        client.chat(FRANCE, model="no-such-model", max_tokens=2)
    assert err.value.status == 404 and err.value.code == "model_not_found"
    with pytest.raises(BadRequestError):  # raised when the stream is asked for, not at the first chunk
        client.chat_stream(FRANCE, max_tokens=100_000)
    with pytest.raises(TypeError):
        client.chat("hi")  # type: ignore[arg-type]


def test_session_reuses_the_conversation_prefix(client: Client) -> None:
    session = Session(client, system=long_system_prompt(), max_tokens=12, temperature=0)
    for question in ["Where is item 3?", "And item 9?", "Which shelf holds item 12?"]:
        reply = session.send(question)
        assert session.messages[-1] == {"role": "assistant", "content": reply.text}
    turns = session.turns
    assert turns[0].prompt_tokens > 300 and turns[0].cached_tokens < BLOCK * 2
    for before, turn in itertools.pairwise(turns):
        assert turn.cached_fraction >= 0.8, turns
        # Everything of the previous request (prompt and reply), whole blocks of it, is reused.
        assert turn.cached_tokens >= (before.prompt_tokens // BLOCK - 1) * BLOCK, turns
    assert len(session.messages) == 1 + 2 * len(turns)


def test_streamed_session_turns_match_whole_ones(client: Client) -> None:
    system = long_system_prompt()
    whole = Session(client, system=system, max_tokens=10, temperature=0)
    streamed = Session(client, system=system, max_tokens=10, temperature=0)
    for question in ["Where is item 5?", "And item 6?"]:
        whole.send(question)
        text = "".join(c.text for c in streamed.stream(question))
        assert text == whole.messages[-1]["content"]
    assert streamed.messages == whole.messages
    assert [t.prompt_tokens for t in streamed.turns] == [t.prompt_tokens for t in whole.turns]
    assert streamed.turns[1].cached_fraction >= 0.8 and streamed.session_id != whole.session_id


@pytest.mark.asyncio
async def test_async_client_and_session(gateway_url: str) -> None:
    async with AsyncClient(gateway_url, max_retries=0) as client:
        reply = await client.chat(FRANCE, max_tokens=12, temperature=0)
        assert reply.text.startswith("The capital of France is Paris")
        stream = await client.chat_stream(FRANCE, max_tokens=12, temperature=0)
        chunks = [chunk async for chunk in stream]
        assert "".join(c.text for c in chunks) == reply.text and chunks[-1].usage is not None
        completion = await client.complete("The capital of France is", max_tokens=3, temperature=0)
        assert completion.usage is not None and completion.usage.completion_tokens == 3
        texts = await asyncio.gather(*(client.chat(FRANCE, max_tokens=12, temperature=0) for _ in range(6)))
        assert {t.text for t in texts} == {reply.text}
        with pytest.raises(BadRequestError):
            await client.chat(FRANCE, max_tokens=2, top_p=7.0)
        session = AsyncSession(client, system=long_system_prompt(), max_tokens=8, temperature=0)
        await session.send("Where is item 1?")
        text = "".join([c.text async for c in session.stream("And item 2?")])
        await session.send("And item 4?")
        assert session.messages[-3]["content"] == text
        assert all(t.cached_fraction >= 0.8 for t in session.turns[1:]), session.turns


WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def test_session_tool_round_trip_whole_and_streamed(client: Client) -> None:
    system = long_system_prompt()
    whole = Session(
        client, system=system, tools=WEATHER_TOOLS, parallel_tool_calls=False, max_tokens=40, temperature=0
    )
    streamed = Session(
        client, system=system, tools=WEATHER_TOOLS, parallel_tool_calls=False, max_tokens=40, temperature=0
    )
    question = "What is the weather in Paris?"
    whole.send(question, tool_choice="required")
    chunks = list(streamed.stream(question, tool_choice="required"))
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    for session in (whole, streamed):
        [call] = session.pending_tool_calls
        assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
        assert session.turns[0].finish_reason == "tool_calls"
        session.add_tool_result(call.id, "Sunny, 24 C", name="get_weather")
        session.send(max_tokens=12)
        assert session.pending_tool_calls == []
        assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "tool", "assistant"]
        assert session.turns[1].cached_fraction >= 0.8, session.turns
    # The streamed reply was put back together into the same message as the whole one.
    strip_ids = [
        {**m, "tool_calls": [{**c, "id": ""} for c in m["tool_calls"]]} if m.get("tool_calls") else m
        for m in streamed.messages[:3]
    ]
    assert strip_ids == [
        {**m, "tool_calls": [{**c, "id": ""} for c in m["tool_calls"]]} if m.get("tool_calls") else m
        for m in whole.messages[:3]
    ]
