"""How fast the gateway turns new text into token ids: `tokenizers` against gateway/fast_bpe.py.

    python -m bench.encode_speed [--repeat 20]

Texts are this repository's own prose and code (lines of README.md and the kernel notes,
Python sources), cut into a chat message (~300 characters), a tool result (~3,000) and a
retrieved document (~30,000). Each is encoded by the embedded model's `tokenizers`
Tokenizer and by gateway/fast_bpe.py, cold (its piece cache emptied first: text never seen
before, word for word) and warm; the ids are checked equal. Prints microseconds per call
(medians), one process, side by side.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer

from engine.model_store import resolve_model
from gateway.fast_bpe import FastBpeEncoder

_ROOT = Path(__file__).resolve().parent.parent
_SOURCES = ["README.md", "kernels/NOTES.md", "gateway/proxy.py", "engine/scheduler.py", "cache/radix_tree.py"]
_SIZES = {"chat message": 300, "tool result": 3_000, "retrieved document": 30_000}


def _corpus() -> str:
    lines = []
    for name in _SOURCES:
        path = _ROOT / name
        if path.is_file():
            lines += path.read_text().splitlines()
    return "\n".join(lines)


def _median_us(call: Callable[[], object], repeat: int, before: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(str(resolve_model("default") / "tokenizer.json"))
    encoder = FastBpeEncoder.for_tokenizer(tokenizer)
    if encoder is None:
        raise SystemExit("the embedded tokenizer is not one gateway/fast_bpe.py takes")
    corpus = _corpus()
    print(f"{platform.machine()}, {platform.processor() or 'cpu'}; corpus {len(corpus):,} characters")
    print("| text | chars | tokens | tokenizers us | ours cold us | ours warm us | speed-up cold / warm |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, size in _SIZES.items():
        text = corpus[:size]
        expected = tokenizer.encode(text, add_special_tokens=False).ids
        if encoder.encode(text) != expected:
            raise SystemExit(f"{label}: fast_bpe's ids differ from tokenizers' (or it left the text)")
        reference = _median_us(lambda t=text: tokenizer.encode(t, add_special_tokens=False), args.repeat)
        cold = _median_us(lambda t=text: encoder.encode(t), args.repeat, before=encoder.forget_words)
        warm = _median_us(lambda t=text: encoder.encode(t), args.repeat)
        print(
            f"| {label} | {len(text):,} | {len(expected):,} | {reference:,.0f} | {cold:,.0f} | {warm:,.0f} |"
            f" {reference / cold:.1f}x / {reference / warm:.1f}x |"
        )


if __name__ == "__main__":
    main()
