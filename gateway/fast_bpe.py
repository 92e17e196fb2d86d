"""Text to token ids for byte-level BPE tokenizers, exactly as `tokenizers` encodes it, faster.

Measured on this project's 2-core machine (SmolLM2's tokenizer.json): `Tokenizer.encode`
takes ~0.4 us a character, ~1.1 ms for a 3,000-character tool result, and ~90% of that is
the pre-tokenizer's regular expression (Oniguruma matching Unicode classes such as \\p{L}).
Here the same pattern runs in Python: on ASCII text with `re` and the classes spelled as
plain ranges (~8x faster than Oniguruma), on other text with the `regex` module (~3x); each
piece it cuts is then a dict hit (a piece seen before) or one call to the tokenizer's own BPE
model. `python -m bench.encode_speed` times both side by side.

Only what this module can mirror exactly is taken over: no normalizer, and a pre-tokenizer
that is either ByteLevel with its built-in (GPT-2) regex, or a regex Split (Isolated) followed
by a ByteLevel that only maps bytes (Llama-3, Qwen2); the regex is rewritten from a small
grammar (\\p{L}, \\p{N}, \\s, \\S) and refused when it has anything else. At start the
encoder checks itself against `tokenizers` (~0.5 s, once per model): every ASCII character
beside every other, and each non-ASCII character below the CJK blocks in several
neighbourhoods (the pieces the regex cuts, and the ids). Non-ASCII text is taken only when
all its characters passed (Latin, Greek, Cyrillic, Arabic, Indic scripts, typographic
punctuation, currency signs...); anything else (CJK, emoji, characters newer than the
tokenizer's Unicode) is left to `tokenizers`: encode returns None. A path that fails its
check is switched off.
"""

from __future__ import annotations

import json
import re
from typing import Any

import regex
from tokenizers import Tokenizer

# The pattern `tokenizers` uses for ByteLevel(use_regex=True) (and GPT-2 used).
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Oniguruma's \s is Unicode's White_Space. On ASCII that is tab, LF, VT, FF, CR and space,
# not \x1c-\x1f, which Python's str.isspace() (and so re's and regex's \s) also count.
_ASCII_SPACE = "\\t\\n\\x0b\\x0c\\r "
_UNICODE_SPACE = _ASCII_SPACE + "\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
_ASCII_CLASSES = (
    {r"\p{L}": "A-Za-z", r"\p{N}": "0-9", r"\s": _ASCII_SPACE},
    {r"\p{L}": "[A-Za-z]", r"\p{N}": "[0-9]", r"\s": f"[{_ASCII_SPACE}]", r"\S": f"[^{_ASCII_SPACE}]"},
)
_UNICODE_CLASSES = (
    {r"\p{L}": r"\p{L}", r"\p{N}": r"\p{N}", r"\s": _UNICODE_SPACE},
    {r"\p{L}": r"\p{L}", r"\p{N}": r"\p{N}", r"\s": f"[{_UNICODE_SPACE}]", r"\S": f"[^{_UNICODE_SPACE}]"},
)
# Non-ASCII characters the Unicode path may take: below the CJK blocks. Each one is checked at
# start against the tokenizer (its Oniguruma may know an older Unicode than `regex`: ten
# characters added since differ there), and only those that agree are taken.
_CANDIDATES = range(0x80, 0x3000)
_CHECK_CHUNK = 64
_ESCAPE = re.compile(r"\\p\{[A-Za-z]+\}|\\P\{[A-Za-z]+\}|\\.")
_LITERAL_ESCAPES = "rnt'\\-[]()|?*+.{}^$ /!"  # the same in both engines
# Distinct pieces remembered, ~250 bytes each (text, ids, dict slot): ~2 MiB at most. Emptied
# when full, so pieces that never come back (numbers, identifiers) cannot crowd the cache for
# long; common words are back after a few requests.
WORD_CACHE_ENTRIES = 1 << 13


class UnsupportedPattern(ValueError):
    pass


def rewrite_pattern(pattern: str, classes: tuple[dict[str, str], dict[str, str]]) -> str:
    """`pattern` with its character classes spelled out as `classes` (inside a [...] set,
    outside one). Raises UnsupportedPattern on any construct not spelled out here."""
    in_class_table, outside_table = classes
    out: list[str] = []
    in_class = False
    position = 0
    while position < len(pattern):
        char = pattern[position]
        if char == "\\":
            escape = _ESCAPE.match(pattern, position)
            assert escape is not None  # a backslash always matches "\\."
            token = escape.group()
            table = in_class_table if in_class else outside_table
            if token in table:
                out.append(table[token])
            elif token[1] in _LITERAL_ESCAPES:
                out.append(token)
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


def ascii_pattern(pattern: str) -> str:
    """The pattern rewritten to match on ASCII text what Oniguruma matches with it."""
    return rewrite_pattern(pattern, _ASCII_CLASSES)


def _bytes_to_unicode() -> list[str]:
    """Byte-level BPE's map from a byte to the character that stands for it in the vocab."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    by_byte = dict(zip(printable, chars, strict=True))
    return [chr(by_byte[byte]) for byte in range(256)]


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
    pattern = (split.get("pattern") or {}).get("Regex")
    return pattern if isinstance(pattern, str) else None


def _ascii_sample() -> str:
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


def _char_sample(char: str) -> str:
    """`char` after a letter, a digit, a space, a newline and an apostrophe, doubled, and
    before a letter, a space and punctuation: enough to tell a letter from a digit, a space
    or a symbol, and to catch case folding in (?i:'s)."""
    return f"a{char}b1{char} {char}{char}\n'{char}! "


def _uncovered_pattern(codes: list[int]) -> regex.Pattern[str]:
    """Matches any character that is neither ASCII nor one of `codes` (sorted)."""
    ranges = []
    for code in codes:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    spelled = "".join(f"\\u{lo:04x}-\\u{hi:04x}" for lo, hi in ranges)
    return regex.compile(f"[^\\x00-\\x7f{spelled}]")


class FastBpeEncoder:
    """Encodes text with no added tokens in it to the ids `tokenizer.encode(text,
    add_special_tokens=False)` gives; `for_tokenizer` returns None where it cannot."""

    def __init__(self, tokenizer: Tokenizer, pattern: str) -> None:
        self._model = tokenizer.model
        self._ascii_split: re.Pattern[str] | None = re.compile(ascii_pattern(pattern))
        self._unicode_split: regex.Pattern[str] | None = regex.compile(
            rewrite_pattern(pattern, _UNICODE_CLASSES)
        )
        self._byte_map = str.maketrans(dict(enumerate(_bytes_to_unicode())))
        self._uncovered = _uncovered_pattern([])
        self._words: dict[str, list[int]] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> FastBpeEncoder | None:
        config = json.loads(tokenizer.to_str())
        model = config.get("model") or {}
        if model.get("type") != "BPE" or model.get("dropout"):
            return None  # dropout makes encode() random; only BPE's pieces are this module's
        pattern = _pre_tokenizer_pattern(config)
        if pattern is None:
            return None
        try:
            encoder = cls(tokenizer, pattern)
        except (UnsupportedPattern, re.error, regex.error):
            return None
        ascii_sample = _ascii_sample()
        if not encoder._agrees(tokenizer, ascii_sample):
            encoder._ascii_split = None
        # The Unicode path cuts ASCII too (beside other characters): same pieces as the
        # tokenizer's on the ASCII sample, then each candidate character, then the ids.
        if encoder._cuts_agree(tokenizer, ascii_sample + "\u00e9"):
            covered = encoder._agreeing_characters(tokenizer)
            encoder._uncovered = _uncovered_pattern(covered)
            if not encoder._agrees(tokenizer, " ".join(map(chr, covered)) + ascii_sample):
                encoder._unicode_split = None
        else:
            encoder._unicode_split = None
        if encoder._ascii_split is None and encoder._unicode_split is None:
            return None
        return encoder

    def _agreeing_characters(self, tokenizer: Tokenizer) -> list[int]:
        """The candidate characters the Unicode path cuts as the tokenizer does, found a
        chunk at a time (halving the chunks that differ; most of the start-up check's time)."""
        agreeing: list[int] = []
        pending = [list(_CANDIDATES[i : i + _CHECK_CHUNK]) for i in range(0, len(_CANDIDATES), _CHECK_CHUNK)]
        while pending:
            chunk = pending.pop()
            if self._cuts_agree(tokenizer, "".join(_char_sample(chr(code)) for code in chunk)):
                agreeing += chunk
            elif len(chunk) > 1:
                pending += [chunk[: len(chunk) // 2], chunk[len(chunk) // 2 :]]
        return sorted(agreeing)

    def _cuts_agree(self, tokenizer: Tokenizer, sample: str) -> bool:
        """The regex cuts `sample` where the tokenizer's own pre-tokenizer does (character
        offsets, which the pre-tokenizer reports for the text it was given)."""
        split = self._ascii_split if sample.isascii() else self._unicode_split
        assert split is not None and tokenizer.pre_tokenizer is not None
        expected = [span for _, span in tokenizer.pre_tokenizer.pre_tokenize_str(sample)]
        return [match.span() for match in split.finditer(sample)] == expected

    def _agrees(self, tokenizer: Tokenizer, sample: str) -> bool:
        """Cuts `sample` into the pieces the tokenizer's own pre-tokenizer cuts, and encodes
        it to the same ids. (Pieces are compared too: a different cut can give the same ids
        on a sample and different ones elsewhere.)"""
        if not self._cuts_agree(tokenizer, sample):
            return False
        agrees = self.encode(sample) == tokenizer.encode(sample, add_special_tokens=False).ids
        self.forget_words()
        return agrees

    def _mapped(self, piece: str) -> str:
        """The piece as the vocabulary spells it (each UTF-8 byte as its stand-in character)."""
        return piece.encode().decode("latin-1").translate(self._byte_map)

    def forget_words(self) -> None:
        """Empty the piece cache (benchmarks time text never seen before)."""
        self._words.clear()

    def encode(self, text: str) -> list[int] | None:
        """The ids of `text`, or None when it is not this encoder's to take (left to `tokenizers`)."""
        split: re.Pattern[str] | regex.Pattern[str] | None
        if text.isascii():
            split = self._ascii_split
        elif self._uncovered.search(text) is None:
            split = self._unicode_split
        else:
            return None
        if split is None:
            return None
        words = self._words
        ids: list[int] = []
        for piece in split.findall(text):
            piece_ids = words.get(piece)
            if piece_ids is None:
                piece_ids = [token.id for token in self._model.tokenize(self._mapped(piece))]
                if len(words) >= WORD_CACHE_ENTRIES:
                    words.clear()
                words[piece] = piece_ids
            ids += piece_ids
        return ids
