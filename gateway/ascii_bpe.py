"""ASCII text to token ids for byte-level BPE tokenizers, exactly as `tokenizers` encodes it.

Measured on this project's 2-core machine (SmolLM2's tokenizer.json): `Tokenizer.encode`
takes ~0.44 us a character, ~1.2 ms for a 2,650-character document and ~45 us for a short
chat message, and ~90% of it is the pre-tokenizer's regular expression (Oniguruma matching
Unicode classes such as \\p{L}). On ASCII text those classes are plain ranges, and Python's
`re` runs the same pattern with them ~8x faster; each piece it cuts is then either a dict
hit (a word seen before) or one call to the tokenizer's own BPE model. Together about 5x
faster on prose (bench: `python -m bench.encode_speed`), so a request's new text (a user
message, a tool result, a retrieved document) costs the gateway a fraction of what it did.

Only what this module can mirror exactly is taken over: no normalizer, and a pre-tokenizer
that is either ByteLevel with its built-in (GPT-2) regex, or a regex Split (Isolated) followed
by a ByteLevel that only maps bytes (Llama-3, Qwen2); the regex is rewritten for ASCII from a
small grammar (\\p{L}, \\p{N}, \\s, \\S) and refused when it has anything else. At start the
encoder checks itself against `tokenizers` on a sample that holds every ASCII character in
many neighbourhoods, and is not used if a single id differs. Text with any non-ASCII
character is left to `tokenizers` (ascii_bpe returns None).
"""

from __future__ import annotations

import json
import re
from typing import Any

from tokenizers import Tokenizer

# The pattern `tokenizers` uses for ByteLevel(use_regex=True) (and GPT-2 used).
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Oniguruma's \s on ASCII: the White_Space characters (tab, LF, VT, FF, CR, space); not
# \x1c-\x1f, which Python's str.isspace() and re's \s do count.
_SPACE = "\\t\\n\\x0b\\x0c\\r "
_IN_CLASS = {r"\p{L}": "A-Za-z", r"\p{N}": "0-9", r"\s": _SPACE}
_OUTSIDE = {r"\p{L}": "[A-Za-z]", r"\p{N}": "[0-9]", r"\s": f"[{_SPACE}]", r"\S": f"[^{_SPACE}]"}
_ESCAPE = re.compile(r"\\p\{[A-Za-z]+\}|\\P\{[A-Za-z]+\}|\\.")
# Distinct pieces remembered, ~250 bytes each (text, ids, dict slot): ~2 MiB at most. Emptied
# when full, so pieces that never come back (numbers, identifiers) cannot crowd the cache for
# long; common words are back after a few requests.
WORD_CACHE_ENTRIES = 1 << 13


class UnsupportedPattern(ValueError):
    pass


def ascii_pattern(pattern: str) -> str:
    """The pattern rewritten to match on ASCII text what Oniguruma matches with `pattern`.
    Raises UnsupportedPattern on any construct whose ASCII meaning is not spelled out here."""
    out: list[str] = []
    in_class = False
    position = 0
    while position < len(pattern):
        char = pattern[position]
        if char == "\\":
            escape = _ESCAPE.match(pattern, position)
            assert escape is not None  # a backslash always matches "\\."
            token = escape.group()
            table = _IN_CLASS if in_class else _OUTSIDE
            if token in table:
                out.append(table[token])
            elif token[1] in "rnt'\\-[]()|?*+.{}^$ /!":
                out.append(token)  # a literal or a plain control character: same in both engines
            else:
                raise UnsupportedPattern(f"{token} in {pattern!r}")
            position = escape.end()
            continue
        if char == "[":
            if in_class:
                raise UnsupportedPattern(f"a nested class in {pattern!r}")
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        out.append(char)
        position += 1
    return "".join(out)


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's map from a byte to the character that stands for it in the vocab."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _pre_tokenizer_pattern(config: dict[str, Any]) -> str | None:
    """The regex the tokenizer cuts text with before BPE, where the rest is a plain byte map."""
    if config.get("normalizer") is not None:
        return None
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None
        return _GPT2_PATTERN
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return None
    split, byte_level = pre["pretokenizers"]
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space"):
        return None
    if byte_level.get("use_regex", True):
        return None  # two regexes in a row: not a shape any tokenizer we know uses
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    regex = (split.get("pattern") or {}).get("Regex")
    return regex if isinstance(regex, str) else None


def _self_check_sample() -> str:
    """Every ordered pair of ASCII characters side by side (so each character meets every
    neighbour), plus contractions, runs of spaces and digits, and code-like text."""
    pairs = "".join(chr(first) + chr(second) for first in range(128) for second in range(128))
    return "\n".join(
        [
            pairs,
            "I'm here, you're there; we'll see: it's done, they've gone, he'd go. DON'T 'S 'T",
            "   leading and trailing spaces   \n\n\n  \t\t x  \r\n\r\n",
            "numbers 1 12 123 1234 12345 3.14159 1e-10 0x1F 2026-11-29",
            'def f(x):\n    return {"a": [1, 2, 3]}  # comment\n\tif x != y: pass\n',
            "MixedCASE words_with_underscores and-hyphens CamelCaseIdentifiers ALLCAPS",
        ]
    )


class AsciiBpeEncoder:
    """Encodes ASCII text (no added tokens in it) to the ids `tokenizer.encode(text,
    add_special_tokens=False)` gives; `for_tokenizer` returns None where it cannot."""

    def __init__(self, tokenizer: Tokenizer, pattern: str) -> None:
        self._model = tokenizer.model
        self._split = re.compile(ascii_pattern(pattern))
        byte_chars = _bytes_to_unicode()
        self._byte_map = str.maketrans({chr(byte): byte_chars[byte] for byte in range(128)})
        self._words: dict[str, list[int]] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> AsciiBpeEncoder | None:
        config = json.loads(tokenizer.to_str())
        model = config.get("model") or {}
        if model.get("type") != "BPE" or model.get("dropout"):
            return None  # dropout makes encode() random; only BPE's pieces are this module's
        pattern = _pre_tokenizer_pattern(config)
        if pattern is None:
            return None
        try:
            encoder = cls(tokenizer, pattern)
        except (UnsupportedPattern, re.error):
            return None
        sample = _self_check_sample()
        expected = tokenizer.encode(sample, add_special_tokens=False).ids
        return encoder if encoder.encode(sample) == expected else None

    def forget_words(self) -> None:
        """Empty the piece cache (benchmarks time text never seen before)."""
        self._words.clear()

    def encode(self, text: str) -> list[int] | None:
        """The ids of `text`, or None when it is not all ASCII (left to `tokenizers`)."""
        if not text.isascii():
            return None
        words = self._words
        ids: list[int] = []
        for piece in self._split.findall(text):
            piece_ids = words.get(piece)
            if piece_ids is None:
                piece_ids = [token.id for token in self._model.tokenize(piece.translate(self._byte_map))]
                if len(words) >= WORD_CACHE_ENTRIES:
                    words.clear()
                words[piece] = piece_ids
            ids += piece_ids
        return ids
