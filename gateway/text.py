"""The gateway's tokenizer: prompts and chat messages to token ids, token ids back to text.

Torch-free on purpose: transformers imports torch as soon as a tokenizer loads, so this reads
the model folder's tokenizer.json with `tokenizers` and renders its chat template with
jinja2, the way transformers does (sandboxed, trim_blocks / lstrip_blocks, the special
tokens as variables, then encoding without adding special tokens again).

Encoding is the costliest step a request pays here: ~1.7 us per token on a small CPU with
`tokenizers`, 0.2-1.1 us (pieces seen before, or not) with gateway/fast_bpe.py, which takes
the pieces it can. A rendered chat splits at its special tokens (<|im_start|> ...) into
pieces that `tokenizers` encodes one by one anyway, so each piece's ids are cached: a system
prompt, tool list or conversation history sent again costs a dict look-up, and the ids are
exactly the same.
The ids are held as 4-byte arrays (a tuple of ints costs 36 bytes a token) and the cache is
bounded by what its entries cost in bytes: the text, the ids and ~200 bytes of dict entry and
object headers each, so many short pieces (a new user message each request) are bounded as
well as a few long ones. The first 10,000-request soak saw the gateway's RSS grow 6.4% with
tuples and a bound of 8 MiB of text only: this cache filling, not a leak.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from engine.detokenizer import IncrementalDetokenizer
from engine.server.openai_types import PromptError
from gateway.fast_bpe import FastBpeEncoder

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
_CACHE_BYTES = 2 << 20  # what the piece cache may hold: ~1 MiB of text and its ids
_ENTRY_OVERHEAD = 200  # bytes an entry costs beyond its text and ids (dict slot, headers)
_CACHE_PIECE_CHARS = 256 << 10  # longer pieces are encoded every time


def _entry_bytes(piece: str, ids: array[int]) -> int:
    return len(piece) + ids.itemsize * len(ids) + _ENTRY_OVERHEAD


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class GatewayTokenizer:
    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (the gateway needs the model's tokenizer)")
        self.folder = folder
        self.tokenizer = Tokenizer.from_file(str(path))
        # A tokenizer.json may carry truncation or padding settings for training; a prompt is
        # never cut or padded here (too long is a 400), and every path below encodes alike.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self._fast = FastBpeEncoder.for_tokenizer(self.tokenizer)
        self._added: dict[str, int] = {}
        self._pieces = self._piece_splitter()
        self._special_wrap = self._find_special_wrap()
        self._cache: OrderedDict[str, array[int]] = OrderedDict()
        self._cache_bytes = 0
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.special = {name: _token_text(config.get(name)) or "" for name in _SPECIAL}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        self.chat_template: str | None = template if isinstance(template, str) else None
        self._template: Any = None
        if self.chat_template is not None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = _strftime_now
            env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, indent=indent)
            self._template = env.from_string(self.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._pieces is None or (add_special_tokens and self._special_wrap is None):
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
        ids: list[int] = []
        for i, piece in enumerate(self._pieces.split(text)):
            if i % 2:
                ids.append(self._added[piece])
            elif piece:
                ids.extend(self._encode_piece(piece))
        if add_special_tokens:
            assert self._special_wrap is not None
            before, after = self._special_wrap
            return [*before, *ids, *after]
        return ids

    def _find_special_wrap(self) -> tuple[list[int], list[int]] | None:
        """The ids the post-processor puts before and after a text's own (a BOS, an EOS), so a
        prompt with special tokens is encoded in pieces too; None where two probes disagree
        (a post-processor that does more than wrap)."""
        wraps = set()
        for probe in ("a", "Hello world!\n"):
            plain = self.tokenizer.encode(probe, add_special_tokens=False).ids
            wrapped = self.tokenizer.encode(probe, add_special_tokens=True).ids
            starts = [i for i in range(len(wrapped) - len(plain) + 1) if wrapped[i : i + len(plain)] == plain]
            if len(starts) != 1:
                return None
            start = starts[0]
            wraps.add((tuple(wrapped[:start]), tuple(wrapped[start + len(plain) :])))
        if len(wraps) != 1:
            return None
        before, after = wraps.pop()
        return list(before), list(after)

    def _encode_piece(self, piece: str) -> array[int]:
        cached = self._cache.get(piece)
        if cached is not None:
            self._cache.move_to_end(piece)
            return cached
        fast = self._fast.encode(piece) if self._fast is not None else None
        if fast is None:
            fast = self.tokenizer.encode(piece, add_special_tokens=False).ids
        ids = array("I", fast)
        if len(piece) <= _CACHE_PIECE_CHARS:
            self._cache[piece] = ids
            self._cache_bytes += _entry_bytes(piece, ids)
            while self._cache_bytes > _CACHE_BYTES:
                evicted, evicted_ids = self._cache.popitem(last=False)
                self._cache_bytes -= _entry_bytes(evicted, evicted_ids)
        return ids

    def _piece_splitter(self) -> re.Pattern[str] | None:
        """Splits text at added tokens the way `tokenizers` does (leftmost, longest first), or
        None where pieces would not encode independently (a normalizer, strip options)."""
        added = self.tokenizer.get_added_tokens_decoder()
        if not added or self.tokenizer.normalizer is not None:
            return None
        if any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
            return None
        self._added = {t.content: token_id for token_id, t in added.items()}
        alternatives = sorted(self._added, key=len, reverse=True)
        return re.compile("(" + "|".join(re.escape(a) for a in alternatives) + ")")

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        if self._template is None:
            raise PromptError("this model has no chat template: use /v1/completions")
        try:
            rendered = self._template.render(
                messages=list(messages),
                tools=tools,  # passed even when None, as transformers does
                add_generation_prompt=add_generation_prompt,
                **self.special,
            )
        except Exception as err:  # jinja raises many types; all mean the messages do not fit
            raise PromptError(f"the messages do not fit the model's chat template: {err}") from err
        return self.encode(rendered, add_special_tokens=False)

    def detokenizer(self, stop: Sequence[str], prompt_token_ids: Sequence[int]) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, stop, True, prompt_token_ids)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one tokenizer per model, kept for the process
    def token_text(self, token_id: int) -> str:
        """A token on its own, as OpenAI logprobs show it."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
