"""Runs a schedule plan through the model and the sampler. It makes no policy decision."""

from __future__ import annotations

import torch

from engine.batch import SequenceChunk, build_forward_batch
from engine.cuda_graphs import DecodeGraphs
from engine.models.decoder import CausalLM
from engine.request import TokenLogprob
from engine.sampler import Sampler, SamplerOutput, SamplingInputs
from engine.scheduler import SampledToken, SchedulePlan
from engine.structured.outputs import PendingMask


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.graphs = graphs
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, plan: SchedulePlan, grammar_mask: PendingMask | None = None) -> list[SampledToken]:
        """One forward pass over the plan's chunks; one sampled token per sampling chunk.

        `grammar_mask`, when given, is being filled for the sampling rows while the forward
        runs; it is awaited only once the logits exist.
        """
        chunks = [
            SequenceChunk(
                token_ids=c.request.token_ids[c.start : c.start + c.num_tokens],
                start_pos=c.start,
                block_ids=c.request.block_ids,
                sample=c.samples,
            )
            for c in plan.chunks
        ]
        batch = build_forward_batch(chunks, self.block_size, self.device)
        if self.graphs is not None and self.graphs.supports(batch):
            logits = self.graphs.run_any(batch)
            if not batch.sampled_chunks:
                return []
        else:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.metadata)
            if not batch.sampled_chunks:
                return []
            logits = self.model.compute_logits(hidden[batch.logits_indices])
        requests = [plan.chunks[i].request for i in batch.sampled_chunks]
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
        return _to_host(out, [r.params.logprobs for r in requests])


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
