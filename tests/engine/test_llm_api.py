"""The offline API's contract on a tiny random model: n > 1, seeds, logprobs, stats, abort."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams

PROMPT = list(range(3, 45))  # 42 tokens: 10 full blocks of 4 and 2 more


@pytest.fixture()
def llm(tiny_model_dir) -> LLM:
    return LLM(tiny_model_dir("qwen3"), block_size=4, num_blocks=256)


def test_n_samples_share_the_prompt_blocks(llm: LLM) -> None:
    params = SamplingParams(n=4, temperature=0.0, max_tokens=5, ignore_eos=True)
    result = llm.generate(PROMPT, params)[0]
    assert len(result.outputs) == 4
    assert len({o.token_ids for o in result.outputs}) == 1  # greedy: all four agree
    # The prompt's 10 full blocks are computed once; the others compute only the 2-token tail.
    tail = len(PROMPT) - (len(PROMPT) - 1) // 4 * 4
    assert llm.engine.stats.tokens_computed == len(PROMPT) + 3 * tail + 4 * (5 - 1)
    assert sorted(o.stats.cached_tokens for o in result.outputs) == [0, 40, 40, 40]


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    first = llm.generate(PROMPT, params)[0]
    # Another batch around it must not change a seeded request's tokens.
    noise = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    again = llm.generate([list(range(50, 90)), PROMPT, list(range(9, 30))], [noise, params, noise])[1]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert first.outputs[0].token_ids != first.outputs[1].token_ids  # sample i uses seed + i
    other = llm.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=12, seed=8, ignore_eos=True))[0]
    assert other.outputs[0].token_ids != first.outputs[0].token_ids


def test_logprobs_are_the_model_distribution(llm: LLM) -> None:
    result = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True))
    output = result[0].outputs[0]
    assert output.logprobs is not None and len(output.logprobs) == 4
    for token_id, entry in zip(output.token_ids, output.logprobs, strict=True):
        assert entry.token_id == token_id
        assert len(entry.top) == 3
        assert entry.top[0][0] == token_id  # greedy picks the most likely
        assert entry.logprob == pytest.approx(entry.top[0][1])
        assert entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]
        assert sum(torch.tensor([lp for _, lp in entry.top]).exp()) <= 1.0 + 1e-5


def test_stats_and_closing_a_stream_aborts(llm: LLM) -> None:
    result = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    stats = result.outputs[0].stats
    assert stats.prompt_tokens == len(PROMPT)
    assert stats.ttft is not None and stats.queue_time is not None and stats.e2e is not None
    assert len(stats.token_times) == 6 and list(stats.token_times) == sorted(stats.token_times)
    stream = llm.stream(PROMPT, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished
    llm.engine.check_integrity()
    assert llm.engine.pool.num_free + llm.engine.tree.num_cached_blocks == llm.engine.num_blocks


def test_a_model_folder_without_tokenizer_takes_token_ids(tiny_model_dir) -> None:
    llm = LLM(Path(tiny_model_dir("llama")), num_blocks=64)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text needs a tokenizer")
    assert (
        len(llm.generate([5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].token_ids)
        == 2
    )


@pytest.mark.parametrize(
    "options",
    [
        {"enable_prefix_caching": False, "max_batched_tokens": 512},
        {"enable_prefix_caching": True, "max_batched_tokens": 1},
        {"enable_prefix_caching": True, "max_batched_tokens": 16},
        {"enable_prefix_caching": True, "max_batched_tokens": 512, "num_blocks": 40},
    ],
    ids=["nocache-512", "cache-1", "cache-16", "tight-pool"],
)
def test_n_greedy_samples_agree_across_engine_settings(tiny_model_dir, options: dict[str, object]) -> None:
    prompts = [PROMPT, [*PROMPT[:30], 7, 8, 9], list(range(100, 131))]
    params = SamplingParams(n=3, temperature=0.0, max_tokens=20, ignore_eos=True)
    reference = LLM(tiny_model_dir("qwen3"), block_size=4, num_blocks=512).generate(prompts, params)
    llm = LLM(tiny_model_dir("qwen3"), block_size=4, **{"num_blocks": 512, **options})
    results = llm.generate(prompts, params)
    assert [[o.token_ids for o in r.outputs] for r in results] == [
        [o.token_ids for o in r.outputs] for r in reference
    ]
    llm.engine.check_integrity()
