"""Gateway parts that need no replica: torch-free import, tokenizer parity, config, CLI."""

from __future__ import annotations

import gc
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from gateway.config import GatewayConfig
from gateway.text import GatewayTokenizer
from prefixgate.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_gateway_app_does_not_import_torch() -> None:
    code = (
        "import sys, gateway.app, gateway.serve; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.slow
def test_the_piece_cache_memory_is_bounded_for_many_short_pieces(smollm2_dir: Path) -> None:
    """Each request's new user message is a short unique piece: a bound on text alone let the
    soak's gateway grow ~300 bytes a request. Memory must stop growing once the cache is full,
    and cached ids must equal fresh ones."""
    tokenizer = GatewayTokenizer(smollm2_dir)
    system = {"role": "system", "content": "You are a support agent. " * 20}

    def chat(i: int) -> list[int]:
        return tokenizer.apply_chat_template([system, {"role": "user", "content": f"ticket {i}: my order"}])

    def memory() -> int:
        # The ASCII encoder's word cache has its own bound (test_fast_bpe.py); emptied here
        # so that where it stands in its fill-and-empty cycle does not blur this cache's.
        assert tokenizer._fast is not None
        tokenizer._fast.forget_words()
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        for i in range(12_000):  # ~2.6 MiB of entries at ~220 bytes: the cache fills
            chat(i)
        full = memory()
        for i in range(12_000, 24_000):
            chat(i)
        later = memory()
    finally:
        tracemalloc.stop()
    assert later - full < 256 << 10, (full, later)
    assert tokenizer._cache_bytes <= 2 << 20
    assert chat(23_999) == GatewayTokenizer(smollm2_dir).apply_chat_template(
        [system, {"role": "user", "content": "ticket 23999: my order"}]
    )


@pytest.mark.slow
def test_chat_template_and_encoding_match_transformers(smollm2_dir: Path, smol_tokenizer_hf) -> None:
    ours = GatewayTokenizer(smollm2_dir)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be brief. Ünïcödé ✓ 日本語"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "again"},
        ],
    ]
    for messages in conversations:
        for add in (True, False):
            expected = smol_tokenizer_hf.apply_chat_template(
                messages, add_generation_prompt=add, tokenize=True, return_dict=True
            )["input_ids"]
            assert ours.apply_chat_template(messages, add_generation_prompt=add) == list(expected)
    for text in ("hello world", " leading space", "é\n\ttabs"):
        assert ours.encode(text) == list(smol_tokenizer_hf(text)["input_ids"])
    detok = ours.detokenizer(["Paris"], [])
    ids = ours.encode("The capital is Paris, yes", add_special_tokens=False)
    text = "".join(detok.push(t) for t in ids) + detok.flush()
    assert text == "The capital is " and detok.stop_string == "Paris"


@pytest.fixture(scope="module")
def smol_tokenizer_hf(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown routing policy"):
        GatewayConfig(policy="nope")
    with pytest.raises(ValueError):
        GatewayConfig(max_attempts=0)


def test_cli_gateway_rejects_unknown_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "--policy", "nope", "--replica", "http://127.0.0.1:1"]) == 2
    assert "unknown routing policy" in capsys.readouterr().err
    assert main(["serve", "--replicas", "0"]) == 2


def test_kv_event_lines_of_any_length_are_read_whole() -> None:
    """A snapshot of a big cache is one line of megabytes (aiohttp's reader stops at 128 KiB)."""
    import asyncio
    import random

    from gateway.registry import ndjson_lines

    rng = random.Random(0)
    lines = [b"x" * 3_000_000, b"", b'{"a": 1}', b"y" * 70_000, b"z"]
    data = b"\n".join(lines) + b"\n" + b"tail-without-newline"
    cuts = sorted(rng.sample(range(1, len(data)), 200))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]

    async def collect() -> list[bytes]:
        async def source():
            for chunk in chunks:
                yield chunk

        return [bytes(line) async for line in ndjson_lines(source())]

    assert asyncio.run(collect()) == [lines[0], lines[2], lines[3], lines[4], b"tail-without-newline"]
