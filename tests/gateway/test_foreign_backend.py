"""The gateway in front of OpenAI-compatible backends that publish no KV events.

The backends here are small aiohttp servers in this process that speak the part of the
OpenAI API a foreign backend offers (GET /v1/models, streamed POST /v1/completions with a
token-id prompt), standing in for vLLM or SGLang without event export. Each keeps the
prompts it saw, so the test knows where every request went and what the gateway sent;
the gateway is the real one, in its own process, with the embedded model's tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from aiohttp import web

from gateway.text import GatewayTokenizer

MODEL = "fake-model"


@dataclass
class FakeBackend:
    """An OpenAI-compatible server without KV events; 'caches' every prompt it has seen."""

    name: str
    port: int = 0
    prompts: list[list[int]] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cached_tokens(self, prompt: list[int]) -> int:
        best = 0
        for seen in self.prompts:
            common = 0
            for a, b in zip(seen, prompt, strict=False):
                if a != b:
                    break
                common += 1
            best = max(best, common)
        return best

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body["prompt"]
        assert isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
        cached = self.cached_tokens(prompt)
        self.prompts.append(prompt)
        self.bodies.append(body)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        words = ["reply", " from", f" {self.name}"]
        for n in range(body.get("n", 1)):
            for word in words:
                await asyncio.sleep(0.05)  # long enough that concurrent requests overlap
                chunk = {"object": "text_completion", "choices": [{"index": n, "text": word}]}
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            done = {"choices": [{"index": n, "text": "", "finish_reason": "stop"}]}
            await response.write(b"data: " + json.dumps(done).encode() + b"\n\n")
        usage = {
            "choices": [],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(words) * body.get("n", 1),
                "total_tokens": len(prompt) + len(words) * body.get("n", 1),
                "prompt_tokens_details": {"cached_tokens": cached},
            },
        }
        await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response


def _serve(backends: list[FakeBackend]) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def start() -> None:
        for backend in backends:
            app = web.Application()
            app.router.add_get("/v1/models", backend.models)
            app.router.add_post("/v1/completions", backend.completions)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            backend.port = runner.addresses[0][1]
        started.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    return loop, thread


@pytest.fixture(scope="module")
def foreign(procs, gateway_cmd, smollm2_dir: Path) -> Iterator[tuple[list[FakeBackend], str]]:
    backends = [FakeBackend("alpha"), FakeBackend("beta")]
    loop, _ = _serve(backends)
    args = ["gateway", "--log-level", "warning", "--tokenizer", str(smollm2_dir)]
    for backend in backends:
        args += ["--foreign-replica", backend.url]
    gateway = procs(args).wait_ready(60)
    assert [m["id"] for m in gateway.get("/v1/models")["data"]] == [MODEL]
    yield backends, gateway.url
    loop.call_soon_threadsafe(loop.stop)


def _agent_prompt(agent: int) -> str:
    rng = random.Random(agent)
    words = ["tool", "schema", "call", "result", "retrieve", "document", "policy", "answer", "plan"]
    return f"You are agent {agent}.\n" + " ".join(rng.choice(words) for _ in range(500))


def _owner(backends: list[FakeBackend], before: dict[str, int]) -> str:
    grown = [b.name for b in backends if len(b.prompts) > before[b.name]]
    assert len(grown) == 1, grown
    return grown[0]


def test_foreign_backends_get_token_prompts_and_agents_stick(foreign, smollm2_dir: Path) -> None:
    backends, url = foreign
    by_name = {b.name: b for b in backends}
    tokenizer = GatewayTokenizer(smollm2_dir)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    agents = 6

    async def turn(messages: list[dict], stream: bool) -> tuple[str, str, int]:
        if stream:
            chunks = await client.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
            text, cached = "", -1
            async for chunk in chunks:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage is not None:
                    cached = chunk.usage.prompt_tokens_details.cached_tokens
            return text, text.rsplit(" ", 1)[-1], cached
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=8
        )
        completion = raw.parse()
        text = completion.choices[0].message.content or ""
        replica = raw.headers["x-prefixgate-replica"]
        assert replica == next(b.url for b in backends if b.name == text.rsplit(" ", 1)[-1])
        return text, text.rsplit(" ", 1)[-1], completion.usage.prompt_tokens_details.cached_tokens

    async def run() -> None:
        conversations = [[{"role": "system", "content": _agent_prompt(a)}] for a in range(agents)]
        owners: dict[int, str] = {}
        for round_ in range(3):
            for a in range(agents):
                conversations[a].append({"role": "user", "content": f"Step {round_} of agent {a}: go on."})
            # Concurrent, so that in-flight load differs between the backends as they choose.
            results = await asyncio.gather(
                *(turn(conversations[a], stream=(a + round_) % 2 == 0) for a in range(agents))
            )
            for a, (text, name, cached) in enumerate(results):
                assert text == f"reply from {name}"
                conversations[a].append({"role": "assistant", "content": text})
                if round_ == 0:
                    owners[a] = name
                    continue
                # Later turns go where the conversation went before, and that backend's own
                # cache (its usage) reports the earlier turn's prompt as cached.
                assert name == owners[a], (a, round_, owners)
                assert cached > 500
            if round_ == 0:
                assert set(owners.values()) == {"alpha", "beta"}, owners  # spread by load

        # What the gateway sent is the chat template's token ids, with the stream asked for.
        last = conversations[0][:-1]
        expected = tokenizer.apply_chat_template(last, add_generation_prompt=True)
        assert expected in by_name[owners[0]].prompts
        body = by_name[owners[0]].bodies[-1]
        assert body["model"] == MODEL and body["stream"] is True and body["max_tokens"] == 8

    asyncio.run(run())


def test_foreign_sessions_stick_without_shared_prefixes(foreign) -> None:
    _, url = foreign
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    sessions = [f"session-{i}" for i in range(4)]

    async def ask(session: str, i: int) -> str:
        completion = await client.completions.create(
            model=MODEL,
            prompt=f"{random.Random(f'{session}{i}').random()} unrelated question {i}",
            max_tokens=4,
            extra_headers={"x-session-id": session},
        )
        return completion.choices[0].text.rsplit(" ", 1)[-1]

    async def run() -> None:
        homes: dict[str, str] = {}
        for i in range(4):
            names = await asyncio.gather(*(ask(s, i) for s in sessions))
            for session, name in zip(sessions, names, strict=True):
                homes.setdefault(session, name)
                assert name == homes[session], (session, i, homes)
        assert set(homes.values()) == {"alpha", "beta"}, homes

    asyncio.run(run())


def test_foreign_backend_rejects_logprobs_and_passes_stop(foreign) -> None:
    backends, url = foreign
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, logprobs=2)
    assert err.value.body["param"] == "logprobs"
    client.completions.create(model=MODEL, prompt="hello there", max_tokens=4, stop=["END"], seed=7)
    sent = [b.bodies[-1] for b in backends if b.bodies and b.bodies[-1].get("stop") == ["END"]]
    assert len(sent) == 1 and sent[0]["seed"] == 7, [b.bodies[-1:] for b in backends]

    # A JSON schema reaches the backend as response_format; a forced tool call cannot.
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Where? schema test"}],
        max_tokens=4,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    formats = [b.bodies[-1].get("response_format") for b in backends if b.bodies]
    sent_format = next(f for f in formats if f is not None and f["type"] == "json_schema")
    assert sent_format["json_schema"]["schema"]["required"] == ["city"]
    tool = {"type": "function", "function": {"name": "lookup", "parameters": schema}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Where?"}],
            max_tokens=4,
            tools=[tool],
            tool_choice="required",
        )
    assert err.value.body["param"] == "tool_choice"


def test_admin_adds_and_removes_backends_at_run_time(procs, smollm2_dir: Path) -> None:
    backends = [FakeBackend("gamma"), FakeBackend("delta")]
    loop, _ = _serve(backends)
    gamma, delta = backends
    args = ["gateway", "--log-level", "warning", "--tokenizer", str(smollm2_dir)]
    gateway = procs([*args, "--foreign-replica", gamma.url]).wait_ready(60)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)

    def admin(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(gateway.url + path, data=data, method=method)
        request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def served_by() -> str:
        return client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text.split()[-1]

    try:
        assert served_by() == "gamma"
        status, body = admin("POST", "/admin/replicas", {"url": delta.url, "foreign": True})
        assert status == 201 and body["url"] == delta.url
        deadline = time.monotonic() + 20
        while {r["url"]: r["status"] for r in admin("GET", "/admin/replicas")[1]["replicas"]}.get(
            delta.url
        ) != "healthy":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        status, body = admin("DELETE", f"/admin/replicas?url={gamma.url}")
        assert status == 200 and body["removed"] is True
        assert [r["url"] for r in admin("GET", "/admin/replicas")[1]["replicas"]] == [delta.url]
        assert {served_by() for _ in range(3)} == {"delta"}
        status, body = admin("POST", "/admin/replicas", {"url": "ftp://nowhere"})
        assert status == 400 and body["error"]["param"] == "url"
        status, body = admin("POST", "/admin/replicas", {"address": delta.url})
        assert status == 400 and "error" in body
    finally:
        loop.call_soon_threadsafe(loop.stop)
