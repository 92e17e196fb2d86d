"""Grammars to llguidance matchers, with the compiled ones cached by (kind, text).

Why llguidance rather than xgrammar: it is one Rust wheel with no Python dependencies, so
CPU machines get no triton or CUDA torch pins; its masks are computed lazily per step (an
Earley parser over a token trie) in ~15 µs per row for JSON schemas on this tokenizer, with
a batched fill that drops the GIL; it compiles schemas in well under a millisecond, and it
reports grammar errors as values we turn into 400s instead of crashing.

llguidance is imported only when the first grammar arrives, so the engine core runs without it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from copy import copy
from typing import Any

from engine.sampling_params import Grammar

# A small model with free whitespace between JSON tokens can spend its whole budget on
# newlines; one space after ',' and ':' keeps the output readable and the model on track.
# A schema's own "x-guidance" options still override these.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_JSON_OBJECT = '{"type": "object"}'
MAX_CACHED_GRAMMARS = 256
INSTALL_HINT = "structured output needs the llguidance package on the engine: pip install 'llguidance>=1.0'"


class GrammarError(ValueError):
    """A grammar this engine cannot enforce; the message is meant for the user."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise GrammarError(INSTALL_HINT) from None
    return llguidance


def grammar_source(grammar: Grammar) -> str:
    """The grammar in llguidance's own format, or GrammarError when the text is malformed."""
    llg = _llguidance()
    if grammar.kind == "lark":
        return llg.LLMatcher.grammar_from_lark(grammar.text)
    text = _ANY_JSON_OBJECT if grammar.kind == "json_object" else grammar.text
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as err:
        raise GrammarError(f"the JSON schema is not valid JSON: {err}") from None
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be a JSON object")
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except (ValueError, TypeError) as err:
        raise GrammarError(f"invalid JSON schema: {err}") from None


def grammar_problem(grammar: Grammar) -> str | None:
    """What is wrong with a grammar, checked without a tokenizer (for an API process), or None.

    A grammar that passes may still fail against a tokenizer only in rare token-level ways;
    the engine checks again on admission.
    """
    problem = grammar.problem()
    if problem is not None:
        return problem
    try:
        source = grammar_source(grammar)
    except GrammarError as err:
        return str(err)
    message = _llguidance().LLMatcher.validate_grammar(source)
    return _describe(grammar, message) if message and not message.startswith("WARNING") else None


def _describe(grammar: Grammar, message: str) -> str:
    what = "JSON schema" if grammar.kind == "json_schema" else f"{grammar.kind} grammar"
    return f"invalid {what}: {message.strip()}"


class GrammarCompiler:
    """Builds the llguidance tokenizer once, then one template matcher per distinct grammar.

    A request gets a `deep_copy` of its grammar's template (a few µs: the compiled lexer and
    grammar are shared), so a schema sent by a thousand requests is compiled once.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._hf_backend = tokenizer  # a tokenizers.Tokenizer, or None for a token-ids-only engine
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._ll_tokenizer: Any = None
        self._templates: OrderedDict[tuple[str, str], Any] = OrderedDict()

    @property
    def ready(self) -> bool:
        return self._ll_tokenizer is not None

    def prepare(self) -> None:
        """Build the llguidance tokenizer now (~0.4 s for a 49k vocabulary) instead of on first use."""
        if self._ll_tokenizer is not None:
            return
        llg = _llguidance()
        if self._hf_backend is None:
            raise GrammarError("structured output needs the model's tokenizer, and this engine has none")
        backend = copy(self._hf_backend)
        backend.no_padding()
        backend.no_truncation()
        try:
            self._ll_tokenizer = llg.LLTokenizer(
                backend.to_str(), n_vocab=self.vocab_size, eos_token=list(self.eos_token_ids)
            )
        except ValueError as err:
            raise GrammarError(f"this model's tokenizer cannot drive structured output: {err}") from None

    def matcher(self, grammar: Grammar) -> Any:
        """A fresh matcher for one sequence; GrammarError when the grammar does not compile."""
        key = (grammar.kind, grammar.text)
        template = self._templates.get(key)
        if template is None:
            template = self._compile(grammar)
            self._templates[key] = template
            if len(self._templates) > MAX_CACHED_GRAMMARS:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(key)
        return template.deep_copy()

    def _compile(self, grammar: Grammar) -> Any:
        problem = grammar.problem()
        if problem is not None:
            raise GrammarError(problem)
        self.prepare()
        llg = _llguidance()
        # log_level 0: a grammar error is returned to the user, not printed on the engine's stderr.
        template = llg.LLMatcher(self._ll_tokenizer, grammar_source(grammar), log_level=0)
        if template.is_error():
            raise GrammarError(_describe(grammar, template.get_error()))
        return template

    @property
    def num_cached(self) -> int:
        return len(self._templates)
