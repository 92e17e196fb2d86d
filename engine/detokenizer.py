"""Incremental detokenization with stop strings, UTF-8 safe.

tokenizers' DecodeStream turns token ids into text as soon as the bytes form whole
characters. Stop strings may span tokens, so text that could still be the start of a stop
string is held back from the stream until it is known not to be one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


def backend_tokenizer(tokenizer: Any) -> Tokenizer:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer (or the thing itself)."""
    inner = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    return inner if isinstance(inner, Tokenizer) else tokenizer


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        # Tokenizers that drop a leading space on the first token (SentencePiece) need the
        # prompt's last tokens as context; feeding them and discarding the text does that.
        for token_id in prompt_token_ids[-4:]:  # a slice: copying a long prompt cost ~20 us
            self._stream.step(tokenizer, token_id)
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._text = ""  # everything decoded, up to a stop string if one matched
        self._released = 0  # how much of _text has been handed out
        self.stop_string: str | None = None

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_id: int) -> str:
        """Decode one more token; returns the text now safe to stream (may be empty)."""
        if self.stop_string is not None:
            return ""
        piece = self._stream.step(self._tokenizer, token_id)
        if not self._stop:  # nothing held back: the piece is the text to stream (hot path)
            if piece:
                self._text += piece
                self._released = len(self._text)
                return piece
            return ""
        if piece:
            search_from = max(0, len(self._text) - self._hold)
            self._text += piece
            self._match_stop(search_from)
        if self.stop_string is not None:
            return self._release(len(self._text))
        return self._release(len(self._text) - self._hold)

    def push_many(self, token_ids: Sequence[int]) -> tuple[str, int]:
        """push() each token, stopping at the one that completes a stop string: the text now
        safe to stream and how many of the tokens were taken (the rest come after the stop)."""
        if self.stop_string is not None:
            return "", 0
        if not self._stop:  # one loop, no stop to look for (a frame of one token, or a burst)
            step, tokenizer = self._stream.step, self._tokenizer
            text = "".join([piece for token_id in token_ids if (piece := step(tokenizer, token_id))])
            if text:
                self._text += text
                self._released = len(self._text)
            return text, len(token_ids)
        pieces = []
        for used, token_id in enumerate(token_ids, 1):
            pieces.append(self.push(token_id))
            if self.stop_string is not None:
                return "".join(pieces), used
        return "".join(pieces), len(token_ids)

    def flush(self) -> str:
        """The held-back tail, once the request has finished."""
        return self._release(len(self._text))

    def _match_stop(self, search_from: int) -> None:
        best: tuple[int, str] | None = None
        for stop in self._stop:
            at = self._text.find(stop, search_from)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is not None:
            self._text = self._text[: best[0]]
            self.stop_string = best[1]

    def _release(self, upto: int) -> str:
        if upto <= self._released:
            return ""
        out = self._text[self._released : upto]
        self._released = upto
        return out
