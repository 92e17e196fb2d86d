"""The offline API on the embedded SmolLM2, against transformers' own generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.llm import LLM
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    ",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Once upon a time, in a small village by the sea,",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(smollm2_dir: Path) -> LLM:
    return LLM(smollm2_dir, num_blocks=512, max_batched_tokens=256)


def test_greedy_matches_transformers_generate(llm: LLM, smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS] + [llm.apply_chat_template(CHAT)]
    ours = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32))
    for prompt, result in zip(prompts, ours, strict=True):
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[
                0, len(prompt) :
            ]
        assert list(result.outputs[0].token_ids) == expected.tolist()


def test_chat_answer_and_streaming_agree(llm: LLM) -> None:
    prompt = llm.apply_chat_template(CHAT)
    whole = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert "Paris" in whole.text
    assert whole.outputs[0].finish_reason == "stop"
    streamed = list(llm.stream(prompt, SamplingParams(temperature=0.0, max_tokens=24)))
    assert "".join(chunk.text for chunk in streamed) == whole.text
    assert streamed[-1].finished and streamed[-1].finish_reason == "stop"
    # The second identical prompt found its full blocks cached.
    again = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1))[0]
    assert again.outputs[0].stats.cached_tokens == (len(prompt) - 1) // 16 * 16


def test_stop_string_cuts_text_and_stream(llm: LLM) -> None:
    prompt = llm.apply_chat_template(CHAT)
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=("Paris",))
    result = llm.generate(prompt, params)[0].outputs[0]
    assert result.text == "The capital of France is "
    assert result.finish_reason == "stop" and result.stop_reason == "Paris"
    streamed = "".join(chunk.text for chunk in llm.stream(prompt, params))
    assert streamed == result.text


def test_multi_turn_chat_reuses_the_conversation(llm: LLM) -> None:
    system = "You are a careful assistant. " + "Answer briefly and cite the rule you apply. " * 40
    messages = [{"role": "system", "content": system}]
    previous_total = 0
    for turn, question in enumerate(["What is 2+2?", "And 3+3?", "And 4+4?", "And 5+5?", "And 6+6?"]):
        messages.append({"role": "user", "content": question})
        prompt = llm.apply_chat_template(messages)
        result = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0]
        if turn > 0:
            assert result.stats.cached_tokens >= 0.95 * previous_total, (turn, result.stats)
        messages.append({"role": "assistant", "content": result.text})
        previous_total = len(prompt) + len(result.token_ids)
