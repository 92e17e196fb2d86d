"""What one engine step costs under a LatencyModel, priced the way the engine runs it.

A pure function of what the step holds, shared by the simulated replica (replica.py) and the
check of the model against real engines' step logs (bench/step_fit.py), so both price a step
alike. The engine's runner (engine/runner.py) replays one CUDA graph for decodes alone or for
one short chunk alone; anything else up to its largest piecewise bucket runs as piecewise
graphs over the bucket's padded token count, which take at least their host launch time
(~33 graph replays and 32 attention launches); larger steps run the eager forward, which
takes at least its host launch time however little the GPU has to do. Engines before
2026-11-29 had no piecewise graphs and ran decodes beside one short chunk as two replays
(StepRules), which their step logs show.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.simulator.config import PIECEWISE_ENGINE, StepRules
from bench.simulator.latency import LatencyModel
from engine.cuda_graphs import PREFILL_BUCKETS
from engine.piecewise_graphs import piecewise_buckets

# The engine's chunk graphs take a one-sequence chunk of up to the largest bucket's tokens.
GRAPH_CHUNK_TOKENS = PREFILL_BUCKETS[-1]
# Extend attention splits the keys across programs only while a batch's query tiles cannot fill
# the GPU (kernels/extend_split_launch.py, choose_extend_splits): for Llama-3-8B on an H100 or
# H200, (tokens // 32 + sequences) x 8 KV heads < 132 SMs (128-row tiles of 32 tokens x 4
# heads, one program per SM). context_pair_ms was fitted on that split kernel (128 new tokens
# on 8,192 cached); a larger batch runs the unsplit kernel, whose cost per (query, key) pair
# is the one self_pair_ms was fitted on (an 8,192-token cold chunk).
_TILE_TOKENS, _KV_HEADS, _SMS = 32, 8, 132

Chunks = Sequence[tuple[int, int]]  # prompt chunks of 2+ tokens: (tokens, cached context before)


def step_kind(decodes: int, chunks: Chunks, rules: StepRules = PIECEWISE_ENGINE) -> str:
    """How the engine runs such a step: "graph", "piecewise", "split" or "eager" (engine/runner.py)."""
    graph_chunk = len(chunks) == 1 and chunks[0][0] <= GRAPH_CHUNK_TOKENS
    if not chunks or (graph_chunk and not decodes):
        return "graph"
    if graph_chunk and decodes <= rules.split_max_decodes:
        return "split"
    if decodes + sum(count for count, _ in chunks) <= rules.piecewise_max_tokens:
        return "piecewise"
    return "eager"


def model_ms(
    latency: LatencyModel, decodes: int, decode_kv: float, chunks: Chunks, padded_tokens: int = 0
) -> float:
    """The linear model's time for one forward over these rows (no launch floor); the matmuls
    run over `padded_tokens` rows when more than the step's tokens (a graph bucket's padding)."""
    tokens = decodes
    context_pairs = self_pairs = 0.0
    for count, context in chunks:
        tokens += count
        context_pairs += count * context
        self_pairs += count * count / 2
    sequences = decodes + len(chunks)
    if (tokens // _TILE_TOKENS + sequences) * _KV_HEADS >= _SMS:
        self_pairs, context_pairs = self_pairs + context_pairs, 0.0
    return latency.step_ms(max(tokens, padded_tokens), sequences, context_pairs, self_pairs, int(decode_kv))


def step_ms(
    latency: LatencyModel,
    decodes: int,
    decode_kv: float,
    chunks: Chunks,
    rules: StepRules = PIECEWISE_ENGINE,
) -> float:
    """The step's time as the engine runs it. `decodes` counts one-token chunks too (a prompt
    cut down to one token rides with the decodes, in the decode graph); `decode_kv` is the keys
    they read, as the model counts them (shared blocks once or not: LatencyModel.dedup_shared_kv)."""
    kind = step_kind(decodes, chunks, rules)
    if kind == "graph":
        return model_ms(latency, decodes, decode_kv, chunks)
    if kind == "split":
        return model_ms(latency, decodes, decode_kv, ()) + model_ms(latency, 0, 0.0, chunks)
    if kind == "piecewise":
        tokens = decodes + sum(count for count, _ in chunks)
        bucket = next(b for b in piecewise_buckets(rules.piecewise_max_tokens) if b >= tokens)
        return max(model_ms(latency, decodes, decode_kv, chunks, bucket), latency.piecewise_launch_ms)
    return max(model_ms(latency, decodes, decode_kv, chunks), latency.eager_launch_ms)
