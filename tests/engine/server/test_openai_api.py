"""The official openai SDK against a real replica of the embedded model."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from openai import OpenAI

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smol_replica) -> OpenAI:
    return OpenAI(base_url=smol_replica.url + "/v1", api_key="x", max_retries=0, timeout=60)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


def sse_events(url: str, body: dict[str, Any]) -> list[Any]:
    """The raw SSE stream: each data payload decoded, '[DONE]' kept as the string."""
    events: list[Any] = []
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_models(client: OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_greedy_answer_and_exact_usage(client: OpenAI, smol_tokenizer: Any) -> None:
    response = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=16, temperature=0)
    choice = response.choices[0]
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    usage = response.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens == len(chat_ids(smol_tokenizer, FRANCE))
    # The answer's tokens plus the end-of-turn token that stopped it.
    answer = smol_tokenizer(choice.message.content, add_special_tokens=False)["input_ids"]
    assert usage.completion_tokens == len(answer) + 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert isinstance(usage.prompt_tokens_details.cached_tokens, int)


def test_chat_stream_order_and_usage(smol_replica, client: OpenAI, smol_tokenizer: Any) -> None:
    body = {
        "model": MODEL,
        "messages": FRANCE,
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(smol_replica.url + "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] is not None
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "stop"
    content = chunks[1:-2]
    assert content and all(c["choices"][0]["finish_reason"] is None for c in content)
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert text == "The capital of France is Paris."
    usage = usage_chunk["usage"]
    assert usage["prompt_tokens"] == len(chat_ids(smol_tokenizer, FRANCE))
    assert usage["completion_tokens"] == len(smol_tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
    assert "cached_tokens" in usage["prompt_tokens_details"]

    # The SDK reads the same stream.
    stream = client.chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    sdk_chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in sdk_chunks if c.choices) == text
    assert sdk_chunks[-1].usage is not None and sdk_chunks[-1].usage.total_tokens == usage["total_tokens"]


def test_completion_stream_and_not(client: OpenAI, smol_tokenizer: Any) -> None:
    prompt = "The three primary colors are"
    options = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**options)  # type: ignore[call-overload]
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(smol_tokenizer(prompt)["input_ids"])
    assert whole.usage.completion_tokens == 6
    stream = client.completions.create(**options, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n2_and_seed_reproducibility(client: OpenAI) -> None:
    def sample() -> tuple[list[str], Any]:
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a word."}],
            n=2,
            seed=1234,
            temperature=1.0,
            max_tokens=8,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in response.choices] == [0, 1]
        return [c.message.content or "" for c in response.choices], response.usage

    first, usage = sample()
    second, _ = sample()
    assert first == second
    assert usage.completion_tokens == 16

    stream = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        n=2,
        seed=7,
        max_tokens=4,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    again = client.completions.create(
        model=MODEL, prompt="Once upon a time", n=2, seed=7, max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert texts == [c.text for c in again.choices]


def test_logprobs(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 4
    assert "".join(entry.token for entry in content) == response.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
        assert entry.bytes == list(entry.token.encode())

    completion = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 3
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert all(len(top) == 2 for top in logprobs.top_logprobs)


def test_shared_system_prompt_is_cached(client: OpenAI, smol_tokenizer: Any) -> None:
    system = {
        "role": "system",
        "content": " ".join(f"Rule {i}: answer politely and cite source number {i * 7}." for i in range(20)),
    }
    system_tokens = len(
        smol_tokenizer.apply_chat_template(
            [system], add_generation_prompt=False, tokenize=True, return_dict=True
        )["input_ids"]
    )
    assert system_tokens > 150
    full_blocks = system_tokens // 16 * 16

    def ask(question: str, salt: str | None = None) -> Any:
        extra = {"ignore_eos": True} | ({"cache_salt": salt} if salt else {})
        messages = [system, {"role": "user", "content": question}]
        return client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=2, temperature=0, extra_body=extra
        ).usage

    ask("What is rule 3?")
    second = ask("What is rule 4?")
    assert second.prompt_tokens_details.cached_tokens >= full_blocks
    assert second.prompt_tokens_details.cached_tokens < second.prompt_tokens
    # Another tenant's salt changes every block hash: nothing is shared.
    assert ask("What is rule 4?", salt="tenant-b").prompt_tokens_details.cached_tokens == 0


def test_stop_and_max_completion_tokens(client: OpenAI) -> None:
    stopped = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=16, temperature=0, stop=[" Paris"]
    )
    assert stopped.choices[0].message.content == "The capital of France is"
    assert stopped.choices[0].finish_reason == "stop"
    capped = client.chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        max_completion_tokens=3,
        temperature=0,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        user="someone",
        extra_body={
            "ignore_eos": True,
            "top_k": 20,
            "min_p": 0.05,
            "an_unknown_field": {"x": 1},
            "tools": [],
        },
    )
    assert capped.usage.completion_tokens == 3
    assert capped.choices[0].finish_reason == "length"


def test_operations_endpoints(smol_replica) -> None:
    assert smol_replica.get("/health") == {"status": "ready", "model": MODEL}
    load = smol_replica.get("/load")
    assert load["engine"]["num_blocks"] == 64
    assert {"running", "waiting", "free_blocks", "used_blocks", "cached_blocks"} <= set(load["engine"])
    metrics = httpx.get(smol_replica.url + "/metrics").text
    for name in (
        "prefixgate_http_requests_total",
        "prefixgate_request_finished_total",
        "prefixgate_time_to_first_token_seconds_bucket",
        "prefixgate_time_per_output_token_seconds_bucket",
        "prefixgate_inter_token_latency_seconds_bucket",
        "prefixgate_e2e_request_latency_seconds_bucket",
        "prefixgate_request_queue_time_seconds_bucket",
        "prefixgate_prefix_cache_queries_tokens_total",
        "prefixgate_prefix_cache_hits_tokens_total",
        "prefixgate_kv_cache_usage_ratio",
        "prefixgate_preemptions_total",
    ):
        assert name in metrics, name
    hits = next(
        line for line in metrics.splitlines() if line.startswith("prefixgate_prefix_cache_hits_tokens_total")
    )
    assert float(hits.split()[-1]) > 0  # the shared system prompt test hit the cache
