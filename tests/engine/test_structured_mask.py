"""Grammar masks without a model: bit unpacking, the batched fill, advancing, compile errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import llguidance
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from engine.request import FinishReason, Request
from engine.sampler import Sampler, SamplingInputs
from engine.sampling_params import Grammar, SamplingParams
from engine.scheduler import ScheduledChunk, SchedulePlan
from engine.structured import GrammarError, StructuredOutputs, grammar_problem
from engine.structured.bitmask import (
    allowed_token_ids,
    blocked_tokens,
    blocked_tokens_by_shifts,
    words_per_row,
)

CPU = torch.device("cpu")
EOS = 2  # SmolLM2's <|im_end|>
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.fixture()
def outputs(tokenizer: Tokenizer) -> StructuredOutputs:
    vocab = tokenizer.get_vocab_size()
    return StructuredOutputs(tokenizer, vocab, [EOS], CPU, max_rows=4)


def _request(request_id: str, grammar: Grammar | None, prompt_len: int = 5) -> Request:
    params = SamplingParams(max_tokens=64, grammar=grammar)
    return Request(request_id, list(range(10, 10 + prompt_len)), prompt_len, params, arrival_seq=0)


def _plan(*chunks: tuple[Request, bool]) -> SchedulePlan:
    return SchedulePlan(tuple(ScheduledChunk(r, 0, r.num_tokens, samples) for r, samples in chunks))


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 1000])
def test_unpacking_matches_the_bit_by_bit_reference(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    words = words_per_row(vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=generator)
    bitmask[1] = -1  # a row that allows everything
    bitmask[2] = 0  # and one that allows nothing
    for blocked in (blocked_tokens(bitmask, vocab), blocked_tokens_by_shifts(bitmask, vocab)):
        assert blocked.shape == (3, vocab) and blocked.dtype == torch.bool
        for row in range(3):
            allowed = allowed_token_ids(bitmask[row], vocab)
            assert (~blocked[row]).nonzero().flatten().tolist() == allowed


def test_batched_fill_matches_each_matcher_and_skips_rows_without_grammar(
    outputs: StructuredOutputs, tokenizer: Tokenizer
) -> None:
    vocab = outputs.vocab_size
    schema = Grammar("json_schema", json.dumps(SCHEMA))
    choice = Grammar("lark", 'start: "yes" | "no"')
    with_schema, plain, prefill, with_choice = (
        _request("a", schema),
        _request("b", None),
        _request("c", schema),
        _request("d", choice),
    )
    for request in (with_schema, prefill, with_choice):
        outputs.attach(request.request_id, outputs.new_matcher(request.params.grammar))
    # Advance "a" by a few tokens so rows differ in state, not only in grammar.
    for token_id in tokenizer.encode('{"name": "', add_special_tokens=False).ids:
        with_schema.token_ids.append(token_id)
        assert outputs.advance([with_schema]) == []
    # The prefill chunk samples nothing, so the mask has three rows: a, b, d in that order.
    plan = _plan((with_schema, True), (prefill, False), (plain, True), (with_choice, True))
    pending = outputs.begin_step(plan)
    assert pending is not None
    blocked = pending.blocked(CPU)
    assert blocked.shape == (3, vocab)
    assert not blocked[1].any()
    yes_no = {tokenizer.encode(word, add_special_tokens=False).ids[0] for word in ("yes", "no")}
    assert set((~blocked[2]).nonzero().flatten().tolist()) >= yes_no
    for row, request_id in ((0, "a"), (2, "d")):
        reference = llguidance.LLMatcher.compute_bitmask(outputs._matchers[request_id])
        words = torch.from_numpy(np.frombuffer(reference, dtype=np.int32).copy())
        assert (~blocked[row]).nonzero().flatten().tolist() == allowed_token_ids(words, vocab)
    # Inside a string of at most 8 characters a closing quote is allowed, EOS is not.
    quote = tokenizer.encode('"', add_special_tokens=False).ids[0]
    assert not blocked[0, quote] and blocked[0, EOS]


def test_no_grammar_row_means_no_mask(outputs: StructuredOutputs) -> None:
    plain = _request("b", None)
    assert outputs.begin_step(_plan((plain, True))) is None


def test_advance_finishes_a_complete_output_and_frees_it(
    outputs: StructuredOutputs, tokenizer: Tokenizer
) -> None:
    request = _request("a", Grammar("json_object"))
    outputs.attach("a", outputs.new_matcher(Grammar("json_object")))
    ids = tokenizer.encode('{"k": [1, 2]}', add_special_tokens=False).ids
    for token_id in ids[:-1]:
        request.token_ids.append(token_id)
        assert outputs.advance([request]) == []
    request.token_ids.append(ids[-1])
    assert outputs.advance([request]) == [(request, FinishReason.STOP)]
    assert outputs.num_active == 0


def test_a_token_outside_the_grammar_aborts_the_request(outputs: StructuredOutputs) -> None:
    request = _request("a", Grammar("lark", 'start: "yes" | "no"'))
    outputs.attach("a", outputs.new_matcher(request.params.grammar))
    request.token_ids.append(EOS)  # EOS before any of the two words
    assert outputs.advance([request]) == [(request, FinishReason.ABORT)]
    assert outputs.num_active == 0


def test_grammars_are_compiled_once(outputs: StructuredOutputs) -> None:
    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    first, second = outputs.new_matcher(grammar), outputs.new_matcher(grammar)
    assert first is not second
    assert outputs.compiler.num_cached == 1


@pytest.mark.parametrize(
    ("grammar", "expected"),
    [
        (Grammar("json_schema", "{not json"), "not valid JSON"),
        (Grammar("json_schema", "[1, 2]"), "must be a JSON object"),
        (Grammar("json_schema", '{"type": "nonsense"}'), "nonsense"),
        (Grammar("json_schema", '{"$ref": "#/nowhere"}'), "nowhere"),
        (Grammar("lark", 'start: "unclosed'), "lexer error"),
        (Grammar("lark", "start: missing_rule"), "missing_rule"),
    ],
)
def test_bad_grammars_are_refused_with_a_message(
    outputs: StructuredOutputs, grammar: Grammar, expected: str
) -> None:
    with pytest.raises(GrammarError, match=expected):
        outputs.new_matcher(grammar)
    problem = grammar_problem(grammar)
    assert problem is not None and expected in problem
    assert outputs.compiler.num_cached == 0


def test_grammar_fields_are_checked_with_the_sampling_params() -> None:
    with pytest.raises(ValueError, match="takes no text"):
        SamplingParams(grammar=Grammar("json_object", "{}"))
    with pytest.raises(ValueError, match="needs its text"):
        SamplingParams(grammar=Grammar("lark", " "))
    with pytest.raises(ValueError, match="grammar kind"):
        SamplingParams(grammar=Grammar("regex", "a+"))  # type: ignore[arg-type]
    assert grammar_problem(Grammar("json_schema", json.dumps(SCHEMA))) is None


def test_sampler_draws_only_allowed_tokens_and_reports_the_models_logprobs() -> None:
    vocab = 300
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)) * 3
    allowed = [[5, 17], [], [250], list(range(0, 300, 7))]  # row 1: no grammar
    blocked = torch.ones(4, vocab, dtype=torch.bool)
    blocked[1] = False
    for row, ids in enumerate(allowed):
        blocked[row, ids] = False
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=1.5, top_k=5),
    ]

    def inputs(mask: torch.Tensor | None) -> SamplingInputs:
        return SamplingInputs.build(params, [None] * 4, [()] * 4, [()] * 4, vocab, CPU, grammar_blocked=mask)

    sampler = Sampler()
    plain = sampler(logits, inputs(None))
    for _ in range(20):
        out = sampler(logits, inputs(blocked))
        tokens = out.token_ids.tolist()
        assert tokens[0] == max(allowed[0], key=lambda t: logits[0, t].item())
        assert tokens[1] == plain.token_ids[1].item()  # the unmasked row is untouched
        assert tokens[2] == 250 and tokens[3] in allowed[3]
        assert out.logprobs is not None and plain.logprobs is not None
        assert torch.equal(out.top_token_ids, plain.top_token_ids)  # logprobs describe the model
    probs = sampler.probabilities(logits, inputs(blocked))
    assert probs[3][blocked[3]].sum().item() == 0.0


def test_an_engine_without_llguidance_refuses_grammars_clearly(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import now raises ImportError
    outputs = StructuredOutputs(tokenizer, tokenizer.get_vocab_size(), [EOS], CPU, max_rows=2)
    with pytest.raises(GrammarError, match=r"pip install 'llguidance>=1\.0'"):
        outputs.new_matcher(Grammar("json_object"))
    assert outputs.begin_step(_plan((_request("b", None), True))) is None  # plain rows still run
