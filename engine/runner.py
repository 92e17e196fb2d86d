"""Runs a schedule plan through the model and the sampler. It makes no policy decision.

`launch` queues a step's forward and sampling on the device and returns at once; the
sampled values reach the host through `LaunchedStep.sampled()`. The sampled token ids also
stay on the device, in a small table of future tokens, so the next step can be launched
before the host has read them: a decode row whose input is such a token carries the
placeholder -1 - slot, swapped for the table's value on the device (SGLang's overlap
scheduler does the same).
"""

from __future__ import annotations

import dataclasses

import torch

from engine.batch import ForwardBatch, SequenceChunk, build_forward_batch
from engine.cuda_graphs import DecodeGraphs
from engine.models.decoder import CausalLM
from engine.piecewise_graphs import PiecewiseGraphs
from engine.request import TokenLogprob
from engine.sampler import Sampler, SamplerOutput, SamplingInputs
from engine.scheduler import SampledToken, SchedulePlan
from engine.structured.outputs import PendingMask
from kernels.argmax import default_argmax
from kernels.future_tokens import default_resolve


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        graphs: DecodeGraphs | None = None,
        max_rows: int = 256,
        piecewise: PiecewiseGraphs | None = None,
    ) -> None:
        self.model = model
        self.graphs = graphs
        self.piecewise = piecewise
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.sampler = Sampler(default_argmax(self.device))
        self.resolve_future = default_resolve(self.device)
        self.last_step_kind = ""  # how the last plan ran: "graph", "piecewise" or "eager"
        # Sampled ids of the last two launches, by slot: step N reads step N-1's half while
        # it writes its own, and the host has read step N-2's before step N is planned.
        self.max_rows = max_rows
        self.future_tokens = torch.zeros(2 * max_rows, dtype=torch.int64, device=self.device)
        self.num_launches = 0
        self.future_rows = 0  # rows whose input token was read from the device's table

    @torch.inference_mode()
    def launch(self, plan: SchedulePlan, grammar_mask: PendingMask | None = None) -> LaunchedStep:
        """Queue one forward pass over the plan's chunks and the sampling of its sampling chunks.

        `grammar_mask`, when given, is being filled for the sampling rows while the forward
        runs; it is awaited only once the logits exist. Sampled row r (the r-th sampling
        chunk) is written to future slot `LaunchedStep.first_slot + r`.
        """
        chunks: list[SequenceChunk] = []
        placeholders = False
        for c in plan.chunks:
            request = c.request
            token_ids = request.token_ids[c.start : c.start + c.num_tokens]
            if len(token_ids) < c.num_tokens:
                # The last token was sampled by the step in flight: its value is on the device.
                if len(token_ids) != c.num_tokens - 1 or request.future_slot < 0:
                    raise AssertionError(f"request {request.request_id}: tokens missing from its chunk")
                token_ids = [*token_ids, -1 - request.future_slot]
                placeholders = True
                self.future_rows += 1
            chunks.append(SequenceChunk(token_ids, c.start, request.block_ids, c.samples))
        first_slot = (self.num_launches % 2) * self.max_rows
        self.num_launches += 1
        batch = self._batch(chunks, placeholders)
        sampled_chunks = batch.sampled_chunks
        graphs, piecewise = self.graphs, self.piecewise
        if graphs is not None and graphs.supports(batch):
            # Decodes alone, or one short chunk alone: one replay, logits included.
            logits = graphs.run_any(batch)
            self.last_step_kind = "graph"
        else:
            if piecewise is not None and piecewise.supports(batch):
                # Anything else up to the largest bucket (decodes beside new prompts, several
                # prompts): graph pieces with eager attention between them.
                self.last_step_kind = "piecewise"
                hidden = piecewise.run(batch)
            else:
                self.last_step_kind = "eager"
                hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.metadata)
            logits = None if not sampled_chunks else self.model.compute_logits(hidden[batch.logits_indices])
        if not sampled_chunks:
            return LaunchedStep(None, [], first_slot)
        assert logits is not None
        requests = [plan.chunks[i].request for i in sampled_chunks]
        inputs = SamplingInputs.build(
            params=[r.params for r in requests],
            generators=[r.generator for r in requests],
            prompt_token_ids=[
                r.prompt_token_ids if r.params.repetition_penalty != 1.0 else () for r in requests
            ],
            output_token_ids=[r.output_token_ids if r.params.needs_penalties else () for r in requests],
            vocab_size=self.vocab_size,
            device=self.device,
            grammar_blocked=None if grammar_mask is None else grammar_mask.blocked(logits.device),
        )
        out = self.sampler(logits, inputs)
        self.future_tokens[first_slot : first_slot + len(requests)].copy_(out.token_ids)
        return LaunchedStep(out, [r.params.logprobs for r in requests], first_slot)

    def _batch(self, chunks: list[SequenceChunk], placeholders: bool) -> ForwardBatch:
        batch = build_forward_batch(chunks, self.block_size, self.device)
        if placeholders:
            # The ids are this step's own copy (a view of its packed inputs): swapped in place.
            self.resolve_future(batch.input_ids, self.future_tokens)
        return batch


class LaunchedStep:
    """A launched step's sampler output; `sampled()` waits for it and reads it on the host."""

    def __init__(self, out: SamplerOutput | None, wanted: list[int | None], first_slot: int) -> None:
        self.first_slot = first_slot
        self._wanted = wanted
        self._ready: torch.cuda.Event | None = None
        self._out = out
        if out is not None and out.token_ids.is_cuda:
            # Copies queued now land in pinned memory when this step ends, without waiting for
            # whatever is launched after it.
            self._out = SamplerOutput(
                *(_to_host_async(getattr(out, f.name)) for f in dataclasses.fields(out))  # type: ignore[arg-type]
            )
            self._ready = torch.cuda.Event()
            self._ready.record()

    def sampled(self) -> list[SampledToken]:
        if self._out is None:
            return []
        if self._ready is not None:
            self._ready.synchronize()
        return _to_host(self._out, self._wanted)


def _to_host_async(values: torch.Tensor | None) -> torch.Tensor | None:
    if values is None:
        return None
    # Into pinned memory: a copy into pageable memory would block the host until it ran.
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    return host.copy_(values, non_blocking=True)


def _to_host(out: SamplerOutput, wanted: list[int | None]) -> list[SampledToken]:
    token_ids = out.token_ids.tolist()
    if out.logprobs is None or out.top_token_ids is None or out.top_logprobs is None:
        return [SampledToken(t) for t in token_ids]
    chosen = out.logprobs.tolist()
    top_ids = out.top_token_ids.tolist()
    top_values = out.top_logprobs.tolist()
    sampled = []
    for row, token_id in enumerate(token_ids):
        k = wanted[row]
        if k is None:
            sampled.append(SampledToken(token_id))
            continue
        top = tuple(zip(top_ids[row][:k], top_values[row][:k], strict=True))
        sampled.append(SampledToken(token_id, TokenLogprob(token_id, chosen[row], top)))
    return sampled
