"""Token ids that stand for whole words, so text and ids convert both ways without loss.

A simulated replica answers with arbitrary token ids, and a benchmark turns a trace's token
recipes into text that a router can read. Both need ids whose text re-encodes to exactly the
same ids, whatever comes before or after: the ids of " word" tokens (a leading space, then
lowercase letters) that the tokenizer encodes back to that one id. The byte-level
pre-tokenizer splits text at each such space, so a run of them encodes token by token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer

_WORD = re.compile("Ġ[a-z]{2,}")


class WordVocab:
    def __init__(self, tokenizer: Tokenizer) -> None:
        found: list[tuple[int, str]] = []
        for piece, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if not _WORD.fullmatch(piece):
                continue
            text = tokenizer.decode([token_id])
            if tokenizer.encode(text, add_special_tokens=False).ids == [token_id]:
                found.append((token_id, text))
        if not found:
            raise ValueError("the tokenizer has no ' word' tokens that encode back to themselves")
        self.ids = np.array([token_id for token_id, _ in found], dtype=np.int64)
        self.texts = [text for _, text in found]
        self.text_of_id = dict(found)

    def __len__(self) -> int:
        return len(self.ids)

    def answer(self, length: int, seed: int) -> np.ndarray:
        """`length` word ids, a different run for each seed."""
        rng = np.random.default_rng(seed)
        return self.ids[rng.integers(0, len(self.ids), size=length)]

    def text_for(self, recipe_ids: Iterable[int]) -> str:
        """Any ids (a trace's pseudo-random ones) as words: equal ids give equal text."""
        size = len(self.texts)
        texts = self.texts
        return "".join(texts[int(i) % size] for i in recipe_ids)

    def decode(self, token_ids: Iterable[int]) -> str:
        """The text of word ids (what a simulated answer reads as)."""
        text_of = self.text_of_id
        return "".join(text_of.get(int(t), "") for t in token_ids)
