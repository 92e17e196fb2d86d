"""Mixed and prefill steps as CUDA graphs between the layers' attention calls (piecewise graphs).

A step that is neither a decode batch nor one short chunk (an agent's new turn arriving while
others decode; several prompts at once) used to run eagerly: ~360 launches that took 12-35 ms
of host time on H200 hosts, far more than the GPU needs for a few hundred tokens. Everything
in a layer but attention (norms, matmuls, rotary, the KV store, the MLP) launches the same
kernels for any batch of the same token count; attention's launch depends on the sequences
(how many, how long). So, per bucket of token counts, one graph runs the embedding and the
first layer up to its attention, one graph per layer gap runs from one layer's attention
output to the next layer's query, and one runs the last layer's tail and the final norm;
attention runs eagerly between them on the real tokens only. A step of T tokens runs the
bucket's graphs over T real and bucket - T padding tokens: padding rows store their keys in
a scratch slot outside the pool, and nothing reads their rows (their token ids and positions
are whatever an earlier step left there, always valid ones). vLLM and SGLang split their graphs the same way.

Inputs and the values passed between pieces live in static buffers (a graph reads and
writes fixed addresses), so each piece ends by copying its query and residual stream there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from engine.batch import ForwardBatch
from engine.models.decoder import CausalLM
from kernels.metadata import AttentionMetadata

log = logging.getLogger(__name__)

# Token counts of the captured steps; a step runs the smallest bucket that holds it. At most
# ~1/8 of a step is padding past 256 tokens (a 544-token step in a 640 bucket ran as slowly as
# two separate replays). Capture takes ~0.07 s a bucket for Llama-3-8B on an H200.
PIECEWISE_BUCKETS = (
    8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 448, 512,
    576, 640, 704, 768, 896, 1024, 1152, 1280, 1536, 1792, 2048,
)  # fmt: skip


def piecewise_buckets(max_tokens: int) -> tuple[int, ...]:
    """The buckets a step budget of `max_tokens` needs (the first one at or past it included)."""
    buckets = tuple(b for b in PIECEWISE_BUCKETS if b < max_tokens)
    larger = [b for b in PIECEWISE_BUCKETS if b >= max_tokens]
    return buckets + tuple(larger[:1])


class PiecewiseGraphs:
    """Runs a whole step's forward as graph replays with eager attention calls in between.

    `capture_graphs=False` runs the same pieces as plain calls (a CPU check of the plumbing).
    """

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        max_tokens: int,
        scratch_slot: int,
        capture_graphs: bool = True,
    ) -> None:
        self.model = model
        self.layers = list(model.model.layers)
        self.kv_caches = kv_caches
        self.buckets = piecewise_buckets(max_tokens)
        self.capture_graphs = capture_graphs
        config = model.config
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype
        size = self.buckets[-1]
        self.scratch_slot = scratch_slot
        # Ids, positions and slots as rows of one tensor, as a ForwardBatch has them: one copy.
        self.token_rows = torch.zeros((3, size), dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.token_rows.unbind(0)
        self.slot_mapping.fill_(scratch_slot)
        self.query = torch.zeros(size, config.num_heads, config.head_dim, dtype=dtype, device=device)
        self.attn_out = torch.zeros_like(self.query)
        self.residual = torch.zeros(size, config.hidden_size, dtype=dtype, device=device)
        self.hidden = torch.zeros_like(self.residual)
        self._pieces: dict[int, list[Callable[[], None]]] = {}
        self.capture_seconds = 0.0
        self.runs = 0

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def _piece(self, index: int, bucket: int) -> None:
        """Piece `index` of a `bucket`-token step: from layer index-1's attention output (or the
        embedding) to layer index's query (or the final norm)."""
        layers = self.layers
        if index == 0:
            hidden, residual = self.model.model.embed_tokens(self.input_ids[:bucket]), None
        else:
            hidden, residual = layers[index - 1].after_attention(
                self.attn_out[:bucket], self.residual[:bucket]
            )
        if index == len(layers):
            self.hidden[:bucket].copy_(self.model.model.norm(hidden, residual)[0])
            return
        query, residual = layers[index].attention_inputs(
            hidden, residual, self.positions[:bucket], self.kv_caches[index], self.slot_mapping[:bucket]
        )
        self.query[:bucket].copy_(query)
        self.residual[:bucket].copy_(residual)

    def _plain_pieces(self, bucket: int) -> list[Callable[[], None]]:
        return [lambda i=i: self._piece(i, bucket) for i in range(len(self.layers) + 1)]

    @torch.inference_mode()
    def capture(self, stream: torch.cuda.Stream | None = None) -> None:
        """Capture every bucket's pieces on `stream`, the engine's own (capture_stream());
        without graphs (`capture_graphs=False`) it is not used."""
        started = time.perf_counter()
        if not self.capture_graphs:
            self._pieces = {b: self._plain_pieces(b) for b in self.buckets}
            return
        pool = None
        for bucket in sorted(self.buckets, reverse=True):  # the largest first, so the pool fits all
            self._pad(0, bucket)
            plain = self._plain_pieces(bucket)
            for _ in range(2):  # compile kernels and settle the allocator before capturing
                for piece in plain:
                    piece()
            torch.cuda.synchronize()
            replays: list[Callable[[], None]] = []
            for piece in plain:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    piece()
                pool = graph.pool()
                replays.append(graph.replay)
            self._pieces[bucket] = replays
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started
        log.info(
            "captured %d piecewise graphs (%d buckets up to %d tokens) in %.1f s",
            sum(map(len, self._pieces.values())),
            len(self.buckets),
            self.max_tokens,
            self.capture_seconds,
        )

    def supports(self, batch: ForwardBatch) -> bool:
        return bool(self._pieces) and 0 < batch.input_ids.shape[0] <= self.max_tokens

    def _pad(self, count: int, bucket: int) -> None:
        """Rows count..bucket store their keys in the scratch slot: an earlier, larger step's
        slots there would overwrite real KV. Their ids and positions need no reset."""
        if bucket > count:
            self.slot_mapping[count:bucket].fill_(self.scratch_slot)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states [T, hidden] of the batch's tokens, as the model's forward gives them."""
        count = batch.input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= count)
        metadata: AttentionMetadata = batch.metadata
        self.token_rows[:, :count].copy_(batch.token_rows, non_blocking=True)
        self._pad(count, bucket)
        pieces = self._pieces[bucket]
        query, attn_out = self.query[:count], self.attn_out[:count]
        for index, layer in enumerate(self.layers):
            pieces[index]()  # up to this layer's query, its keys and values stored
            layer.self_attn.attend(query, self.kv_caches[index], metadata, out=attn_out)
        pieces[-1]()  # the last layer's tail and the final norm
        self.runs += 1
        return self.hidden[:count]
