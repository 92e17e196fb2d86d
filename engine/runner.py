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

# Above this many decodes the mixed step's eager forward is GPU-bound (its ~12-20 ms of launches
# hide behind the decodes' KV reads), and a second replay would only read the weights again.
# At 4-64 decodes beside a chunk under 512 tokens the two replays took 11-24 ms against 13-36
# ms eager on an H200 (bench/profile_mixed.py).
SPLIT_MAX_DECODES = 64


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
        self.split_steps = 0  # mixed steps run as a decode graph and a chunk graph
        self.split_max_decodes = SPLIT_MAX_DECODES
        self.last_step_kind = ""  # how the last plan ran: "graph", "split" or "eager"

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
        graphs = self.graphs
        split = self._two_graph_replays(chunks, graphs) if graphs is not None else None
        if split is not None:
            logits, sampled_chunks = split
            self.last_step_kind = "split"
        else:
            batch = build_forward_batch(chunks, self.block_size, self.device)
            sampled_chunks = batch.sampled_chunks
            if graphs is not None and graphs.supports(batch):
                logits = graphs.run_any(batch)
                self.last_step_kind = "graph"
            else:
                self.last_step_kind = "eager"
                hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.metadata)
                logits = (
                    None if not sampled_chunks else self.model.compute_logits(hidden[batch.logits_indices])
                )
        if not sampled_chunks:
            return []
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
        return _to_host(out, [r.params.logprobs for r in requests])

    def _two_graph_replays(
        self, chunks: list[SequenceChunk], graphs: DecodeGraphs
    ) -> tuple[torch.Tensor | None, tuple[int, ...]] | None:
        """Decodes beside one short prompt chunk, run as a decode graph and a chunk graph.

        Such a step (a new turn arriving while others decode: the usual step of a busy agent
        replica) has no graph of its own, and its eager forward is host-bound: ~230 Triton
        launches and ~130 matmul calls took 12-35 ms of launch time on H200 hosts, while the
        two replays together, which read the weights twice, took 11-24 ms for 4-64 decodes
        beside a 32-480 token chunk (bench/profile_mixed.py). The sequences are independent,
        so the split changes no result. Returns (logits of the sampling chunks, their
        indices), or None to run the step eagerly.
        """
        long = [i for i, chunk in enumerate(chunks) if len(chunk.token_ids) > 1]
        if len(long) != 1 or len(chunks) == 1:
            return None
        prompt_index = long[0]
        if len(chunks) - 1 > self.split_max_decodes:
            return None
        if not graphs.takes_split(len(chunks) - 1, len(chunks[prompt_index].token_ids)):
            return None
        decode_indices = [i for i in range(len(chunks)) if i != prompt_index]
        decodes = build_forward_batch([chunks[i] for i in decode_indices], self.block_size, self.device)
        prompt = build_forward_batch([chunks[prompt_index]], self.block_size, self.device)
        if not (graphs.supports(decodes) and graphs.supports(prompt)):
            return None
        self.split_steps += 1
        rows: list[torch.Tensor] = []
        order = [decode_indices[i] for i in decodes.sampled_chunks]
        decode_logits = graphs.run(decodes)
        if order:
            # A copy: the chunk graph's replay may reuse the memory the decode graph's output sits in.
            rows.append(decode_logits.clone())
        prompt_logits = graphs.run_prefill(prompt)  # runs even when it does not sample: it writes KV
        if prompt.sampled_chunks:
            rows.append(prompt_logits)
            order.append(prompt_index)
        if not order:
            return None, ()
        logits = rows[0] if len(rows) == 1 else torch.cat(rows)
        if order != sorted(order):  # the sampler takes rows in chunk order
            permutation = sorted(range(len(order)), key=order.__getitem__)
            logits = logits[torch.tensor(permutation, device=logits.device)]
            order.sort()
        return logits, tuple(order)


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
