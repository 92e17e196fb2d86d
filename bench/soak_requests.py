"""The soak's request mix (bench/soak.py): what each kind sends and how its answer is judged.

Every kind is one coroutine over an aiohttp session that returns an Outcome: the HTTP status
(or what the client did: "aborted" mid-stream, "disconnected" before the first token) and,
for a 200, what is wrong with the answer, if anything. Content comes from a per-request
random.Random, so a seed replays the same run.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

_WORDS = (
    "agent tool schema call result retrieve document policy answer summary context plan step",
    "observe report query search index table filter rank score source cite verify check update",
    "memory state goal task user system assistant function argument value return error retry",
    "river mountain paris london number seven blue green quickly slowly because therefore",
)
_WORDS = tuple(" ".join(_WORDS).split())
_QUESTIONS = (
    "What is the capital of France?",
    "Name one colour of the sky.",
    "Count from one to five.",
    "Say hello in one word.",
    "What is two plus two?",
    "Give one reason to plan ahead.",
)
_STOPS = (".", "\n", " the", ",", " is", "!")
_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class Targets:
    gateway: str  # base URL, no trailing slash
    replicas: tuple[str, ...]
    model: str


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    status: str  # "200", "400", ..., "aborted", "disconnected", "timeout", "client-error:<type>"
    problem: str | None = None  # what is wrong with a 200 answer
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Context:
    session: aiohttp.ClientSession
    targets: Targets
    shared_prompts: tuple[str, ...]  # system prompts / documents many requests start with
    rng: random.Random
    index: int


def shared_prompts(seed: int, count: int = 8, words: int = 40) -> tuple[str, ...]:
    rng = random.Random(seed)
    return tuple(
        f"You are assistant {i}. Notes: " + " ".join(rng.choice(_WORDS) for _ in range(words))
        for i in range(count)
    )


def _unique_text(ctx: Context, words: int) -> str:
    body = " ".join(ctx.rng.choice(_WORDS) for _ in range(words))
    return f"Request {ctx.index} ({ctx.rng.getrandbits(32):08x}): {body}"


def _short_max_tokens(ctx: Context) -> int:
    """1 to 16, mostly short (mean ~4.5): a CPU replica spends ~0.1 s per decode step."""
    return min(16, 1 + int(ctx.rng.expovariate(1 / 4)))


def _chat_body(ctx: Context, *, unique: bool = False, **fields: Any) -> dict[str, Any]:
    unique_system = _unique_text(ctx, ctx.rng.randint(40, 90)) if unique else None
    system = unique_system or ctx.rng.choice(ctx.shared_prompts)
    question = f"{ctx.rng.choice(_QUESTIONS)} (ticket {ctx.index})"
    body: dict[str, Any] = {
        "model": ctx.targets.model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": _short_max_tokens(ctx),
        "temperature": ctx.rng.choice((0.0, 0.7, 1.0)),
        "seed": ctx.index,
    }
    body.update(fields)
    if ctx.rng.random() < 0.3:  # what langchain-openai sends instead
        body["max_completion_tokens"] = body.pop("max_tokens")
    return body


def _completion_body(ctx: Context, **fields: Any) -> dict[str, Any]:
    prompt = ctx.rng.choice(ctx.shared_prompts) + f"\nQuestion {ctx.index}: {ctx.rng.choice(_QUESTIONS)}\n"
    body: dict[str, Any] = {
        "model": ctx.targets.model,
        "prompt": prompt,
        "max_tokens": _short_max_tokens(ctx),
        "temperature": ctx.rng.choice((0.0, 0.8)),
        "seed": ctx.index,
    }
    body.update(fields)
    return body


def _max_tokens(body: dict[str, Any]) -> int:
    return int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)


def _check_answer(body: dict[str, Any], request: dict[str, Any], chat: bool) -> tuple[str | None, int, int]:
    """(problem or None, prompt tokens, cached tokens) for a non-streamed answer."""
    n = int(request.get("n", 1))
    choices = body.get("choices")
    if not isinstance(choices, list) or sorted(c.get("index", -1) for c in choices) != list(range(n)):
        return f"expected {n} choices, got {choices!r:.200}", 0, 0
    stops = request.get("stop") or []
    for choice in choices:
        if choice.get("finish_reason") not in ("stop", "length"):
            return f"finish_reason {choice.get('finish_reason')!r}", 0, 0
        text = choice["message"]["content"] if chat else choice.get("text")
        if not isinstance(text, str):
            return f"text is {text!r:.100}", 0, 0
        if any(stop in text for stop in stops):
            return f"stop string left in {text!r:.100}", 0, 0
    usage = body.get("usage") or {}
    return _check_usage(usage, n * _max_tokens(request))


def _check_usage(usage: dict[str, Any], most_tokens: int) -> tuple[str | None, int, int]:
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if not isinstance(prompt, int) or prompt < 1 or not isinstance(cached, int) or not 0 <= cached <= prompt:
        return f"bad usage {usage!r:.200}", 0, 0
    if not isinstance(completion, int) or not 0 <= completion <= most_tokens:
        return f"completion_tokens {completion!r} not in [0, {most_tokens}]", 0, 0
    return None, prompt, cached


async def _read_stream(
    response: aiohttp.ClientResponse, chat: bool, stop_after_first_token: bool
) -> tuple[dict[int, str], dict[int, str], dict[str, Any] | None, bool, str | None]:
    """(text by choice, finish_reason by choice, usage, saw [DONE], error) of an SSE answer."""
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    usage: dict[str, Any] | None = None
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return texts, finished, usage, True, None
        event = json.loads(data)
        if "error" in event:
            return texts, finished, usage, False, f"error event {event['error']!r:.200}"
        usage = event.get("usage") or usage
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            index = int(choice.get("index", 0))
            texts[index] = texts.get(index, "") + (piece or "")
            if choice.get("finish_reason") is not None:
                finished[index] = choice["finish_reason"]
            if stop_after_first_token and piece:
                return texts, finished, usage, False, None
    return texts, finished, usage, False, None


async def _send(ctx: Context, base: str, path: str, request: dict[str, Any], kind: str) -> Outcome:
    chat = path.endswith("chat/completions")
    async with ctx.session.post(base + path, data=json.dumps(request), headers=_JSON) as response:
        if response.status != 200:
            await response.read()
            return Outcome(kind, str(response.status))
        if not request.get("stream"):
            problem, prompt, cached = _check_answer(await response.json(), request, chat)
            return Outcome(kind, "200", problem, prompt, cached)
        texts, finished, usage, done, error = await _read_stream(response, chat, False)
    n = int(request.get("n", 1))
    problem = error or (None if done else "stream ended without [DONE]")
    if problem is None and sorted(finished) != list(range(n)):
        problem = f"finish reasons for {sorted(finished)}, expected {n} choices"
    if problem is None and any(r not in ("stop", "length") for r in finished.values()):
        problem = f"finish reasons {finished}"
    if problem is None and any(s in t for s in request.get("stop") or [] for t in texts.values()):
        problem = f"stop string left in {texts!r:.200}"
    prompt = cached = 0
    if problem is None and (request.get("stream_options") or {}).get("include_usage"):
        if usage is None:
            problem = "include_usage set but no usage chunk"
        else:
            problem, prompt, cached = _check_usage(usage, n * _max_tokens(request))
    return Outcome(kind, "200", problem, prompt, cached)


async def _abort_mid_stream(
    ctx: Context, base: str, path: str, request: dict[str, Any], kind: str
) -> Outcome:
    """Read until the first token, then close the connection with the answer unfinished."""
    async with ctx.session.post(base + path, data=json.dumps(request), headers=_JSON) as response:
        if response.status != 200:
            await response.read()
            return Outcome(kind, str(response.status))
        _, _, _, done, error = await _read_stream(response, path.endswith("chat/completions"), True)
        response.close()
    if error is not None:
        return Outcome(kind, "200", error)
    return Outcome(kind, "aborted" if not done else "200")


async def _disconnect_early(
    ctx: Context, base: str, path: str, request: dict[str, Any], kind: str
) -> Outcome:
    """Give up a few milliseconds after sending: the prompt is still in prefill, no token yet."""
    try:
        return await asyncio.wait_for(_send(ctx, base, path, request, kind), ctx.rng.uniform(0.002, 0.05))
    except TimeoutError:
        return Outcome(kind, "disconnected")


def _bad_request(ctx: Context) -> tuple[str, Any]:
    """(path, body) that the API must refuse with a 400; the body may be raw bytes."""
    chat = _chat_body(ctx, max_tokens=4)
    chat.pop("max_completion_tokens", None)
    chat["max_tokens"] = 4
    variants: list[tuple[str, Any]] = [
        ("/v1/chat/completions", {**chat, "temperature": -1}),
        ("/v1/chat/completions", {**chat, "top_p": 1.5}),
        ("/v1/chat/completions", {**chat, "n": 0}),
        ("/v1/chat/completions", {**chat, "max_tokens": 0}),
        ("/v1/chat/completions", {**chat, "messages": []}),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "hi"}]}),
        ("/v1/chat/completions", b'{"model": "x", "messages": [ not json'),
        ("/v1/completions", {"model": ctx.targets.model, "max_tokens": 4}),
        ("/v1/completions", {"model": ctx.targets.model, "prompt": "", "max_tokens": 4}),
        ("/v1/completions", {"model": ctx.targets.model, "prompt": [10**9], "max_tokens": 4}),
    ]
    return ctx.rng.choice(variants)


async def _send_raw(ctx: Context, path: str, body: Any, kind: str) -> Outcome:
    data = body if isinstance(body, bytes) else json.dumps(body)
    async with ctx.session.post(ctx.targets.gateway + path, data=data, headers=_JSON) as response:
        payload = await response.read()
    if response.status != 200:
        try:
            error = json.loads(payload).get("error")
        except ValueError:
            error = None
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return Outcome(kind, str(response.status), f"no OpenAI error body: {payload[:200]!r}")
    return Outcome(kind, str(response.status))


KindFn = Callable[[Context], Awaitable[Outcome]]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _gateway(ctx: Context) -> str:
    return ctx.targets.gateway


def _replica(ctx: Context) -> str:
    return ctx.rng.choice(ctx.targets.replicas)


def _usage_opts(ctx: Context) -> dict[str, Any]:
    return {"stream_options": {"include_usage": True}} if ctx.rng.random() < 0.5 else {}


# kind -> (weight out of 100, statuses it may end with, coroutine)
KINDS: dict[str, tuple[int, frozenset[str], KindFn]] = {
    "chat_shared": (
        16,
        frozenset({"200"}),
        lambda c: _send(c, _gateway(c), CHAT, _chat_body(c), "chat_shared"),
    ),
    "chat_shared_stream": (
        16,
        frozenset({"200"}),
        lambda c: _send(
            c, _gateway(c), CHAT, _chat_body(c, stream=True, **_usage_opts(c)), "chat_shared_stream"
        ),
    ),
    "chat_unique": (
        6,
        frozenset({"200"}),
        lambda c: _send(c, _gateway(c), CHAT, _chat_body(c, unique=True), "chat_unique"),
    ),
    "completion": (
        8,
        frozenset({"200"}),
        lambda c: _send(c, _gateway(c), COMPLETIONS, _completion_body(c), "completion"),
    ),
    "completion_stream": (
        8,
        frozenset({"200"}),
        lambda c: _send(
            c,
            _gateway(c),
            COMPLETIONS,
            _completion_body(c, stream=True, **_usage_opts(c)),
            "completion_stream",
        ),
    ),
    "chat_n": (
        5,
        frozenset({"200"}),
        lambda c: _send(
            c, _gateway(c), CHAT, _chat_body(c, n=c.rng.randint(2, 3), temperature=0.8), "chat_n"
        ),
    ),
    "chat_n_stream": (
        4,
        frozenset({"200"}),
        lambda c: _send(
            c,
            _gateway(c),
            CHAT,
            _chat_body(c, n=c.rng.randint(2, 3), temperature=0.8, stream=True),
            "chat_n_stream",
        ),
    ),
    "chat_stop_stream": (
        5,
        frozenset({"200"}),
        lambda c: _send(
            c, _gateway(c), CHAT, _chat_body(c, stream=True, stop=c.rng.sample(_STOPS, 2)), "chat_stop_stream"
        ),
    ),
    "completion_stop": (
        3,
        frozenset({"200"}),
        lambda c: _send(
            c, _gateway(c), COMPLETIONS, _completion_body(c, stop=[c.rng.choice(_STOPS)]), "completion_stop"
        ),
    ),
    "abort_mid_stream": (
        7,
        frozenset({"aborted", "200"}),
        lambda c: _abort_mid_stream(
            c, _gateway(c), CHAT, _chat_body(c, stream=True, max_tokens=16), "abort_mid_stream"
        ),
    ),
    "disconnect_before_token": (
        5,
        frozenset({"disconnected", "200"}),
        lambda c: _disconnect_early(
            c,
            _gateway(c),
            CHAT,
            _chat_body(c, unique=True, stream=c.rng.random() < 0.5),
            "disconnect_before_token",
        ),
    ),
    "bad_params": (6, frozenset({"400"}), lambda c: _send_raw(c, *_bad_request(c), "bad_params")),
    "unknown_model": (
        3,
        frozenset({"404"}),
        lambda c: _send_raw(
            c,
            c.rng.choice((CHAT, COMPLETIONS)),
            {
                **_completion_body(c),
                "model": "no-such-model",
                "messages": [{"role": "user", "content": "hi"}],
            },
            "unknown_model",
        ),
    ),
    "direct_chat": (
        4,
        frozenset({"200"}),
        lambda c: _send(c, _replica(c), CHAT, _chat_body(c), "direct_chat"),
    ),
    "direct_completion_stream": (
        2,
        frozenset({"200"}),
        lambda c: _send(
            c, _replica(c), COMPLETIONS, _completion_body(c, stream=True), "direct_completion_stream"
        ),
    ),
    "direct_abort": (
        2,
        frozenset({"aborted", "200"}),
        lambda c: _abort_mid_stream(
            c, _replica(c), CHAT, _chat_body(c, stream=True, max_tokens=16), "direct_abort"
        ),
    ),
}


def plan_kinds(seed: int, count: int) -> list[str]:
    """The kind of each request, in order: weighted draws, but every kind at least once."""
    rng = random.Random(seed)
    names = list(KINDS)
    kinds = rng.choices(names, weights=[KINDS[k][0] for k in names], k=count)
    if count >= len(names):
        for slot, name in zip(rng.sample(range(count), len(names)), names, strict=True):
            kinds[slot] = name
    return kinds


async def run_one(ctx: Context, kind: str, timeout_s: float) -> Outcome:
    try:
        return await asyncio.wait_for(KINDS[kind][2](ctx), timeout_s)
    except TimeoutError:
        return Outcome(kind, "timeout")
    except (aiohttp.ClientError, ValueError, KeyError, TypeError) as err:
        return Outcome(kind, f"client-error:{type(err).__name__}", f"{err!r:.200}")
