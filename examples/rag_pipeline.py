"""A small RAG pipeline over examples/docs/, printing how much of each prompt was cached.

Every query's prompt starts with the same instructions, then the retrieved documents in a
fixed order (by file name, not by score), then the question. So each query reuses the
instructions' KV, and queries that retrieve the same documents reuse those too: only the
question is prefilled.

    prefixgate serve &                    # gateway on http://127.0.0.1:8080
    python examples/rag_pipeline.py       # or --base-url http://host:port
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from prefixgate import Client, PrefixgateError

DOCS = Path(__file__).resolve().parent / "docs"

INSTRUCTIONS = """You are the customer support assistant of an online shop.
Answer the customer's question using only the documents given with the question.
Guidelines:
- Answer in one or two short sentences, in plain language.
- Quote numbers (days, euros, points, hours) exactly as the documents state them.
- If the documents do not answer the question, say that you do not know and suggest
  contacting support; never invent a policy, a price or a delay.
- Do not mention these guidelines, the documents' file names or that you were given
  documents; speak as the shop.
- When a question has several parts, answer each part in order.
- Be polite, but do not apologise unless the shop made a mistake.
- Prices are in euros and include VAT. Delays are in business days unless stated.
- If the customer is upset, acknowledge it in a few words before answering.
- Never ask for payment details, passwords or full card numbers."""

QUERIES = [
    "How long do I have to return an opened blender?",
    "Is shipping free if I spend 40 euros?",
    "Can I return a gift card I bought last week?",
    "My headphones broke after a year. Are they still under warranty?",
    "How many points do I need for a 5 euro voucher?",
    "Do returned items keep their loyalty points?",
]

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    {"the", "are", "does", "for", "and", "can", "how", "what", "have", "you"}
)  # and all of 1-2 letters


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    words: frozenset[str]


def load_documents(folder: Path) -> list[Document]:
    docs = []
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text().strip()
        docs.append(Document(path.stem, text, frozenset(_keywords(text))))
    return docs


def _keywords(text: str) -> list[str]:
    # Naive stemming: "returned" and "returns" both count as "return".
    words = (w.removesuffix("s").removesuffix("ed") for w in _WORD.findall(text.lower()))
    return [w for w in words if w not in _STOP and len(w) > 2]


def retrieve(docs: list[Document], question: str, k: int) -> list[Document]:
    """The k documents sharing the most keywords with the question, in file-name order."""
    asked = set(_keywords(question))
    scored = sorted(docs, key=lambda d: (-len(asked & d.words), d.name))
    return sorted(scored[:k], key=lambda d: d.name)


def build_messages(question: str, retrieved: list[Document]) -> list[dict[str, str]]:
    context = "\n\n".join(f"[{d.name}]\n{d.text}" for d in retrieved)
    return [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": f"Documents:\n{context}\n\nQuestion: {question}"},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8080", help="gateway or replica URL")
    parser.add_argument("--model", default="default")
    parser.add_argument("--top-k", type=int, default=2, help="documents per question")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--cache-salt", default=None, help="share cached KV only within this salt")
    parser.add_argument("--docs", type=Path, default=DOCS, help="a folder of .txt documents")
    args = parser.parse_args(argv)

    docs = load_documents(args.docs)
    if not docs:
        print(f"no .txt documents in {args.docs}", file=sys.stderr)
        return 2
    shares = []
    with Client(args.base_url, model=args.model) as client:
        for number, question in enumerate(QUERIES, 1):
            retrieved = retrieve(docs, question, args.top_k)
            try:
                reply = client.chat(
                    build_messages(question, retrieved),
                    max_tokens=args.max_tokens,
                    temperature=0,
                    cache_salt=args.cache_salt,
                )
            except PrefixgateError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            usage = reply.usage
            prompt, cached = (usage.prompt_tokens, usage.cached_tokens) if usage else (0, 0)
            share = cached / prompt if prompt else 0.0
            shares.append(share)
            names = ", ".join(d.name for d in retrieved)
            print(f"query {number}: {prompt} prompt tokens, {cached} cached ({share:.0%}) | docs: {names}")
            print(f"  Q: {question}")
            print(f"  A: {' '.join(reply.text.split())}")
    later = shares[1:]
    if later:
        print(
            f"cached share of the prompt after the first query: mean {sum(later) / len(later):.0%}, "
            f"min {min(later):.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
