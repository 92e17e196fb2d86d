"""Batched token sampling on the logits' device: penalties, temperature, top-k/top-p/min-p, logprobs.

One call handles a whole step: greedy and sampled rows, rows with and without penalties or
logprobs, side by side. Nothing loops over the vocabulary in Python, and nothing in the
sampling path reads a tensor back to the host; everything data-dependent that needs a Python
value (the largest top-k, the largest logprobs count) is computed once in `SamplingInputs.build`
from the requests' parameters.

Order of operations, per row (the order vLLM and the OpenAI API use):

1. penalties on the raw logits: repetition (prompt + output tokens), then frequency and
   presence (output tokens only);
2. logprobs: log_softmax of the penalized logits, i.e. BEFORE temperature and the filters, so
   a reported logprob describes the model (plus the penalties the user asked for), not the
   truncated distribution; it is also the same value whatever the temperature;
3. the grammar mask (engine/structured/): tokens a row's grammar forbids go to -inf, after the
   logprobs, so those still describe the model, like the filters below;
4. temperature 0 rows take the argmax of the penalized, masked logits;
5. other rows: divide by temperature, top-k, top-p (on the top-k renormalized distribution),
   min-p, then draw with the exponential race `argmax(probs / q)`, `q ~ Exp(1)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.batch import to_device
from engine.sampling_params import SamplingParams
from engine.structured.bitmask import apply_blocked
from kernels.argmax import ArgmaxFn, torch_argmax

_NEG_INF = float("-inf")
# q is clamped away from 0 so that a masked token (prob 0) never scores 0/0 = NaN, which
# argmax would pick.
_TINY = torch.finfo(torch.float32).tiny


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """A [B, 1] float32 column that broadcasts against [B, V] logits."""
    return to_device(torch.tensor(values, dtype=torch.float32).unsqueeze(1), device)


def _token_counts(rows: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32 count of each token id per row, built with one scatter_add.

    Rows are padded with the id `vocab_size`, which lands in an extra column that is dropped,
    so ragged rows need no masking.
    """
    width = max((len(row) for row in rows), default=0)
    padded = torch.full((len(rows), width), vocab_size, dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            padded[i, : len(row)] = torch.as_tensor(row, dtype=torch.int64)
    padded = to_device(padded, device)
    counts = torch.zeros((len(rows), vocab_size + 1), dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


@dataclass(frozen=True)
class SamplingInputs:
    """Per-row sampling settings as device tensors, built once per step for the B rows.

    A tensor is None when no row needs it, so the common paths (all greedy, no penalties, no
    filters, no logprobs) do no work for it. Greedy rows hold neutral values in the
    temperature and filter tensors: their sampled token is computed and then discarded, and a
    neutral value keeps that wasted work finite.
    """

    vocab_size: int
    greedy: torch.Tensor  # [B] bool
    temperature: torch.Tensor | None  # [B, 1] float32; None when every random row has 1.0
    top_k: torch.Tensor | None  # [B] int64 in [1, V], V meaning off
    max_top_k: int  # largest active top-k among random rows, 0 if none
    top_p: torch.Tensor | None  # [B, 1] float32, 1.0 meaning off
    log_min_p: torch.Tensor | None  # [B, 1] float32 log(min_p), -inf meaning off
    repetition_penalty: torch.Tensor | None  # [B, 1] float32, 1.0 meaning off
    frequency_penalty: torch.Tensor | None  # [B, 1] float32
    presence_penalty: torch.Tensor | None  # [B, 1] float32
    prompt_seen: torch.Tensor | None  # [B, V] bool; only for the repetition penalty
    output_counts: torch.Tensor | None  # [B, V] float32; whenever any penalty is on
    generators: tuple[torch.Generator | None, ...]
    seeded_rows: tuple[int, ...]  # random rows that draw with their own generator
    any_unseeded_random: bool  # whether a batched draw from the default generator is needed
    all_greedy: bool
    all_random: bool
    max_num_logprobs: int | None  # K for the top logprobs; None when no row asked
    # [B, V] bool, True where a row's grammar forbids the token (all False in rows without
    # one); None when no row has a grammar.
    grammar_blocked: torch.Tensor | None = None

    @property
    def any_penalties(self) -> bool:
        return self.output_counts is not None

    @property
    def any_top_k(self) -> bool:
        return self.top_k is not None

    @property
    def any_top_p(self) -> bool:
        return self.top_p is not None

    @property
    def any_min_p(self) -> bool:
        return self.log_min_p is not None

    @staticmethod
    def build(
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
        grammar_blocked: torch.Tensor | None = None,
    ) -> SamplingInputs:
        batch = len(params)
        if not len(generators) == len(prompt_token_ids) == len(output_token_ids) == batch:
            raise ValueError(
                f"one row each expected: {batch} params, {len(generators)} generators, "
                f"{len(prompt_token_ids)} prompts, {len(output_token_ids)} outputs"
            )
        device = torch.device(device)
        greedy = [p.greedy for p in params]
        random_params = [p for p in params if not p.greedy]

        temperatures = [1.0 if p.greedy else p.temperature for p in params]
        top_ks = [vocab_size if p.greedy or not 0 < p.top_k < vocab_size else p.top_k for p in params]
        top_ps = [1.0 if p.greedy else p.top_p for p in params]
        min_ps = [0.0 if p.greedy else p.min_p for p in params]
        active_top_ks = [k for k in top_ks if k < vocab_size]

        any_repetition = any(p.repetition_penalty != 1.0 for p in params)
        any_frequency = any(p.frequency_penalty != 0.0 for p in params)
        any_presence = any(p.presence_penalty != 0.0 for p in params)
        any_penalties = any_repetition or any_frequency or any_presence
        # Only rows that use a penalty ship their token ids: the others' long prompts would
        # cost a copy and a scatter for nothing.
        prompts = [
            ids if p.repetition_penalty != 1.0 else ()
            for p, ids in zip(params, prompt_token_ids, strict=True)
        ]
        outputs = [ids if p.needs_penalties else () for p, ids in zip(params, output_token_ids, strict=True)]

        seeded_rows = tuple(
            i
            for i, (p, g) in enumerate(zip(params, generators, strict=True))
            if g is not None and not p.greedy
        )
        requested = [p.logprobs for p in params if p.logprobs is not None]
        return SamplingInputs(
            vocab_size=vocab_size,
            greedy=to_device(torch.tensor(greedy, dtype=torch.bool), device),
            temperature=(_column(temperatures, device) if any(t != 1.0 for t in temperatures) else None),
            top_k=(to_device(torch.tensor(top_ks, dtype=torch.int64), device) if active_top_ks else None),
            max_top_k=max(active_top_ks, default=0),
            top_p=_column(top_ps, device) if any(p < 1.0 for p in top_ps) else None,
            log_min_p=(
                _column([math.log(m) if m > 0 else _NEG_INF for m in min_ps], device)
                if any(m > 0.0 for m in min_ps)
                else None
            ),
            repetition_penalty=(
                _column([p.repetition_penalty for p in params], device) if any_repetition else None
            ),
            frequency_penalty=(
                _column([p.frequency_penalty for p in params], device) if any_frequency else None
            ),
            presence_penalty=(
                _column([p.presence_penalty for p in params], device) if any_presence else None
            ),
            prompt_seen=_token_counts(prompts, vocab_size, device) > 0 if any_repetition else None,
            output_counts=_token_counts(outputs, vocab_size, device) if any_penalties else None,
            generators=tuple(generators),
            seeded_rows=seeded_rows,
            any_unseeded_random=len(random_params) > len(seeded_rows),
            all_greedy=not random_params,
            all_random=not any(greedy),
            max_num_logprobs=min(max(requested), vocab_size) if requested else None,
            grammar_blocked=grammar_blocked,
        )


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32 logprob of the chosen token; None if no row asked
    # [B, K], K = the largest requested count; a row that asked fewer reads its first ones.
    top_token_ids: torch.Tensor | None  # int64, most likely first
    top_logprobs: torch.Tensor | None  # float32, descending


def apply_penalties(logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    """Penalized float32 logits: a new tensor when a penalty applies, else `logits` itself.

    Rows with neutral values (penalty 1.0 / 0.0, or no ids shipped) come out unchanged, bit
    for bit, so a row's result does not depend on its neighbours.
    """
    if not inputs.any_penalties:
        return logits
    assert inputs.output_counts is not None
    if inputs.repetition_penalty is not None:
        assert inputs.prompt_seen is not None
        penalty = inputs.repetition_penalty
        # CTRL / HF style: dividing a positive logit and multiplying a negative one both make
        # the token less likely, whatever the sign.
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        seen = inputs.prompt_seen | (inputs.output_counts > 0)
        logits = torch.where(seen, penalized, logits)
    else:
        logits = logits.clone()  # the subtractions below are in place; the caller's stays intact
    if inputs.frequency_penalty is not None:
        logits -= inputs.frequency_penalty * inputs.output_counts
    if inputs.presence_penalty is not None:
        logits -= inputs.presence_penalty * (inputs.output_counts > 0).float()
    return logits


def _apply_top_k_top_p(logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    """Masks, in place, what top-k and then top-p drop, with one ascending sort per row."""
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)
    if inputs.top_k is not None:
        # The k-th largest sits at ascending position V - k. Comparing against its value
        # (rather than cutting at a position) keeps tokens tied with it, as vLLM does, and
        # gives the same answer as the top-k-only path below whatever the batch.
        kth = sorted_logits.gather(1, (vocab_size - inputs.top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, _NEG_INF)
    if inputs.top_p is not None:
        # Ascending cumulative mass: a token is dropped when the tokens above it already hold
        # at least top_p, i.e. when the mass up to and including it is <= 1 - top_p. The most
        # likely token is always kept, so no row is left empty.
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - inputs.top_p
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, _NEG_INF)
    return logits.scatter_(1, order, sorted_logits)


def _apply_top_k(logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    """Masks, in place, what top-k drops, using topk(max k) instead of a full sort."""
    assert inputs.top_k is not None
    vocab_size = logits.shape[-1]
    top_values = logits.topk(inputs.max_top_k, dim=-1).values
    # Rows with top-k off hold V; clamping keeps their index in range and their threshold
    # is then replaced by -inf so they keep everything.
    index = inputs.top_k.clamp(max=inputs.max_top_k).sub(1).unsqueeze(1)
    kth = top_values.gather(1, index).masked_fill_((inputs.top_k == vocab_size).unsqueeze(1), _NEG_INF)
    return logits.masked_fill_(logits < kth, _NEG_INF)


def _apply_min_p(logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    """Masks, in place, tokens whose prob is below min_p times the largest prob.

    p_i < min_p * p_max is l_i - l_max < log(min_p) in logit space, which needs no softmax.
    The ratio p_i / p_max does not change when top-k / top-p renormalize, and they never drop
    the most likely token, so this equals min-p applied to the filtered distribution.
    """
    assert inputs.log_min_p is not None
    threshold = logits.amax(dim=-1, keepdim=True) + inputs.log_min_p
    return logits.masked_fill_(logits < threshold, _NEG_INF)


def _exponential_noise(probs: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    """q ~ Exp(1) per element; seeded rows draw theirs from their own generator.

    A seeded row always consumes exactly one draw of V values from its generator per step,
    from a fresh tensor, so its tokens depend only on its seed and its own logits, never on
    which rows share the batch or in what order.
    """
    noise = torch.empty_like(probs)
    if inputs.any_unseeded_random:
        noise.exponential_()
    else:
        noise.fill_(1.0)  # greedy rows only: their sampled token is discarded
    vocab_size = probs.shape[-1]
    for row in inputs.seeded_rows:
        generator = inputs.generators[row]
        draw = torch.empty(vocab_size, dtype=probs.dtype, device=probs.device)
        noise[row].copy_(draw.exponential_(generator=generator))
    return noise.clamp_min_(_TINY)


def _masked(logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    """Grammar-forbidden tokens at -inf, in a new tensor; `logits` itself when no row has a grammar.

    Rows without a grammar have no blocked token, so their values stay the same bit for bit.
    """
    if inputs.grammar_blocked is None:
        return logits
    return apply_blocked(logits, inputs.grammar_blocked)


class Sampler:
    """Turns one step's logits into tokens (and logprobs) for every row in one batched pass.

    `argmax` picks greedy tokens (and the winners of the exponential race): torch's on the
    CPU, a Triton kernel spread over the GPU on CUDA (kernels/argmax.py).
    """

    def __init__(self, argmax: ArgmaxFn = torch_argmax) -> None:
        self._argmax = argmax

    def probabilities(self, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        """[B, V] float32 distribution each random row draws from (penalties, temperature, filters).

        Greedy rows' values are meaningless. Exposed so tests and tools can inspect exactly the
        distribution `__call__` samples from.
        """
        logits = _masked(apply_penalties(logits.float(), inputs), inputs)
        return self._filtered_logits(logits, inputs).softmax(dim=-1)

    def __call__(self, logits: torch.Tensor, inputs: SamplingInputs) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[1] != inputs.vocab_size:
            raise ValueError(f"logits must be [B, {inputs.vocab_size}], got {tuple(logits.shape)}")
        if (
            inputs.all_greedy
            and not inputs.any_penalties
            and inputs.max_num_logprobs is None
            and inputs.grammar_blocked is None
        ):
            # Plain greedy: the argmax of the logits as they come (a float32 copy of a
            # bfloat16 row has the same maximum at the same place).
            return SamplerOutput(self._argmax(logits), None, None, None)
        logits = apply_penalties(logits.float(), inputs)
        all_logprobs = logits.log_softmax(dim=-1) if inputs.max_num_logprobs is not None else None
        logits = _masked(logits, inputs)

        if inputs.all_greedy:
            token_ids = self._argmax(logits)
        else:
            probs = self._filtered_logits(logits, inputs).softmax(dim=-1)
            sampled = self._argmax(probs.div_(_exponential_noise(probs, inputs)))
            if inputs.all_random:
                token_ids = sampled
            else:
                token_ids = torch.where(inputs.greedy, self._argmax(logits), sampled)

        if all_logprobs is None or inputs.max_num_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        chosen = all_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        top = all_logprobs.topk(inputs.max_num_logprobs, dim=-1, sorted=True)
        return SamplerOutput(token_ids, chosen, top.indices, top.values)

    @staticmethod
    def _filtered_logits(logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        """Temperature-scaled logits with filtered tokens at -inf, in a new tensor."""
        # The filters edit in place, so they must not touch the caller's (or the penalized,
        # still needed for greedy rows) logits: the division, or a clone, gives a fresh tensor.
        any_filter = inputs.top_k is not None or inputs.top_p is not None or inputs.log_min_p is not None
        if inputs.temperature is not None:
            scaled = logits / inputs.temperature
        else:
            scaled = logits.clone() if any_filter else logits
        if inputs.top_p is not None:
            scaled = _apply_top_k_top_p(scaled, inputs)
        elif inputs.top_k is not None:
            scaled = _apply_top_k(scaled, inputs)
        if inputs.log_min_p is not None:
            scaled = _apply_min_p(scaled, inputs)
        return scaled
