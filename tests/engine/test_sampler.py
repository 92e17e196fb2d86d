"""The batched sampler against naive per-row Python references."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sampler import Sampler, SamplingInputs, apply_penalties
from engine.sampling_params import SamplingParams

CPU = torch.device("cpu")
# The batch-composition tests also run on CUDA where there is one (they passed on an H200).
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
sampler = Sampler()


def make_logits(batch: int, vocab: int, seed: int = 0, device: torch.device = CPU) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=generator) * 3).to(device)


def build(
    params: Sequence[SamplingParams],
    vocab: int,
    *,
    generators: Sequence[torch.Generator | None] | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    device: torch.device = CPU,
) -> SamplingInputs:
    batch = len(params)
    return SamplingInputs.build(
        params,
        generators if generators is not None else [None] * batch,
        prompts if prompts is not None else [()] * batch,
        outputs if outputs is not None else [()] * batch,
        vocab,
        device,
    )


def seeded(seed: int, device: torch.device = CPU) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---- naive references: one row, plain Python floats ----


def reference_penalties(
    row: list[float], params: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> list[float]:
    result = list(row)
    for token in set(prompt) | set(output):
        value = result[token]
        p = params.repetition_penalty
        result[token] = value / p if value > 0 else value * p
    for token in set(output):
        result[token] -= params.frequency_penalty * output.count(token)
        result[token] -= params.presence_penalty
    return result


def reference_distribution(row: list[float], params: SamplingParams) -> list[float]:
    """The distribution a random row draws from: temperature, top-k, top-p, min-p in that order."""
    vocab = len(row)
    scaled = [value / params.temperature for value in row]
    keep = set(range(vocab))
    if 0 < params.top_k < vocab:
        kth = sorted(scaled, reverse=True)[params.top_k - 1]
        keep = {i for i in keep if scaled[i] >= kth}

    def normalized(kept: set[int]) -> list[float]:
        top = max(scaled[i] for i in kept)
        weights = [math.exp(scaled[i] - top) if i in kept else 0.0 for i in range(vocab)]
        total = sum(weights)
        return [w / total for w in weights]

    if params.top_p < 1.0:
        probs = normalized(keep)
        mass_above = 0.0
        nucleus: set[int] = set()
        for i in sorted(keep, key=lambda i: -probs[i]):
            if mass_above >= params.top_p:
                break
            nucleus.add(i)
            mass_above += probs[i]
        keep = nucleus
    if params.min_p > 0.0:
        probs = normalized(keep)
        largest = max(probs)
        keep = {i for i in keep if probs[i] >= params.min_p * largest}
    return normalized(keep)


def log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_total = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_total for v in row]


# ---- greedy ----


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax(device: torch.device) -> None:
    logits = make_logits(6, 50, device=device)
    out = sampler(logits, build([SamplingParams(temperature=0.0)] * 6, 50, device=device))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None


def test_top_k_one_is_greedy() -> None:
    logits = make_logits(8, 100, seed=1)
    inputs = build([SamplingParams(temperature=1.5, top_k=1)] * 8, 100)
    for _ in range(5):
        assert torch.equal(sampler(logits, inputs).token_ids, logits.argmax(dim=-1))


def test_tiny_top_p_and_min_p_one_are_greedy() -> None:
    logits = make_logits(4, 64, seed=2)
    params = [SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)] * 2
    assert torch.equal(sampler(logits, build(params, 64)).token_ids, logits.argmax(dim=-1))


def test_input_logits_are_left_untouched() -> None:
    logits = make_logits(3, 40, seed=3)
    before = logits.clone()
    params = [
        SamplingParams(top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.3, logprobs=2),
        SamplingParams(temperature=0.0, frequency_penalty=0.5),
        SamplingParams(top_k=3),
    ]
    sampler(logits, build(params, 40, prompts=[[1, 2]] * 3, outputs=[[2, 3, 3]] * 3))
    assert torch.equal(logits, before)


# ---- filters and penalties against the references ----

filter_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.8]),
    top_k=st.sampled_from([0, -1, 1, 2, 5, 11, 16, 40]),
    top_p=st.sampled_from([1.0, 0.95, 0.7, 0.3, 0.05]),
    min_p=st.sampled_from([0.0, 0.02, 0.2, 0.6]),
)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(filter_params, min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_filtered_distribution_matches_reference(rows: list[SamplingParams], seed: int) -> None:
    vocab = 16
    logits = make_logits(len(rows), vocab, seed=seed)
    probs = sampler.probabilities(logits, build(rows, vocab))
    for i, params in enumerate(rows):
        expected = torch.tensor(reference_distribution(logits[i].tolist(), params))
        assert torch.equal(probs[i] > 0, expected > 0), (params, probs[i], expected)
        torch.testing.assert_close(probs[i], expected, atol=1e-5, rtol=1e-4)


def test_top_k_only_path_matches_sort_path() -> None:
    # A row's result must not depend on whether a neighbour's top_p forces the sort path.
    vocab = 200
    logits = make_logits(3, vocab, seed=4)
    rows = [SamplingParams(top_k=7), SamplingParams(), SamplingParams(top_k=150)]
    alone = sampler.probabilities(logits, build(rows, vocab))
    with_top_p = sampler.probabilities(
        torch.cat([logits, logits[:1]]), build([*rows, SamplingParams(top_p=0.5)], vocab)
    )
    assert torch.equal(alone, with_top_p[:3])


penalty_params = st.builds(
    SamplingParams,
    temperature=st.just(0.0),
    repetition_penalty=st.sampled_from([1.0, 0.8, 1.3, 2.0]),
    frequency_penalty=st.sampled_from([0.0, -0.5, 0.4, 2.0]),
    presence_penalty=st.sampled_from([0.0, -1.0, 0.7]),
)
token_lists = st.lists(st.integers(0, 11), max_size=10)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(penalty_params, token_lists, token_lists), min_size=1, max_size=5),
    seed=st.integers(0, 1000),
)
def test_penalties_match_reference(
    rows: list[tuple[SamplingParams, list[int], list[int]]], seed: int
) -> None:
    vocab = 12
    logits = make_logits(len(rows), vocab, seed=seed)
    params = [r[0] for r in rows]
    inputs = build(params, vocab, prompts=[r[1] for r in rows], outputs=[r[2] for r in rows])
    penalized = apply_penalties(logits, inputs)
    for i, (row_params, prompt, output) in enumerate(rows):
        expected = torch.tensor(reference_penalties(logits[i].tolist(), row_params, prompt, output))
        torch.testing.assert_close(penalized[i], expected)
    # Greedy rows pick the argmax of the penalized logits.
    assert torch.equal(sampler(logits, inputs).token_ids, penalized.argmax(dim=-1))


def test_penalty_inputs_only_when_needed() -> None:
    plain = build([SamplingParams(), SamplingParams(temperature=0.0)], 8, prompts=[[1], [2]])
    assert not plain.any_penalties and plain.prompt_seen is None and plain.output_counts is None
    assert not (plain.any_top_k or plain.any_top_p or plain.any_min_p)
    frequency = build([SamplingParams(frequency_penalty=0.5)], 8, prompts=[[1]], outputs=[[2]])
    assert frequency.any_penalties and frequency.prompt_seen is None
    assert frequency.output_counts is not None and frequency.output_counts[0, 2] == 1


# ---- the draw itself ----


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_temperature_sampling_follows_softmax() -> None:
    torch.manual_seed(1234)
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5, 2.0])
    draws = 20_000
    inputs = build([SamplingParams(temperature=0.7)] * draws, 6)
    tokens = sampler(row.expand(draws, 6).contiguous(), inputs).token_ids
    counts = torch.bincount(tokens, minlength=6).float()
    # df = 5; the 0.1% critical value is 20.5. The seed is fixed, so this cannot flake.
    assert chi_square(counts, torch.softmax(row / 0.7, dim=-1)) < 20.5


def test_filtered_sampling_follows_filtered_distribution() -> None:
    torch.manual_seed(99)
    vocab, draws = 10, 20_000
    # Each filter bites: top-k drops 3 tokens, top-p 2 more, min-p 1 more.
    row = torch.linspace(2.0, -2.5, vocab)[torch.tensor([3, 9, 0, 5, 1, 8, 2, 7, 4, 6])]
    params = SamplingParams(temperature=1.3, top_k=7, top_p=0.9, min_p=0.25)
    expected = torch.tensor(reference_distribution(row.tolist(), params))
    tokens = sampler(row.expand(draws, vocab).contiguous(), build([params] * draws, vocab)).token_ids
    counts = torch.bincount(tokens, minlength=vocab).float()
    support = expected > 0
    assert counts[~support].sum() == 0
    assert int(support.sum()) == 4
    assert chi_square(counts[support], expected[support]) < 16.3  # df = 3, 0.1%


def test_seeded_generator_rows_follow_softmax() -> None:
    # Seeded rows draw through the per-row loop; that path must be unbiased too.
    row = torch.tensor([0.0, 1.0, -1.0, 0.5])
    draws = 4_000
    generators = [seeded(i) for i in range(draws)]
    inputs = build([SamplingParams()] * draws, 4, generators=generators)
    tokens = sampler(row.expand(draws, 4).contiguous(), inputs).token_ids
    counts = torch.bincount(tokens, minlength=4).float()
    assert chi_square(counts, torch.softmax(row, dim=-1)) < 16.3  # df = 3, 0.1%


def step_logits(request: int, step: int, vocab: int) -> torch.Tensor:
    return make_logits(1, vocab, seed=1000 * request + step)[0]


def decode(
    requests: Sequence[tuple[int, SamplingParams, int | None]],
    steps: int,
    vocab: int,
    device: torch.device = CPU,
) -> dict[int, list[int]]:
    """Runs `steps` steps over one batch; each request has its own generator for the whole run."""
    generators = {rid: seeded(seed, device) if seed is not None else None for rid, _, seed in requests}
    outputs: dict[int, list[int]] = {rid: [] for rid, _, _ in requests}
    for step in range(steps):
        logits = torch.stack([step_logits(rid, step, vocab) for rid, _, _ in requests]).to(device)
        inputs = build(
            [p for _, p, _ in requests],
            vocab,
            generators=[generators[rid] for rid, _, _ in requests],
            prompts=[[rid, rid + 1] for rid, _, _ in requests],
            outputs=[outputs[rid] for rid, _, _ in requests],
            device=device,
        )
        for (rid, _, _), token in zip(requests, sampler(logits, inputs).token_ids.tolist(), strict=True):
            outputs[rid].append(token)
    return outputs


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_is_independent_of_batch(device: torch.device) -> None:
    vocab = 300 if device.type == "cpu" else 50_000
    target = (7, SamplingParams(temperature=0.9, top_p=0.95, frequency_penalty=0.3), 42)
    others = [
        (1, SamplingParams(temperature=0.0, repetition_penalty=1.2), None),
        (2, SamplingParams(temperature=1.2, top_k=20), None),
        (3, SamplingParams(temperature=0.5, min_p=0.1), 5),
        (4, SamplingParams(logprobs=3), None),
    ]
    alone = decode([target], 12, vocab, device)[7]
    assert len(set(alone)) > 1  # it really samples
    for batch in ([*others, target], [others[2], target, others[0]], [target, others[1]]):
        assert decode(batch, 12, vocab, device)[7] == alone
    # Another seed gives another sequence.
    assert decode([(7, target[1], 43)], 12, vocab, device)[7] != alone


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_equals_rows_alone(device: torch.device) -> None:
    vocab = 64
    rows = [
        (SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=3), None),
        (SamplingParams(temperature=0.8, top_k=10, top_p=0.9, logprobs=1), 11),
        (SamplingParams(temperature=1.1, presence_penalty=0.6), 12),
        (SamplingParams(temperature=0.0), None),
        (SamplingParams(temperature=0.6, min_p=0.05, logprobs=0), 13),
    ]
    prompts = [[1, 2, 3], [4], [5, 5], [], [6]]
    outputs = [[3, 7], [7, 7], [8], [9], []]
    logits = make_logits(len(rows), vocab, seed=6, device=device)
    batch = sampler(
        logits,
        build(
            [p for p, _ in rows],
            vocab,
            generators=[seeded(s, device) if s is not None else None for _, s in rows],
            prompts=prompts,
            outputs=outputs,
            device=device,
        ),
    )
    assert batch.top_token_ids is not None and batch.top_token_ids.shape == (len(rows), 3)
    for i, (params, seed) in enumerate(rows):
        alone = sampler(
            logits[i : i + 1],
            build(
                [params],
                vocab,
                generators=[seeded(seed, device) if seed is not None else None],
                prompts=[prompts[i]],
                outputs=[outputs[i]],
                device=device,
            ),
        )
        assert batch.token_ids[i] == alone.token_ids[0]
        if params.logprobs is not None:
            assert alone.logprobs is not None and batch.logprobs is not None
            assert alone.top_token_ids is not None and alone.top_logprobs is not None
            assert batch.top_logprobs is not None
            assert batch.logprobs[i] == alone.logprobs[0]
            k = params.logprobs
            assert torch.equal(batch.top_token_ids[i, :k], alone.top_token_ids[0, :k])
            assert torch.equal(batch.top_logprobs[i, :k], alone.top_logprobs[0, :k])


# ---- logprobs ----


def test_logprobs_are_log_softmax_of_penalized_logits() -> None:
    vocab = 30
    rows = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.4, top_k=3, logprobs=2, repetition_penalty=1.4),
        SamplingParams(temperature=2.0, top_p=0.5),  # no logprobs: its values are ignored
    ]
    prompts, outputs = [[0, 1], [2, 3, 4], []], [[5], [6, 6], []]
    logits = make_logits(3, vocab, seed=7)
    out = sampler(logits, build(rows, vocab, prompts=prompts, outputs=outputs))
    assert out.logprobs is not None and out.top_logprobs is not None and out.top_token_ids is not None
    assert out.top_token_ids.shape == (3, 5) and out.top_logprobs.dtype == torch.float32
    for i in range(2):
        penalized = reference_penalties(logits[i].tolist(), rows[i], prompts[i], outputs[i])
        # Before temperature and filters: the same values whatever the temperature.
        expected = torch.tensor(log_softmax(penalized))
        token = int(out.token_ids[i])
        assert out.logprobs[i] == pytest.approx(float(expected[token]), abs=1e-5)
        top = out.top_logprobs[i]
        assert torch.all(top[:-1] >= top[1:])
        torch.testing.assert_close(top, expected[out.top_token_ids[i]])
        torch.testing.assert_close(top, expected.sort(descending=True).values[:5])


def test_logprobs_count_zero_still_reports_chosen_token() -> None:
    out = sampler(make_logits(2, 10), build([SamplingParams(logprobs=0), SamplingParams()], 10))
    assert out.logprobs is not None and out.logprobs.shape == (2,)
    assert out.top_token_ids is not None and out.top_token_ids.shape == (2, 0)


def test_build_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError, match="one row each"):
        SamplingInputs.build([SamplingParams()], [], [()], [()], 10, CPU)


def test_empty_batch() -> None:
    out = sampler(torch.empty(0, 10), build([], 10))
    assert out.token_ids.shape == (0,)
