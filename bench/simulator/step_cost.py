"""What one engine step costs under a LatencyModel, priced the way the engine runs it.

A pure function of what the step holds, shared by the simulated replica (replica.py) and the
check of the model against real engines' step logs (bench/step_fit.py), so both price a step
alike. The engine's runner (engine/runner.py) replays a CUDA graph for decodes alone or for one
short chunk alone; a decode graph then a chunk graph for decodes beside one short chunk (up to
split_max_decodes of them); otherwise it runs the eager forward, which takes at least its host
launch time however little the GPU has to do.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.simulator.latency import LatencyModel
from engine.cuda_graphs import PREFILL_BUCKETS

# The engine's chunk graphs take a one-sequence chunk of fewer tokens than the largest bucket.
GRAPH_CHUNK_TOKENS = PREFILL_BUCKETS[-1]
# Extend attention splits the keys across programs only while a batch's query tiles cannot fill
# the GPU (kernels/triton_extend_split.py, choose_extend_splits): for Llama-3-8B on an H100 or
# H200, (tokens // 32 + sequences) x 8 KV heads < 132 SMs (128-row tiles of 32 tokens x 4
# heads, one program per SM). context_pair_ms was fitted on that split kernel (128 new tokens
# on 8,192 cached); a larger batch runs the unsplit kernel, whose cost per (query, key) pair
# is the one self_pair_ms was fitted on (an 8,192-token cold chunk).
_TILE_TOKENS, _KV_HEADS, _SMS = 32, 8, 132

Chunks = Sequence[tuple[int, int]]  # prompt chunks of 2+ tokens: (tokens, cached context before)


def step_kind(decodes: int, chunks: Chunks, split_max_decodes: int) -> str:
    """How the engine runs such a step: "graph", "split" or "eager" (engine/runner.py)."""
    graph_chunk = len(chunks) == 1 and chunks[0][0] < GRAPH_CHUNK_TOKENS
    if not chunks or (graph_chunk and not decodes):
        return "graph"
    if graph_chunk and decodes <= split_max_decodes:
        return "split"
    return "eager"


def model_ms(latency: LatencyModel, decodes: int, decode_kv: float, chunks: Chunks) -> float:
    """The linear model's time for one forward over these rows (no launch floor)."""
    tokens = decodes
    context_pairs = self_pairs = 0.0
    for count, context in chunks:
        tokens += count
        context_pairs += count * context
        self_pairs += count * count / 2
    sequences = decodes + len(chunks)
    if (tokens // _TILE_TOKENS + sequences) * _KV_HEADS >= _SMS:
        self_pairs, context_pairs = self_pairs + context_pairs, 0.0
    return latency.step_ms(tokens, sequences, context_pairs, self_pairs, int(decode_kv))


def step_ms(
    latency: LatencyModel, decodes: int, decode_kv: float, chunks: Chunks, split_max_decodes: int
) -> float:
    """The step's time as the engine runs it. `decodes` counts one-token chunks too (a prompt
    cut down to one token rides with the decodes, in the decode graph); `decode_kv` is the keys
    they read, as the model counts them (shared blocks once or not: LatencyModel.dedup_shared_kv)."""
    kind = step_kind(decodes, chunks, split_max_decodes)
    if kind == "graph":
        return model_ms(latency, decodes, decode_kv, chunks)
    if kind == "split":
        return model_ms(latency, decodes, decode_kv, ()) + model_ms(latency, 0, 0.0, chunks)
    return max(model_ms(latency, decodes, decode_kv, chunks), latency.eager_launch_ms)
