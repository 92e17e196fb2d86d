"""Grammar-constrained decoding on the embedded SmolLM2: JSON, JSON schemas, Lark, n > 1, leaks."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import jsonschema
import pytest

from engine.config import EngineConfig
from engine.core import EngineCore, InvalidRequestError
from engine.llm import LLM
from engine.sampling_params import Grammar, SamplingParams
from engine.weights import LoadedModel

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
TOOL_ARGUMENTS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer", "maximum": 14}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOL_CALL = f'start: "<tool_call>" %json{json.dumps(TOOL_ARGUMENTS)} "</tool_call>"'
YES_NO = 'start: "yes" | "no"'
TOPICS = ["a pilot", "a chef", "a painter", "a student", "a doctor", "a farmer", "a poet", "a diver"]
TRAITS = ["who loves the sea", "from Lisbon", "who plays chess", "aged sixty", "who is always late"]


@pytest.fixture(scope="module")
def llm(smollm2_dir: Path) -> LLM:
    return LLM(smollm2_dir, num_blocks=1024, max_batched_tokens=512)


def _chat(llm: LLM, text: str) -> list[int]:
    return llm.apply_chat_template([{"role": "user", "content": text}])


def _no_leaks(core: EngineCore) -> None:
    core.check_integrity()
    assert core.structured.num_active == 0
    cached = core.tree.num_cached_blocks if core.tree else 0
    assert core.pool.num_free + cached == core.num_blocks


def test_json_object_output_parses(llm: LLM) -> None:
    prompts = [
        _chat(llm, "Reply in JSON: what is the capital of France?"),
        _chat(llm, "Give the name and age of a fictional person as a JSON object."),
        _chat(llm, "Output a JSON object with keys x and y for the point (3, 4)."),
    ]
    params = SamplingParams(temperature=0.0, max_tokens=80, grammar=Grammar("json_object"))
    for result in llm.generate(prompts, params):
        output = result.outputs[0]
        assert output.finish_reason == "stop", output.text
        assert isinstance(json.loads(output.text), dict)
    _no_leaks(llm.engine)


def test_json_schema_output_validates_on_random_prompts(llm: LLM) -> None:
    rng = random.Random(6)
    prompts = [
        _chat(llm, f"Describe {rng.choice(TOPICS)} {rng.choice(TRAITS)} as a JSON record.") for _ in range(20)
    ]
    grammar = Grammar("json_schema", json.dumps(PERSON))
    # Half greedy, half sampled (seeded), so both sampler paths run under the mask.
    params = [
        SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=120, grammar=grammar)
        for i in range(20)
    ]
    for result in llm.generate(prompts, params):
        output = result.outputs[0]
        assert output.finish_reason == "stop", output.text
        jsonschema.validate(json.loads(output.text), PERSON)
    _no_leaks(llm.engine)


def test_lark_grammars_are_followed(llm: LLM) -> None:
    yes_no = SamplingParams(temperature=1.0, seed=3, max_tokens=8, grammar=Grammar("lark", YES_NO))
    tool = SamplingParams(temperature=0.0, max_tokens=60, grammar=Grammar("lark", TOOL_CALL))
    answers = llm.generate(
        [_chat(llm, "Is the sky blue? Answer yes or no."), _chat(llm, "What is the weather in Paris?")],
        [yes_no, tool],
    )
    choice, call = (r.outputs[0] for r in answers)
    assert choice.text in {"yes", "no"} and choice.finish_reason == "stop"
    match = re.fullmatch(r"<tool_call>(.*)</tool_call>", call.text, re.DOTALL)
    assert match is not None and call.finish_reason == "stop", call.text
    jsonschema.validate(json.loads(match.group(1)), TOOL_ARGUMENTS)


def test_rows_without_a_grammar_are_unchanged_by_masked_neighbours(llm: LLM) -> None:
    prompts = [_chat(llm, text) for text in ("Tell me a story.", "Name three rivers.", "Count to five.")]
    free = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    # An open-ended grammar with ignore_eos runs every row for all 16 steps, so both runs have
    # the same batch at every step and only the mask differs.
    words = SamplingParams(
        temperature=0.0, max_tokens=16, ignore_eos=True, grammar=Grammar("lark", r"start: /[a-z ]+/")
    )
    alone = llm.generate(prompts, [free, free, free])
    mixed = llm.generate(prompts, [free, words, free])
    assert mixed[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert mixed[2].outputs[0].token_ids == alone[2].outputs[0].token_ids
    assert re.fullmatch(r"[a-z ]+", mixed[1].outputs[0].text)
    assert mixed[1].outputs[0].token_ids != alone[1].outputs[0].token_ids
    _no_leaks(llm.engine)


def test_n_samples_each_follow_the_grammar(llm: LLM) -> None:
    params = SamplingParams(
        n=2, temperature=1.0, seed=11, max_tokens=120, grammar=Grammar("json_schema", json.dumps(PERSON))
    )
    result = llm.generate(_chat(llm, "Invent a person as JSON."), params)[0]
    assert len(result.outputs) == 2
    for output in result.outputs:
        assert output.finish_reason == "stop", output.text
        jsonschema.validate(json.loads(output.text), PERSON)
    assert result.outputs[0].text != result.outputs[1].text  # each sample has its own matcher
    _no_leaks(llm.engine)


def test_preemption_and_aborts_with_grammars_leak_nothing(llm: LLM, smollm2_dir: Path) -> None:
    # A second engine on the same weights with a pool too small for the batch: requests are
    # preempted and recomputed mid-output, and must resume with their matchers where they were.
    engine = llm.engine
    loaded = LoadedModel(engine.runner.model, engine.model_config, smollm2_dir)
    core = EngineCore(EngineConfig(num_blocks=12, max_batched_tokens=256), loaded, llm.tokenizer)
    params = SamplingParams(
        temperature=0.0, max_tokens=100, grammar=Grammar("json_schema", json.dumps(PERSON))
    )

    def prompt(i: int) -> list[int]:
        return _chat(llm, f"Describe {TOPICS[i]} as JSON. " + "Be precise. " * 2)

    requests = [core.add_request(prompt(i), params, request_id=f"r{i}") for i in range(4)]
    steps = 0
    while core.has_unfinished:
        core.step()
        steps += 1
        if steps % 5 == 0:
            core.check_integrity()
    assert core.scheduler.num_preemptions > 0
    for request in requests:
        text = llm.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
        assert request.finish_reason is not None and request.finish_reason.value == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    _no_leaks(core)

    # Aborts: one request mid-output, the others still waiting for blocks.
    for i in range(3):
        core.add_request(prompt(i + 4), params, request_id=f"a{i}")
    for _ in range(6):
        core.step()
    assert core.structured.num_active == 3
    for i in range(3):
        assert core.abort(f"a{i}")
    _no_leaks(core)
    with pytest.raises(InvalidRequestError, match="nonsense"):
        core.add_request([1, 2, 3], SamplingParams(grammar=Grammar("json_schema", '{"type": "nonsense"}')))
    assert not core.has_unfinished and core.structured.num_active == 0
